"""GGUF (llama.cpp) Llama models to our Meta format: one key-map table, dequantization, no permutation.

llama.cpp's names come from Meta's, and so does its layout: its converter permutes Hugging Face's
wq/wk rows back into Meta's interleaved rotary pairs (ggml's "normal" rope rotates adjacent pairs),
which is why transformers' GGUF loader permutes them to rotate-half on the way in. So a GGUF attn_q /
attn_k is already our wq / wk, row for row (checked against transformers on SmolLM2).
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from multitoken.convert.hf import ffn_params, save_checked
from multitoken.model import ModelArgs

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF name -> Meta name; "{i}" is the block index.
KEY_MAP = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), m) for g, m in KEY_MAP.items()]


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'multitoken[hf]'") from e
    return gguf


def meta_key(gguf_key: str) -> str | None:
    for pattern, meta in _PATTERNS:
        if m := pattern.match(gguf_key):
            return meta.format(i=m.group(1)) if m.groups() else meta
    return None


@functools.cache
def can_dequantize(qtype) -> bool:
    """Whether the installed gguf package dequantizes this type (tried on one zero block: the
    package has no public list, and its coverage grows between versions)."""
    gguf = _gguf()
    _, size = gguf.GGML_QUANT_SIZES[qtype]  # bytes per block
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _field(reader, key: str, default=...):
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def args_from_gguf(reader, path: Path) -> ModelArgs:
    """ModelArgs from the GGUF metadata, or a ValueError naming what our model cannot reproduce."""
    arch = _field(reader, "general.architecture", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path.name}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    dim = _field(reader, f"{arch}.embedding_length")
    n_heads = _field(reader, f"{arch}.attention.head_count")
    names = {t.name for t in reader.tensors}
    problems = []
    if _field(reader, f"{arch}.expert_count", 0):
        problems.append(f"mixture of experts (expert_count={_field(reader, f'{arch}.expert_count')})")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:  # rope_freqs: Llama 3.1's frequency scaling
        problems.append(f"rope scaling {scaling if scaling != 'none' else 'rope_freqs'!r} (only plain RoPE)")
    rot = _field(reader, f"{arch}.rope.dimension_count", dim // n_heads)
    if rot != dim // n_heads:
        problems.append(f"rope.dimension_count={rot} != head_dim={dim // n_heads} (partial rotary)")
    if problems:
        raise ValueError(f"{path.name}: unsupported Llama variant: " + "; ".join(problems))
    multiple_of, ffn_dim_multiplier = ffn_params(dim, _field(reader, f"{arch}.feed_forward_length"))
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError(f"{path.name} has no token_embd.weight tensor")
    return ModelArgs(
        dim=dim,
        n_layers=_field(reader, f"{arch}.block_count"),
        n_heads=n_heads,
        n_kv_heads=_field(reader, f"{arch}.attention.head_count_kv", n_heads),
        vocab_size=int(embd.shape[-1]),  # GGUF lists dimensions innermost first: (dim, vocab)
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_dim_multiplier,
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
    )


def _check_types(reader, path: Path) -> None:
    gguf = _gguf()
    bad: dict[str, list[str]] = {}
    for t in reader.tensors:
        if not can_dequantize(t.tensor_type):
            bad.setdefault(t.tensor_type.name, []).append(t.name)
    if bad:
        from importlib.metadata import version

        ok = [q.name for q in gguf.GGMLQuantizationType if q in gguf.GGML_QUANT_SIZES and can_dequantize(q)]
        found = "; ".join(f"{q} ({len(v)} tensors, e.g. {v[0]})" for q, v in bad.items())
        raise ValueError(
            f"{path.name}: the gguf package ({version('gguf')}) cannot dequantize tensor type {found}. "
            f"Types it can dequantize: {', '.join(ok)}"
        )


def from_gguf(path: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a GGUF Llama model (any tensor type the gguf package can dequantize) to our format,
    with its tokenizer rebuilt from the GGUF vocabulary as tokenizer.json (needs transformers)."""
    gguf = _gguf()
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)  # memory-maps the file: tensors are read one at a time below
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from None
    args = args_from_gguf(reader, path)
    _check_types(reader, path)

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        key = meta_key(t.name)
        if key is None:
            raise ValueError(f"{path.name}: tensor {t.name!r} is not part of a plain Llama model")
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        if not array.flags.writeable:  # unquantized tensors come back as views of the read-only map
            array = array.copy()
        shape = tuple(int(n) for n in reversed(t.shape))
        state[key] = torch.from_numpy(array).reshape(shape).to(dtype)
    if "output.weight" not in state:  # llama.cpp omits the output projection of tied models
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    save_checked(args, state, out, path)
    del state
    if "tokenizer.ggml.tokens" in reader.fields:
        write_tokenizer(path, out)
    return out


def write_tokenizer(path: Path, out: Path) -> list[str]:
    """tokenizer.json + tokenizer_config.json rebuilt from the GGUF vocabulary, merges and special ids
    by transformers' GGUF tokenizer conversion (it knows llama.cpp's tokenizer types and
    pre-tokenizer variants); written to a temporary folder, then renamed into `out`."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("rebuilding a GGUF tokenizer needs transformers: pip install 'multitoken[hf]'") from e
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    names = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer.") as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, out / f.name)
            names.append(f.name)
    return names
