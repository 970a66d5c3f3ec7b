import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

import multitoken.tokenizer
from multitoken.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    Tokenizer,
    _input_files,
    load_tokenizer,
    train_sentencepiece,
)

VOCAB = 1000
SPACE = "\u2581"  # SentencePiece's whitespace symbol (escaped: this file must round-trip)
STDLIB = Path(os.__file__).parent


def stdlib_files(budget: int = 300_000) -> tuple[list[Path], Path]:
    """The first top-level stdlib *.py files (sorted) totalling ~budget bytes, plus the next one."""
    files, total = [], 0
    for f in sorted(STDLIB.glob("*.py")):
        if total >= budget:
            return files, f  # held out: not seen in training
        files.append(f)
        total += f.stat().st_size
    raise AssertionError("stdlib too small")


@pytest.fixture(scope="module")
def corpus() -> tuple[list[Path], Path]:
    return stdlib_files()


@pytest.fixture(scope="module")
def model_path(corpus, tmp_path_factory) -> Path:
    return train_sentencepiece(corpus[0], VOCAB, tmp_path_factory.mktemp("sp") / "code", num_threads=2)


@pytest.fixture(scope="module")
def sp_tok(model_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model_path)


@pytest.fixture(scope="module")
def llama_style_tok(corpus, tmp_path_factory) -> SentencePieceTokenizer:
    # Llama 2's tokenizer.model adds a dummy U+2581 (space) prefix that decode() strips again.
    prefix = tmp_path_factory.mktemp("llama") / "llama"
    lines = (line for f in corpus[0] for line in f.read_text("utf-8").splitlines() if line)
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(prefix), model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    return SentencePieceTokenizer(f"{prefix}.model")


SNIPPETS = [
    "",
    "x",
    " leading space",
    "trailing space   ",
    "def f(x):\n    return x + 1\n",
    "class A:\n\tdef m(self):\n\t\tpass\n\n\n\tdef n(self): ...\n",  # tabs, blank lines
    "if x:\n        y = [1, 2,\n             3]\n    \n  \nz = 0\n",  # odd indentation, whitespace-only lines
    "n = 1234567890 + 0x1F - 3.14e-10\n",
    "s = 'héllo → 世界 🙂'  # ünïcödé\n",
    "windows\r\nline\r\nendings\r\n",
    "nul\x00 and bell\x07 and form feed\x0c\n",
    "\ufeff# BOM\nimport os\n",
    "a\u00a0b\u2003c\u3000d",  # non-ASCII spaces must not be normalised
    "ﬁ ＡＢＣ ①",  # NFKC would change these
    "\n\n\n",
]


@pytest.mark.parametrize("text", SNIPPETS)
def test_sentencepiece_round_trip(sp_tok, text):
    ids = sp_tok.encode(text, bos=False, eos=False)
    assert sp_tok.decode(ids) == text


def test_round_trip_unseen_files(sp_tok, corpus):
    for f in (corpus[1], Path(__file__)):
        text = f.read_text("utf-8")
        ids = sp_tok.encode(text, bos=True, eos=True)
        assert sp_tok.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8")) / 1.5, "BPE should compress code"


