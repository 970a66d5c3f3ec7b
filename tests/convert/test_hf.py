"""Hugging Face Llama folders <-> our checkpoints, checked against transformers' own forward."""

import json
import shutil

import pytest
import torch

from conftest import random_model, tiny_args
from multitoken.checkpoint import load_model, save_model
from multitoken.cli import main
from multitoken.convert.hf import MTP_HEADS_FILE, ffn_params, from_hf, to_hf
from multitoken.model import ModelArgs
from multitoken.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")


def hf_llama(tied: bool, **overrides) -> "transformers.LlamaForCausalLM":
    """A random LlamaForCausalLM with GQA and a feed-forward width our default rounding cannot give."""
    config = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5e5,
                  tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # far from uniform logits, random norms: a wrong permutation or norm shows
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.1)
    return model


def write_tokenizer_json(folder):
    """A tiny word-level tokenizer.json with <s>/</s> named in tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "def", "f"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])  # marked special, as real tokenizer.json files do
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shards", [1, 2])
def test_from_hf_matches_transformers_logits(tmp_path, tied, shards):
    hf = hf_llama(tied)
    src = tmp_path / "hf"
    # Shards fill greedily up to the limit: half the bytes plus the largest tensor makes exactly two.
    sizes = [p.numel() * p.element_size() for p in hf.parameters()]
    hf.save_pretrained(src, max_shard_size=sum(sizes) // 2 + max(sizes) if shards == 2 else "1GB")
    assert len(list(src.glob("*.safetensors"))) == shards
    assert (src / "model.safetensors.index.json").is_file() == (shards == 2)
    write_tokenizer_json(src)

    out = from_hf(src, tmp_path / "ours")
    params = json.loads((out / "params.json").read_text())
    assert params["n_future_tokens"] == 1 and params["n_kv_heads"] == 2 and params["rope_theta"] == 5e5
    model = load_model(out, max_seq_len=64, max_batch_size=2)
    assert model.args.ffn_hidden_dim == 176
    tokens = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[:, :, 0], hf(tokens).logits, atol=1e-4, rtol=0)
    # Tied: an untied copy, equal to the embeddings.
    assert torch.equal(model.output.weight, model.tok_embeddings.weight) == tied

    tok = load_tokenizer(out)  # the folder: its tokenizer.json was carried along
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, -1, 7)
    assert tok.encode("hello world", bos=True, eos=True) == [1, 3, 4, 2]
    assert tok.decode([1, 5, 6, 2]) == "def f"


def test_to_hf_and_back_restores_the_mtp_model_bit_for_bit(tmp_path, tiny_ckpt):
    """n=3 with GQA: transformers runs the next-token model; the extra heads come back unchanged."""
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    main(["convert", "--to-hf", str(tiny_ckpt), "--out", str(hf_dir)])
    assert {"config.json", "model.safetensors", MTP_HEADS_FILE, "tokenizer.model"} <= {p.name for p in hf_dir.iterdir()}

    ours = load_model(tiny_ckpt, max_seq_len=64, max_batch_size=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_hidden_layers == 3
    tokens = torch.randint(0, 512, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[:, :, 0], hf(tokens).logits, atol=1e-4, rtol=0)

    from safetensors import safe_open

    with safe_open(hf_dir / MTP_HEADS_FILE, framework="pt") as f:
        meta = f.metadata()
        assert (meta["format"], meta["n_future_tokens"]) == ("multitoken-meta", "3")
        assert json.loads(meta["params"]) == json.loads((tiny_ckpt / "params.json").read_text())
        assert sorted(f.keys()) == sorted(k for k in ours.state_dict() if k.startswith("extra_heads."))

    main(["convert", "--from-hf", str(hf_dir), "--out", str(back)])
    assert json.loads((back / "params.json").read_text()) == json.loads((tiny_ckpt / "params.json").read_text())
    restored = load_model(back, max_seq_len=64).state_dict()
    original = ours.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) and restored[k].dtype == original[k].dtype for k in original)
    assert isinstance(load_tokenizer(back), SentencePieceTokenizer)


def test_to_hf_plain_model_writes_no_heads_file_and_keeps_bfloat16(tmp_path):
    ckpt = save_model(random_model(tiny_args(n_future_tokens=1), dtype=torch.bfloat16), tmp_path / "ckpt")
    hf_dir = to_hf(ckpt, tmp_path / "hf")
    assert not (hf_dir / MTP_HEADS_FILE).exists()
    back = load_model(from_hf(hf_dir, tmp_path / "back"), max_seq_len=8).state_dict()
    original = load_model(ckpt, max_seq_len=8).state_dict()
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("dim,hidden", [(4096, 11008), (4096, 14336), (576, 1536), (64, 176), (64, 100), (960, 2560)])
def test_ffn_params_reproduce_intermediate_size_exactly(dim, hidden):
    multiple_of, mult = ffn_params(dim, hidden)
    assert ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=mult).ffn_hidden_dim == hidden
    if (dim, hidden) == (4096, 11008):
        assert (multiple_of, mult) == (256, None)  # Llama's own values when they fit


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, r"unsupported model_type 'mistral'.*supported: llama"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None}, r"rope scaling 'llama3'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 32}, r"head_dim=32 != hidden_size/num_attention_heads=16"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_from_hf_rejects_unsupported_configs(tmp_path, change, message):
    src = tmp_path / "hf"
    hf_llama(tied=False).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        from_hf(src, tmp_path / "out")
    assert not (tmp_path / "out" / "params.json").exists()


def test_from_hf_missing_files_are_named(tmp_path, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    with pytest.raises(SystemExit, match="no config.json in .*hf"):
        main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "out")])
    hf_llama(tied=True).save_pretrained(src)
    for f in src.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights.*pytorch_model.bin"):
        from_hf(src, tmp_path / "out")
    with pytest.raises(SystemExit, match="checkpoint folder not found"):
        main(["convert", "--to-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("dummy_prefix", [False, True], ids=["code-style", "llama2-style"])
def test_to_hf_sentencepiece_tokenizer_encodes_like_ours_in_transformers(tmp_path, dummy_prefix):
    pytest.importorskip("google.protobuf")  # transformers reads a tokenizer.model through protobuf
    import sentencepiece as spm

    from conftest import stdlib_sources

    lines = (line for f in stdlib_sources(100_000) for line in f.read_text("utf-8").splitlines() if line)
    ckpt = save_model(random_model(tiny_args(n_future_tokens=1, vocab_size=400)), tmp_path / "ckpt")
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(ckpt / "tokenizer"), model_type="bpe", vocab_size=400,
        byte_fallback=True, add_dummy_prefix=dummy_prefix, normalization_rule_name="identity",
        remove_extra_whitespaces=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    hf_dir = to_hf(ckpt, tmp_path / "hf")
    ours = load_tokenizer(hf_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    # Not text that starts with a space: with a dummy prefix, transformers' Metaspace adds none before
    # an existing space where SentencePiece does (a transformers difference, docs/interop.md).
    for text in ["def f(x):\n    return x + 1\n", "hello  world\tagain", "x = {'a': 1}"]:
        assert theirs(text)["input_ids"] == ours.encode(text, bos=True, eos=False)
