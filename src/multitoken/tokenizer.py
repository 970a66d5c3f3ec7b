"""Tokenizers: SentencePiece (Llama 2 / our code models), Hugging Face `tokenizer.json`, raw UTF-8 bytes.

All backends share one small interface so model, generation and training code
never care which one they got:

    tok = load_tokenizer("tokenizer.model")   # or "tokenizer.json", a folder holding either, "byte"
    ids = tok.encode("def f():", bos=True, eos=False)
    tok.decode(ids)
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

import sentencepiece as spm


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int  # -1 if the tokenizer has no pad token
    n_words: int  # vocabulary size; the model's embedding must be at least this big

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _check_ids(ids: Sequence[int], n_words: int) -> list[int]:
    # int() accepts numpy / 0-d torch elements; the range check turns a deep
    # backend error (or silent garbage) into a message naming the bad id.
    out = [int(i) for i in ids]
    for i in out:
        if not 0 <= i < n_words:
            raise ValueError(f"token id {i} is out of range for a vocabulary of {n_words} ids")
    return out


def _add_specials(ids: list[int], tok: Tokenizer, bos: bool, eos: bool) -> list[int]:
    return [tok.bos_id] * bos + ids + [tok.eos_id] * eos


class SentencePieceTokenizer:
    """Wraps a SentencePiece model, e.g. Llama 2's `tokenizer.model` (BOS 1, EOS 2, no pad).

    Note: the piece "▁" (U+2581) is SentencePiece's whitespace marker, so a literal
    U+2581 in the input decodes back as a space; every other string round-trips.
    """

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model file not found: {path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
        self.model_path = path
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        assert isinstance(s, str), f"expected str, got {type(s).__name__}"
        return _add_specials(self.sp.encode(s), self, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        # BOS/EOS are control pieces: SentencePiece drops them when decoding.
        return self.sp.decode(_check_ids(ids, self.n_words))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.model_path)!r}, n_words={self.n_words})"


class ByteTokenizer:
    """The paper's byte-level models: ids 0..255 are UTF-8 bytes, then BOS, EOS, pad."""

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    n_words: int = 259

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        assert isinstance(s, str), f"expected str, got {type(s).__name__}"
        return _add_specials(list(s.encode("utf-8")), self, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i for i in _check_ids(ids, self.n_words) if i < 256)
        # Models can emit invalid UTF-8; show U+FFFD rather than crash mid-generation.
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library), e.g. Llama 3 or SmolLM2.

    BOS/EOS/pad come from `tokenizer_config.json` beside the file (else `special_tokens_map.json`);
    a token the tokenizer lacks is -1, and encode() then has nothing to add. The file's own
    post-processor is not applied: EOS is added only when asked, as with SentencePiece, and BOS when
    asked and the model uses one: the config's `add_bos_token`, else whether the post-processor
    prepends it (Llama models do; SmolLM2 and GPT-2-style models start without one).
    """

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as e:
            raise ImportError("a tokenizer.json needs the `tokenizers` package: pip install 'multitoken[hf]'") from e
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            self.tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a valid Hugging Face tokenizer.json: {e}") from None
        self.path = path
        self.n_words: int = self.tok.get_vocab_size(with_added_tokens=True)
        special = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            if (path.parent / name).is_file():
                special.update(json.loads((path.parent / name).read_text("utf-8")))
        self.bos_id: int = self._token_id(special.get("bos_token"))
        self.eos_id: int = self._token_id(special.get("eos_token"))
        self.pad_id: int = self._token_id(special.get("pad_token"))
        adds_bos = self.bos_id >= 0 and self.tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.add_bos: bool = self.bos_id >= 0 and bool(special.get("add_bos_token", adds_bos))

    def _token_id(self, token: str | dict | None) -> int:
        if isinstance(token, dict):  # older configs: {"content": "<s>", "lstrip": false, ...}
            token = token.get("content")
        token_id = self.tok.token_to_id(token) if isinstance(token, str) else None
        return -1 if token_id is None else token_id

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        assert isinstance(s, str), f"expected str, got {type(s).__name__}"
        ids: list[int] = self.tok.encode(s, add_special_tokens=False).ids
        if bos and self.add_bos:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens (BOS, EOS, chat markers) are dropped, as SentencePiece drops control pieces.
        return self.tok.decode(_check_ids(ids, self.n_words), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, n_words={self.n_words})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """"byte"/"bytes" -> ByteTokenizer; a `.model` file (or a directory holding
    `tokenizer.model`, as in Meta's releases) -> SentencePieceTokenizer; a `.json` file (or a
    directory holding `tokenizer.json`, as in Hugging Face models) -> HFTokenizer."""
    if str(path).lower() in ("byte", "bytes"):
        return ByteTokenizer()
    p = Path(path)
    for name in ("tokenizer.model", "tokenizer.json"):
        if p.is_dir() and (p / name).is_file():
            p = p / name
            break
    supported = "'byte' (UTF-8 bytes), a SentencePiece '.model' file or a Hugging Face 'tokenizer.json'"
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".json" and p.is_file():
        try:
            return HFTokenizer(p)
        except ValueError as e:
            raise ValueError(f"{e} (expected {supported})") from None
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p} (expected {supported})")
    raise ValueError(f"unsupported tokenizer {p}: expected {supported}")


class StreamDecoder:
    """Turns a stream of token ids into printable text, one push at a time.

    Decodes the whole sequence each time and returns the new suffix: piece
    boundaries don't align with characters (byte-fallback pieces, SentencePiece
    dropping the first piece's leading space), so only the full decode is right.
    Concatenating every push() and the final flush() equals tokenizer.decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._printed = 0  # number of characters of the full decode already returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        # A trailing U+FFFD may be an incomplete multi-byte character that the
        # next byte completes: hold it back until it is resolved (or flush()).
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, text: str) -> str:
        new = text[self._printed :]
        self._printed = len(text)
        return new


