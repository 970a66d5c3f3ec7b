import json

import numpy as np
import pytest

from multitoken.tokenizer import ByteTokenizer, load_tokenizer
from multitoken.train.data import (HELD_OUT_MODULES, TokenData, default_corpus, held_out_corpus, load_data,
                                   stdlib_root, tokenize_to_cache)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "src"
    (d / "pkg").mkdir(parents=True)
    (d / "a.py").write_text("def a():\n    return 1\n" * 3)
    (d / "pkg" / "b.py").write_text("class B:\n    pass\n" * 4)
    (d / "notes.txt").write_text("not python")
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"text": "héllo world"}) + "\n\n" + json.dumps({"text": "second doc", "id": 2}) + "\n")
    return d, jl


def test_files_directories_and_jsonl_become_one_packed_stream(corpus, tmp_path):
    d, jl = corpus
    tok = ByteTokenizer()
    tokens_path, docs_path = tokenize_to_cache(
        [d / "a.py", d / "pkg" / "b.py", jl], tok, tmp_path / "cache", progress=False)
    tokens, starts = np.load(tokens_path), np.load(docs_path)
    texts = [(d / "a.py").read_text(), (d / "pkg" / "b.py").read_text(), "héllo world", "second doc"]
    expected = [i for t in texts for i in tok.encode(t, bos=True, eos=True)]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert starts.tolist()[-1] == len(expected) and len(starts) == 5
    # A directory is searched recursively with the glob; .txt files are not picked by the default *.py.
    data = load_data([d, jl], tok, seq_len=8, cache_dir=tmp_path / "cache", progress=False, val_fraction=0)
    assert data.n_docs == 4
    data_txt = load_data([d], tok, seq_len=4, glob="*.txt", cache_dir=tmp_path / "cache", progress=False,
                         val_fraction=0)
    assert data_txt.n_docs == 1


def test_a_second_run_reads_the_cache_and_a_changed_file_retokenises(corpus, tmp_path, monkeypatch):
    d, _ = corpus
    tok = ByteTokenizer()
    first = load_data([d], tok, seq_len=8, cache_dir=tmp_path / "c", progress=False)
    calls = []
    monkeypatch.setattr(ByteTokenizer, "encode", lambda self, s, bos, eos: calls.append(s) or [1, 2])
    second = load_data([d], tok, seq_len=8, cache_dir=tmp_path / "c", progress=False)
    assert calls == [] and np.array_equal(first.tokens, second.tokens)
    assert isinstance(second.tokens, np.memmap)
    (d / "a.py").write_text("changed = True\n" * 10)
    load_data([d], tok, seq_len=2, cache_dir=tmp_path / "c", progress=False, val_fraction=0)
    assert len(calls) == 2  # both files again: the key covers the whole list


def test_cache_key_covers_the_tokenizer_file(corpus, tmp_path, sp_model_path):
    d, _ = corpus
    a = tokenize_to_cache([d / "a.py"], ByteTokenizer(), tmp_path, progress=False)
    b = tokenize_to_cache([d / "a.py"], load_tokenizer(sp_model_path), tmp_path, progress=False)
    assert a[0] != b[0]
    assert np.load(b[0])[0] == 1  # SentencePiece BOS


def test_vocabularies_above_65536_use_uint32(corpus, tmp_path):
    class Big(ByteTokenizer):
        n_words = 70_000

    tokens_path, _ = tokenize_to_cache([corpus[0] / "a.py"], Big(), tmp_path, progress=False)
    assert np.load(tokens_path).dtype == np.uint32


def _synthetic(tmp_path, n_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n_docs):
        f = tmp_path / "d" / f"{i:03d}.py"
        f.parent.mkdir(exist_ok=True)
        f.write_text("x" * int(rng.integers(5, 60)))
        files.append(f)
    return tokenize_to_cache(files, ByteTokenizer(), tmp_path / "cache", progress=False)