def test_special_ids_and_vocab(sp_tok):
    assert (sp_tok.n_words, sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (VOCAB, 1, 2, -1)
    assert [sp_tok.sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert sp_tok.sp.unk_id() == 0
    assert isinstance(sp_tok, Tokenizer) and isinstance(ByteTokenizer(), Tokenizer)


def test_bos_eos_flags(sp_tok):
    body = sp_tok.encode("print(1)", bos=False, eos=False)
    assert body and 1 not in body and 2 not in body
    assert sp_tok.encode("print(1)", bos=True, eos=False) == [1] + body
    assert sp_tok.encode("print(1)", bos=False, eos=True) == body + [2]
    assert sp_tok.encode("print(1)", bos=True, eos=True) == [1] + body + [2]
    assert sp_tok.encode("", bos=True, eos=True) == [1, 2]
    assert sp_tok.decode([1] + body + [2]) == "print(1)"


def pieces(tok: SentencePieceTokenizer, text: str) -> list[str]:
    return [tok.sp.id_to_piece(i) for i in tok.encode(text, bos=False, eos=False)]


def test_digits_are_split(sp_tok):
    ps = pieces(sp_tok, "x = 12345 + 2024 * 1000000\n")
    assert sum(p.strip(SPACE).isdigit() for p in ps) == 16  # one piece per digit
    for p in ps:
        if not p.startswith("<0x"):  # byte pieces like <0x0A> spell out hex digits
            assert sum(c.isdigit() for c in p) <= 1, p


def test_code_pieces(sp_tok):
    # Indentation runs are single whitespace-only pieces; newlines and tabs are byte pieces.
    ps = pieces(sp_tok, "    return self\n        pass\n\tx")
    assert ps[0] == SPACE * 4
    assert SPACE * 8 in ps
    assert ps.count("<0x0A>") == 2 and "<0x09>" in ps
    # No dummy prefix: a line start encodes the same way at the start of the text as after "\n".
    first = sp_tok.encode("import os", bos=False, eos=False)
    later = sp_tok.encode("\nimport os", bos=False, eos=False)
    assert later[1:] == first


def test_literal_whitespace_marker_is_a_space(sp_tok):
    # Known SentencePiece limitation: U+2581 is its space symbol, so it decodes as " ".
    assert sp_tok.decode(sp_tok.encode(f"a{SPACE}b", bos=False, eos=False)) == "a b"


@pytest.mark.parametrize("which, bad", [("sp", VOCAB), ("sp", 10**6), ("sp", -1), ("byte", 259), ("byte", -1)])
def test_decode_out_of_range(sp_tok, which, bad):
    tok = sp_tok if which == "sp" else ByteTokenizer()
    with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
        tok.decode([5, bad])


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (256, 257, 258, 259)
    text = "héllo → 世界 🙂\n\tx = 1"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 256 and ids[-1] == 257 and ids[1:-1] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([258, 104, 258, 105, 257]) == "hi"  # specials dropped
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"  # invalid UTF-8 doesn't crash


def test_load_tokenizer_dispatch(model_path, tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    tok = load_tokenizer(model_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.n_words == VOCAB
    assert isinstance(load_tokenizer(str(model_path)), SentencePieceTokenizer)
    # A checkpoint directory holding tokenizer.model, as in Meta's releases.
    (tmp_path / "tokenizer.model").write_bytes(model_path.read_bytes())
    assert load_tokenizer(tmp_path).n_words == VOCAB


def test_load_tokenizer_errors(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope") as e:
        load_tokenizer(tmp_path / "nope" / "tok.json")
    assert "byte" in str(e.value) and ".model" in str(e.value)
    other = tmp_path / "tokenizer.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="byte") as e:
        load_tokenizer(other)
    assert ".model" in str(e.value) and str(other) in str(e.value)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="corrupt.model.*not a valid SentencePiece model"):
        load_tokenizer(corrupt)


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


STREAM_TEXT = "héllo → 世界 🙂\n    def f(x):\n\treturn 42  # ok ✓\n"


def test_stream_decoder_bytes():
    tok = ByteTokenizer()
    ids = tok.encode(STREAM_TEXT, bos=True, eos=True)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == STREAM_TEXT
    # Partial characters are held back, never printed as U+FFFD.
    assert not any("\ufffd" in c for c in chunks)
    assert "世" in chunks and "🙂" in chunks
    # Genuinely invalid bytes come out (at the latest) on flush.
    bad = [104, 0xE4, 0xB8]
    assert "".join(stream(tok, bad)) == tok.decode(bad) == "h\ufffd"
    assert stream(tok, bad)[-1] == "\ufffd"


@pytest.mark.parametrize("which", ["code", "llama_style"])
def test_stream_decoder_sentencepiece(sp_tok, llama_style_tok, which):
    tok = sp_tok if which == "code" else llama_style_tok
    for text in [STREAM_TEXT, " leading", "x", "   ", *SNIPPETS]:
        ids = tok.encode(text, bos=True, eos=False)
        chunks = stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids) == text
        if text == STREAM_TEXT:
            assert not any("\ufffd" in c for c in chunks)  # 世 etc. are byte-fallback pieces


def test_input_files(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    for name in ["pkg/b.py", "pkg/a.py", "pkg/sub/c.py", "pkg/notes.txt", "data.txt"]:
        (tmp_path / name).write_text("x = 1\n")
    got = _input_files([tmp_path / "pkg", tmp_path / "data.txt"])
    assert got == [tmp_path / p for p in ["pkg/a.py", "pkg/b.py", "pkg/sub/c.py", "data.txt"]]
    with pytest.raises(FileNotFoundError, match="missing.py"):
        _input_files([tmp_path / "missing.py"])


def test_train_no_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece([empty], 500, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing"):
        train_sentencepiece([tmp_path / "missing"], 500, tmp_path / "out")
    blank = tmp_path / "blank.py"
    blank.write_text("\n\n")
    with pytest.raises(ValueError, match="no non-empty lines"):
        train_sentencepiece([blank], 500, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.py", "empty"]


@pytest.mark.parametrize(
    "vocab_size, message",
    [
        (100, "at least 259"),
        (300, "smaller than required_chars"),  # fails inside SentencePiece: 259 + corpus chars needed
        (100_000, "too high"),  # the corpus can't supply that many merges
    ],
)
def test_train_bad_vocab_leaves_no_files(corpus, tmp_path, vocab_size, message):
    inputs = corpus[0][:3]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.model").write_bytes(b"previous model")
    with pytest.raises(ValueError, match=message) as e:
        train_sentencepiece(inputs, vocab_size, out / "tok", num_threads=2)
    assert "INTERNAL" not in str(e.value) and ".cc(" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["old.model"]  # no partial or temp files

    # A failed retrain over an existing model keeps the old model intact.
    with pytest.raises(ValueError):
        train_sentencepiece(inputs, vocab_size, out / "old", num_threads=2)
    assert (out / "old.model").read_bytes() == b"previous model"


def test_train_outputs_and_determinism(corpus, model_path, tmp_path):
    vocab_lines = model_path.with_suffix(".vocab").read_text("utf-8").splitlines()
    assert len(vocab_lines) == VOCAB and vocab_lines[1] == "<s>\t0"
    # Same inputs, different destination -> byte-identical files.
    again = train_sentencepiece(corpus[0], VOCAB, tmp_path / "nested" / "again", num_threads=2)
    assert again == tmp_path / "nested" / "again.model"
    assert again.read_bytes() == model_path.read_bytes()
    assert again.with_suffix(".vocab").read_bytes() == model_path.with_suffix(".vocab").read_bytes()
    assert sorted(p.name for p in again.parent.iterdir()) == ["again.model", "again.vocab"]


def test_train_sampling_is_deterministic(corpus, tmp_path):
    # Fewer sentences allowed than the corpus has: SentencePiece samples them at random.
    a = train_sentencepiece(corpus[0], 600, tmp_path / "a", input_sentence_size=2000, num_threads=2)
    b = train_sentencepiece(corpus[0], 600, tmp_path / "b", input_sentence_size=2000, num_threads=2)
    assert a.read_bytes() == b.read_bytes()


def test_train_deterministic_across_processes(corpus, model_path, tmp_path):
    # A fresh interpreter has fresh global RNG state: the model must not depend on it.
    out = tmp_path / "proc"
    code = (
        "import sys; from pathlib import Path; from multitoken.tokenizer import train_sentencepiece; "
        "train_sentencepiece([Path(a) for a in sys.argv[3:]], int(sys.argv[1]), sys.argv[2], num_threads=2)"
    )
    src = Path(multitoken.tokenizer.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", code, str(VOCAB), str(out), *map(str, corpus[0])]
    subprocess.run(args, check=True, env=env, timeout=60)
    assert out.with_suffix(".model").read_bytes() == model_path.read_bytes()


# --- Hugging Face tokenizer.json backend ---------------------------------------


@pytest.fixture(scope="module")
def hf_tok_dir(corpus, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2/Llama 3 style) trained here, specials named in tokenizer_config."""
    import json

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in corpus[0][:5]], trainer)
    folder = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(folder / "tokenizer.json"))
    # Older configs spell a special token as a dict: both forms must work.
    config = {"bos_token": "<|bos|>", "eos_token": {"content": "<|eos|>", "lstrip": False}, "pad_token": "<|pad|>",
              "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_hf_tokenizer_round_trip_and_special_ids(hf_tok_dir):
    from multitoken.tokenizer import HFTokenizer

    tok = load_tokenizer(hf_tok_dir)  # a folder holding tokenizer.json
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (0, 1, 2, 600)
    for text in SNIPPETS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 0 and ids[-1] == 1 and 0 not in ids[1:-1]
        assert tok.decode(ids) == text  # byte-level: every string round-trips, specials dropped
    assert tok.encode("x = 1", bos=False, eos=False) == tok.encode("x = 1", bos=True, eos=False)[1:]
    assert "".join(stream(tok, tok.encode(STREAM_TEXT, bos=True, eos=False))) == STREAM_TEXT
    with pytest.raises(ValueError, match="token id 600 is out of range"):
        tok.decode([600])


def test_hf_tokenizer_adds_bos_only_when_the_model_uses_one(hf_tok_dir, tmp_path):
    import json

    (tmp_path / "tokenizer.json").write_bytes((hf_tok_dir / "tokenizer.json").read_bytes())
    config = json.loads((hf_tok_dir / "tokenizer_config.json").read_text())
    # No add_bos_token and a post-processor that adds nothing (SmolLM2): no BOS, though one is named.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "add_bos_token"}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 0 and tok.encode("x = 1", bos=True, eos=False) == tok.encode("x = 1", bos=False, eos=False)
    # A post-processor that prepends BOS (Llama's tokenizer.json) says the model uses one.
    from tokenizers import Tokenizer as HF, processors

    raw = HF.from_file(str(tmp_path / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    raw.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("x = 1", bos=True, eos=False)[0] == 0


def test_hf_tokenizer_without_config_has_no_specials(hf_tok_dir, tmp_path):
    (tmp_path / "tok.json").write_bytes((hf_tok_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path / "tok.json")  # any .json file name
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (-1, -1, -1)
    assert tok.encode("hi", bos=True, eos=True) == tok.encode("hi", bos=False, eos=False)  # nothing to add


def test_folder_with_both_tokenizers_prefers_sentencepiece(hf_tok_dir, model_path, tmp_path):
    # Hugging Face Llama 2 folders ship both; tokenizer.model is the original.
    for src in (hf_tok_dir / "tokenizer.json", model_path):
        (tmp_path / ("tokenizer.json" if src.suffix == ".json" else "tokenizer.model")).write_bytes(src.read_bytes())
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