# --- training ---------------------------------------------------------------

N_SPECIAL = 3  # <unk>=0, <s>=1, </s>=2: the Llama 2 layout
MIN_VOCAB = N_SPECIAL + 256  # plus one piece per byte for byte_fallback


def _input_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for x in inputs:
        p = Path(x)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*.py") if f.is_file())  # sorted: deterministic
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"training input not found: {p}")
    return files


def _lines(files: list[Path]) -> Iterator[str]:
    # SentencePiece trains on sentences = lines; newlines themselves never become
    # pieces, and at encode time "\n" falls back to the byte piece <0x0A>.
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line:
                yield line


def train_sentencepiece(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    out_prefix: str | os.PathLike,
    *,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 2_000_000,
    num_threads: int | None = None,  # default: all cores
) -> Path:
    """Train a byte-fallback BPE SentencePiece model for code.

    `inputs` are files, or directories searched recursively for `*.py`.
    Writes `{out_prefix}.model` and `{out_prefix}.vocab` (atomically) and
    returns the path of the `.model` file.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # a bare path is not a sequence of paths
    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback needs at least {MIN_VOCAB} "
            f"({N_SPECIAL} special ids + 256 bytes) plus room for the corpus' characters and merges"
        )
    files = _input_files(inputs)
    if not files:
        raise ValueError(f"no input files (*.py in directories) found in: {', '.join(map(str, inputs))}")

    spm.set_random_generator_seed(0)  # sentence sampling/shuffling is random: fix it
    model_proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(files),
            # In-memory output: no temp files, and (unlike model_prefix, which is stored
            # in the model) the bytes don't depend on where the model is written.
            model_writer=model_proto,
            model_type="bpe",
            vocab_size=vocab_size,  # hard_vocab_limit stays on: exact size or an error
            # Llama 2 ids, so our models share its layout.
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            # Code: every byte representable, whitespace kept verbatim.
            byte_fallback=True,
            character_coverage=0.9995,  # rare characters become bytes, not pieces
            split_digits=True,  # numbers as digits: no arbitrary multi-digit pieces
            normalization_rule_name="identity",  # no NFKC: code must round-trip exactly
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # indentation runs become single pieces
            # Keep words apart (Llama's default). Merging across spaces compresses code
            # only ~5% better but spends the vocabulary on memorised phrases like
            # "▁▁▁▁def▁create" and trains ~2x slower; indentation still merges into
            # whitespace-only pieces because of allow_whitespace_only_pieces.
            split_by_whitespace=True,
            # No dummy "▁" prefix: training sentences are lines but we encode whole
            # files, where only the first line would get the prefix; without it a
            # line start looks the same in training and at inference.
            add_dummy_prefix=False,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,  # errors only; training is chatty on stderr otherwise
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training failed (vocab_size={vocab_size}, {len(files)} input files): "
            f"{_spm_message(e)}"
        ) from e

    data = model_proto.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    # Same "piece<TAB>score" listing SentencePiece writes itself; for humans only.
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_path = out.with_name(out.name + ".model")
    _atomic_write(out.with_name(out.name + ".vocab"), vocab.encode("utf-8"))
    _atomic_write(model_path, data)  # last: a .model file means training finished
    return model_path


def _atomic_write(path: Path, data: bytes) -> None:
    # Write next to the target, then rename: readers never see a partial file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _spm_message(e: RuntimeError) -> str:
    # "INTERNAL: src/trainer_interface.cc(638) [cond] Readable text." -> "Readable text."
    msg = str(e)
    if "sentences_.empty()" in msg:
        return "the input files contain no non-empty lines"
    m = re.search(r"\] (.+)$", msg, re.S)
    return m.group(1).strip() if m else msg