def test_validation_documents_are_held_out_and_the_split_is_deterministic(tmp_path):
    paths = _synthetic(tmp_path)
    data, again = TokenData(*paths, seq_len=7, val_fraction=0.1), TokenData(*paths, seq_len=7, val_fraction=0.1)
    starts = np.load(paths[1])
    assert data.n_val_docs == 4 and len(data.val) > 0
    assert np.array_equal(data.train.starts, again.train.starts)
    # Rebuild the validation documents' token ranges and check no training window touches them.
    val_tokens = np.asarray(data.val.tokens)
    val_docs = [d for d in range(40) if bytes(data.tokens[starts[d]:starts[d + 1]]) in bytes(val_tokens)]
    assert len(val_docs) >= 4
    covered = np.zeros(len(data.tokens), bool)
    for s in data.train.starts:
        covered[s : s + 8] = True
    true_val = [d for d in range(40) if not covered[starts[d]:starts[d + 1]].any()]
    assert len(true_val) >= 4
    assert sum(starts[d + 1] - starts[d] for d in true_val if d in val_docs) == len(val_tokens)
    inputs, labels = next(data.val_batches(2, 1))
    assert inputs.shape == (2, 7) and (inputs[:, 1:] == labels[:, :-1]).all()


def test_shuffling_is_deterministic_by_seed_and_each_epoch_covers_every_window_once(tmp_path):
    data = TokenData(*_synthetic(tmp_path), seq_len=7)
    n = len(data.train)
    assert n > 20
    epoch = data.train_indices(seed=1, position=0, count=n)
    assert sorted(epoch.tolist()) == list(range(n))
    two = data.train_indices(seed=1, position=n - 3, count=6)  # crosses into epoch 2
    assert two[:3].tolist() == epoch[-3:].tolist() and not np.array_equal(two[3:], epoch[:3])
    assert np.array_equal(data.train_indices(1, 5, 4), epoch[5:9])
    assert not np.array_equal(data.train_indices(2, 0, n), epoch)
    x, y = data.train_batch(seed=1, position=5, batch_size=4)
    assert x.shape == (4, 7) and x.dtype.is_floating_point is False and (x[:, 1:] == y[:, :-1]).all()


def test_the_default_corpus_is_the_standard_library_without_tests():
    files = default_corpus()
    root = stdlib_root()
    rel = {f.relative_to(root).as_posix() for f in files}
    assert "os.py" in rel and "json/decoder.py" in rel
    assert not any(part in ("test", "tests", "idle_test", "site-packages")
                   for r in rel for part in r.split("/")[:-1])
    # The held-out modules are the validation set and never training data.
    held = held_out_corpus()
    assert [f.stem for f in held] == list(HELD_OUT_MODULES)
    assert not set(held) & set(files)


def test_val_data_is_a_separate_corpus_and_must_not_overlap_the_training_data(corpus, tmp_path):
    d, jl = corpus
    tok = ByteTokenizer()
    data = load_data([d], tok, seq_len=4, cache_dir=tmp_path / "c", progress=False, val_data=[jl])
    assert data.n_docs == 2 and data.n_val_docs == 2  # every training document kept, both jsonl lines held out
    val_text = tok.decode([t for t in np.asarray(data.val.tokens).tolist() if t < 256])
    assert val_text == "héllo worldsecond doc"
    with pytest.raises(ValueError, match="also training data.*a.py.*keep --val-data apart"):
        load_data([d], tok, seq_len=4, cache_dir=tmp_path / "c", progress=False, val_data=[d / "a.py"])


def test_missing_or_empty_data_give_clear_errors(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(FileNotFoundError, match="training data not found: .*nope"):
        load_data([tmp_path / "nope"], tok, 8, cache_dir=tmp_path / "c", progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no files matching '\\*.py' under .*empty_dir"):
        load_data([tmp_path / "empty_dir"], tok, 8, cache_dir=tmp_path / "c", progress=False)
    (tmp_path / "empty.py").write_text("")
    with pytest.raises(ValueError, match="training data is empty"):
        load_data([tmp_path / "empty.py"], tok, 8, cache_dir=tmp_path / "c", progress=False)
    (tmp_path / "small.py").write_text("ab")
    with pytest.raises(ValueError, match="too small .* lower --seq-len"):
        load_data([tmp_path / "small.py"], tok, 8, cache_dir=tmp_path / "c", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: .*'text'.*--text-field"):
        load_data([tmp_path / "bad.jsonl"], tok, 8, cache_dir=tmp_path / "c", progress=False)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "c").iterdir())
