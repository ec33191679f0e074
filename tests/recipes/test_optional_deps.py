"""Optional dependencies and odd data never end a training run late or go unnoticed."""

from __future__ import annotations

import sys

import pytest

from grassfx.recipes import data, report


def test_plot_without_matplotlib_is_skipped_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    records = [{"run": "grass", "step": 1, "loss": 3.0}, {"run": "grass", "step": 2, "loss": 2.5}]
    assert report.plot_losses(records, tmp_path / "loss.png", "t") is None
    assert not (tmp_path / "loss.png").exists()


def test_binary_data_file_is_refused(tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(data.DataUnavailableError, match="binary"):
        data.path_documents(blob)


def test_mostly_text_with_a_few_bad_bytes_warns(tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes(("To be, or not to be " * 50).encode() + "caf\u00e9".encode("latin-1"))
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        docs = data.path_documents(text)
    assert "To be" in docs[0]
