"""Training data: documents -> one packed token stream (BOS doc EOS BOS doc EOS ...), cached on disk.

The stream is tokenised once and kept as a memory-mapped `.npy` (uint16 when the vocabulary fits,
else uint32) keyed by a hash of the inputs (paths, sizes, mtimes), the tokenizer file and the
options, so a second run opens it instantly. Samples are windows of seq_len + 1 tokens; a held-out
fraction of *documents* is the validation set, and training windows never cross into it.

With no paths the corpus is the running interpreter's standard library sources (no download), and the
validation set is a fixed list of modules held out of it (`HELD_OUT_MODULES`), so every model trained on
the default corpus is scored on the same unseen code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

_FORMAT = 1  # bump when the cache layout or document splitting changes
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
# Standard-library modules never trained on by default: the validation set, and the prompts of
# `multitoken bench`. Small, self-contained, ordinary code; 2.6% of the corpus.
HELD_OUT_MODULES = ("fractions", "heapq", "bisect", "textwrap", "statistics", "colorsys", "shlex", "pprint",
                    "difflib", "calendar", "fnmatch", "glob", "queue", "sched", "graphlib", "zipapp")


def stdlib_root() -> Path:
    return Path(os.__file__).parent


def default_corpus() -> list[Path]:
    """The running Python's standard library sources; test suites, installed packages and the held-out
    modules excluded."""
    root = stdlib_root()
    held_out = set(held_out_corpus())
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not _EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]) and p not in held_out)


def held_out_corpus() -> list[Path]:
    """The held-out standard library modules (`HELD_OUT_MODULES`), in that order."""
    root = stdlib_root()
    return [root / f"{m}.py" for m in HELD_OUT_MODULES if (root / f"{m}.py").is_file()]


def find_inputs(paths: Sequence[str | os.PathLike], glob: str = "*.py") -> list[Path]:
    """Files named directly, plus files matching `glob` under directories (recursively), sorted."""
    files: list[Path] = []
    for x in paths:
        p = Path(x)
        if p.is_dir():
            found = sorted(f for f in p.rglob(glob) if f.is_file())
            if not found:
                raise ValueError(f"no files matching {glob!r} under {p}: pass --glob PATTERN or other paths")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"training data not found: {p}")
    return files


def read_documents(files: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """One document per file; one per line of a `.jsonl` file (its `text_field`)."""
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{f}:{n}: expected a JSON object with a string field {text_field!r} "
                                         f"(choose the field with --text-field)") from None
                    if not isinstance(text, str):
                        raise ValueError(f"{f}:{n}: field {text_field!r} is {type(text).__name__}, not a string")
                    yield text
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(files: Sequence[Path], tokenizer, text_field: str) -> str:
    """Changes when any input file, the tokenizer or the options change."""
    h = hashlib.sha256(f"v{_FORMAT}|{text_field}|{type(tokenizer).__name__}|{tokenizer.n_words}".encode())
    model_path = getattr(tokenizer, "model_path", None)
    if model_path is not None:
        h.update(_hash_file(Path(model_path)).encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "multitoken" / "tokens"


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)  # a reader never sees a partial cache file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenize_to_cache(files: Sequence[Path], tokenizer, cache_dir: Path, text_field: str = "text",
                      progress: bool = True) -> tuple[Path, Path]:
    """(tokens.npy, doc_starts.npy) for these files, tokenising only when the cache lacks them."""
    key = cache_key(files, tokenizer, text_field)
    tokens_path, docs_path = cache_dir / f"{key}.tokens.npy", cache_dir / f"{key}.docs.npy"
    if tokens_path.is_file() and docs_path.is_file():
        return tokens_path, docs_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.n_words <= 1 << 16 else np.uint32
    from tqdm import tqdm

    parts, starts, total = [], [], 0
    for text in tqdm(read_documents(files, text_field), desc="tokenising", unit=" docs", disable=not progress):
        if not text:
            continue
        ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=dtype)
        parts.append(ids)
        starts.append(total)
        total += len(ids)
    if not parts:
        raise ValueError(f"the training data is empty: {len(files)} file(s) hold no text")
    starts.append(total)
    # Document starts first, tokens last: an existing tokens file means both are complete.
    _save_npy(docs_path, np.asarray(starts, dtype=np.int64))
    _save_npy(tokens_path, np.concatenate(parts))
    return tokens_path, docs_path


@dataclass
class Split:
    """Windows of `window` tokens: `starts` index into `tokens` (a memory map or an array)."""

    tokens: np.ndarray
    starts: np.ndarray
    window: int

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[s : s + self.window], dtype=np.int64) for s in idx])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def _windows(begin: int, end: int, window: int) -> np.ndarray:
    return np.arange(begin, end - window + 1, window, dtype=np.int64)


class TokenData:
    """Packed training and validation windows of seq_len + 1 tokens over a cached token stream.

    The validation documents are a fixed random fraction (independent of the training seed, so every
    run is scored on the same text). Training windows tile each maximal run of training documents;
    validation documents are concatenated (they are few) and tiled the same way.
    """

    def __init__(self, tokens_path: Path, docs_path: Path, seq_len: int, val_fraction: float = 0.01,
                 val_paths: tuple[Path, Path] | None = None):
        """`val_paths`: (tokens, doc starts) of a separate validation corpus; then every document of
        the first is trained on and `val_fraction` is unused."""
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        self.tokens = np.load(tokens_path, mmap_mode="r")
        starts = np.load(docs_path)
        n_docs, window = len(starts) - 1, seq_len + 1
        if val_paths is not None:
            val_fraction = 0
        n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1) if val_fraction > 0 and n_docs > 1 else 0
        is_val = np.zeros(n_docs, dtype=bool)
        is_val[np.random.default_rng(0).permutation(n_docs)[:n_val]] = True

        train, run_begin = [], None
        for d in range(n_docs + 1):  # runs of consecutive training documents
            if d < n_docs and not is_val[d]:
                run_begin = starts[d] if run_begin is None else run_begin
            elif run_begin is not None:
                train.append(_windows(run_begin, starts[d], window))
                run_begin = None
        self.train = Split(self.tokens, np.concatenate(train) if train else np.zeros(0, np.int64), window)
        val_tokens = np.concatenate([self.tokens[starts[d] : starts[d + 1]] for d in np.flatnonzero(is_val)]) \
            if n_val else np.zeros(0, self.tokens.dtype)
        if val_paths is not None:
            val_tokens = np.load(val_paths[0], mmap_mode="r")
            n_val = len(np.load(val_paths[1])) - 1
        self.val = Split(val_tokens, _windows(0, len(val_tokens), window), window)
        self.n_docs, self.n_val_docs = n_docs, n_val
        if len(self.train) == 0:
            raise ValueError(f"the training data ({len(self.tokens)} tokens in {n_docs} documents) is too small "
                             f"for one window of seq_len + 1 = {window} tokens: add data or lower --seq-len")

    def train_indices(self, seed: int, position: int, count: int) -> np.ndarray:
        """Windows `position .. position + count - 1` of an endless sequence of epochs, each a fresh
        permutation seeded by (seed, epoch): the data position alone says where a run is."""
        n = len(self.train)
        out = []
        while count > 0:
            epoch, i = divmod(position, n)
            perm = self._perm(seed, epoch)
            take = min(count, n - i)
            out.append(perm[i : i + take])
            position, count = position + take, count - take
        return np.concatenate(out)

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        if getattr(self, "_perm_key", None) != (seed, epoch):
            self._perm_key, self._perm_val = (seed, epoch), np.random.default_rng([seed, epoch]).permutation(len(self.train))
        return self._perm_val

    def train_batch(self, seed: int, position: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train.batch(self.train.starts[self.train_indices(seed, position, batch_size)])

    def val_batches(self, batch_size: int, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first max_batches batches of the validation windows, always the same ones."""
        for b in range(min(max_batches, -(-len(self.val) // batch_size))):
            yield self.val.batch(self.val.starts[b * batch_size : (b + 1) * batch_size])


def load_data(paths: Sequence[str | os.PathLike] | None, tokenizer, seq_len: int, *, glob: str = "*.py",
              text_field: str = "text", val_fraction: float = 0.01, cache_dir: Path | None = None,
              progress: bool = True, val_data: Sequence[str | os.PathLike] | None = None) -> TokenData:
    """Find, tokenise (or reuse the cache) and window the data.

    No paths = the standard library, validated on its held-out modules. `val_data` names a separate
    validation corpus (files or folders); without it, `val_fraction` of the documents is held out.
    """
    files = find_inputs(paths, glob) if paths else default_corpus()
    if not files:
        raise ValueError("no training files found")
    if val_data:
        val_files = find_inputs(val_data, glob)
    elif not paths:
        val_files = held_out_corpus()
    else:
        val_files = None  # a fraction of the training documents
    if val_files is not None:
        overlap = set(f.resolve() for f in files) & set(f.resolve() for f in val_files)
        if overlap:
            raise ValueError(f"{len(overlap)} validation file(s) are also training data, e.g. {min(overlap)}: "
                             f"keep --val-data apart from --data")
    cache_dir = cache_dir or default_cache_dir()
    tokens_path, docs_path = tokenize_to_cache(files, tokenizer, cache_dir, text_field, progress)
    val_paths = tokenize_to_cache(val_files, tokenizer, cache_dir, text_field, progress) if val_files else None
    return TokenData(tokens_path, docs_path, seq_len, val_fraction, val_paths)
