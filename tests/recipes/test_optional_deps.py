"""Optional dependencies and odd data never end a training run late or go unnoticed."""

from __future__ import annotations

import pytest

from grassfx.recipes import data


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
