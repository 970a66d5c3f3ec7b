"""Hugging Face `LlamaForCausalLM` <-> Meta layout: one key-map table plus the rotary row permutation.

Meta's rotary embedding rotates interleaved pairs (2i, 2i+1) of each head; Hugging Face rotates the
two halves (i, i + head_dim/2). Permuting the rows of wq and wk turns one convention into the other.
A multi-token model exports as a plain Llama per prediction head: the trunk plus that head as the
last layer (head 0 gives the next-token model).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from multitoken.checkpoint import _atomic_write, load_model, save_model
from multitoken.model import ModelArgs, Transformer
from multitoken.tokenizer import load_tokenizer

# Meta name -> Hugging Face name; "{i}" is the block index.
KEY_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Meta wq/wk (interleaved rotary pairs) in Hugging Face's rotate-half order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_llama_config(args: ModelArgs):
    """The transformers LlamaConfig of one prediction head's plain-Llama export."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers - args.n_future_tokens + 1,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )


def head_to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs, head: int = 0) -> dict[str, torch.Tensor]:
    """Trunk + prediction head `head` of a Meta state dict, as a Hugging Face Llama state dict."""
    n_trunk = args.n_layers - args.n_future_tokens
    if not 0 <= head < args.n_future_tokens:
        raise ValueError(f"head must be in [0, {args.n_future_tokens}), got {head}")
    head_prefix = f"layers.{n_trunk}." if head == 0 else f"extra_heads.{head - 1}."
    out = {}
    for key, tensor in state.items():
        if key.startswith("layers.") and int(key.split(".")[1]) < n_trunk:
            i, rest = int(key.split(".")[1]), key.split(".", 2)[2]
        elif key.startswith(head_prefix):
            i, rest = n_trunk, key[len(head_prefix):]
        elif key.startswith(("layers.", "extra_heads.")):
            continue  # another head
        else:
            out[KEY_MAP[key]] = tensor
            continue
        if rest == "attention.wq.weight":
            tensor = permute_to_hf(tensor, args.n_heads)
        elif rest == "attention.wk.weight":
            tensor = permute_to_hf(tensor, args.n_kv_heads)
        out[KEY_MAP["layers.{i}." + rest].format(i=i)] = tensor
    return out


# --- Hugging Face folder <-> our checkpoint folder ------------------------------------------------

SUPPORTED_MODEL_TYPES = ("llama",)
MTP_HEADS_FILE = "mtp_heads.safetensors"  # the extra heads of an exported MTP model, in Meta naming
MTP_FORMAT = "multitoken-meta"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_IGNORED_HF_KEYS = ("model.rotary_emb.inv_freq",)  # older transformers saved the rotary table

# Hugging Face name pattern -> Meta name template, from KEY_MAP (block index captured as "{i}").
_FROM_HF = [
    (re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), meta) for meta, hf in KEY_MAP.items()
]


def meta_key(hf_key: str) -> str | None:
    """Our name of a Hugging Face Llama tensor, or None when it is not one of KEY_MAP's."""
    for pattern, meta in _FROM_HF:
        if m := pattern.match(hf_key):
            return meta.format(i=m.group(1)) if m.groups() else meta
    return None


def ffn_params(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which ModelArgs.ffn_hidden_dim gives exactly `hidden_dim`.

    Llama's own values when they fit (256, no multiplier: Llama 2 7B's 11008); otherwise
    multiple_of = hidden_dim, so anything in (0, hidden_dim] rounds up to it, scaled into that range
    by a multiplier if 2/3 * 4 * dim is larger."""
    base = int(2 * (4 * dim) / 3)
    for multiple_of, mult in ((256, None), (hidden_dim, None), (hidden_dim, hidden_dim / base)):
        args = ModelArgs(dim=dim, n_heads=1, n_layers=1, multiple_of=multiple_of, ffn_dim_multiplier=mult)
        if args.ffn_hidden_dim == hidden_dim:
            return multiple_of, mult
    raise ValueError(f"no multiple_of/ffn_dim_multiplier reproduces intermediate_size={hidden_dim} for dim={dim}")


def args_from_hf_config(config: dict, n_future_tokens: int = 1) -> ModelArgs:
    """ModelArgs of a Hugging Face Llama config.json (raw dict: no transformers needed), or a ValueError
    naming every setting our model cannot reproduce."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r} (architectures: {config.get('architectures')}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM)"
        )
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    # transformers >= 5 writes rope_parameters (theta inside); older versions rope_theta + rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    if rope_type not in ("default", None):
        problems.append(f"rope scaling {rope_type!r} (only plain RoPE, rope_type 'default', is supported)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (our blocks have no biases)")
    if config.get("head_dim") not in (None, dim // n_heads):
        problems.append(f"head_dim={config['head_dim']} != hidden_size/num_attention_heads={dim // n_heads}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (only silu: SwiGLU)")
    if config.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp={config['pretraining_tp']}")
    if problems:
        raise ValueError("unsupported Llama config: " + "; ".join(problems))
    multiple_of, ffn_dim_multiplier = ffn_params(dim, config["intermediate_size"])
    n_trunk_and_head0 = config["num_hidden_layers"]
    return ModelArgs(
        dim=dim,
        n_layers=n_trunk_and_head0 + n_future_tokens - 1,
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_dim_multiplier,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        n_future_tokens=n_future_tokens,
    )


def _safetensors_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(src.glob("*.safetensors"))
    files = [f for f in files if f.name != MTP_HEADS_FILE]
    if not files:
        found = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".gguf"))
        raise FileNotFoundError(
            f"no *.safetensors weights in {src}" + (f" (found {found}: only safetensors is read)" if found else "")
        )
    return files


def from_hf(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a Hugging Face Llama folder (config.json + safetensors, sharded or not) to our format.

    Tied embeddings become an untied copy (our model always has its own `output`). A folder written
    by `to_hf` carries `mtp_heads.safetensors`: its extra heads are restored, bit for bit."""
    from safetensors import safe_open

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {src}: expected a Hugging Face model folder")
    config = json.loads((src / "config.json").read_text())
    files = _safetensors_files(src)
    n_future, extra_file, meta = 1, src / MTP_HEADS_FILE, {}
    if extra_file.is_file():
        with safe_open(extra_file, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != MTP_FORMAT:
            raise ValueError(f"{extra_file}: metadata format {meta.get('format')!r}, expected {MTP_FORMAT!r}")
        n_future = int(meta["n_future_tokens"])
    args = args_from_hf_config(config, n_future)
    if "params" in meta:
        # to_hf's own params.json: keep its multiple_of/ffn_dim_multiplier (same width) so the round
        # trip gives back the same params.json, not merely an equivalent one.
        original = ModelArgs.from_params(json.loads(meta["params"]))
        if original.ffn_hidden_dim == args.ffn_hidden_dim:
            args.multiple_of, args.ffn_dim_multiplier = original.multiple_of, original.ffn_dim_multiplier

    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for hf_key in f.keys():  # one tensor at a time: never a second full copy of the model
                key = meta_key(hf_key)
                if key is None:
                    if hf_key in _IGNORED_HF_KEYS:
                        continue
                    raise ValueError(f"{path.name}: tensor {hf_key!r} is not part of a plain Llama model")
                tensor = f.get_tensor(hf_key)
                if key.endswith("attention.wq.weight"):
                    tensor = permute_from_hf(tensor, args.n_heads)
                elif key.endswith("attention.wk.weight"):
                    tensor = permute_from_hf(tensor, args.n_kv_heads)
                state[key] = tensor.contiguous()
    if n_future > 1:
        with safe_open(extra_file, framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    if "output.weight" not in state and config.get("tie_word_embeddings", False):
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    save_checked(args, state, out, src)
    copy_tokenizer(src, out)
    return out


def save_checked(args: ModelArgs, state: dict[str, torch.Tensor], out: Path, src: Path) -> None:
    """Check `state` against the model `args` describes (names, shapes), then write it with save_model."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{src}: weights do not match its config (missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"wrong shapes {wrong[:8]})"
        )
    model.load_state_dict(state, assign=True, strict=True)
    save_model(model, out)


def copy_tokenizer(src: Path, out: Path) -> list[str]:
    """Copy the tokenizer files found in `src` into `out` (atomically); returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            data = (src / name).read_bytes()
            _atomic_write(out / name, lambda f: f.write(data))
            copied.append(name)
    return copied


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file streams to disk (its `save` would hold a second copy in memory as bytes);
    to a temporary name first, then renamed."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, max_position_embeddings: int = 4096) -> Path:
    """Write our checkpoint as a Hugging Face LlamaForCausalLM folder: the trunk and the next-token head
    in model.safetensors, the extra heads (if any) unchanged in mtp_heads.safetensors.

    Our model has no length limit of its own; `max_position_embeddings` only fills the config field."""
    ckpt, out = Path(ckpt), Path(out)
    # max_seq_len=1: no KV cache memory is wasted on a model that only gets written out.
    model = load_model(ckpt, max_seq_len=1, max_batch_size=1)
    args, state = model.args, model.state_dict()
    out.mkdir(parents=True, exist_ok=True)

    trunk = {k: v.contiguous() for k, v in head_to_hf_state_dict(state, args, head=0).items()}
    _save_safetensors(trunk, out / "model.safetensors", {"format": "pt"})
    del trunk
    extra = {k: v.contiguous() for k, v in state.items() if k.startswith("extra_heads.")}
    if extra:
        meta = {"format": MTP_FORMAT, "n_future_tokens": str(args.n_future_tokens),
                "params": json.dumps(args.to_params())}
        _save_safetensors(extra, out / MTP_HEADS_FILE, meta)

    config = hf_llama_config(args)
    config.max_position_embeddings = max_position_embeddings
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = str(state["tok_embeddings.weight"].dtype).removeprefix("torch.")
    copied = copy_tokenizer(ckpt, out) or copy_tokenizer(ckpt.parent, out)  # Meta puts it beside the folder
    if copied:
        tok = load_tokenizer(out)
        config.bos_token_id = tok.bos_id if tok.bos_id >= 0 else None
        config.eos_token_id = tok.eos_id if tok.eos_id >= 0 else None
        config.pad_token_id = tok.pad_id if tok.pad_id >= 0 else None
        if copied == ["tokenizer.model"]:  # SentencePiece only: tell transformers which class reads it
            # LlamaTokenizer prepends "▁" unless told not to; our code tokenizers have no dummy prefix.
            dummy_prefix = tok.sp.encode("a", out_type=str)[0].startswith("\u2581")
            tok_config = {"tokenizer_class": "LlamaTokenizer", "bos_token": tok.sp.id_to_piece(tok.bos_id),
                          "eos_token": tok.sp.id_to_piece(tok.eos_id), "add_bos_token": True,
                          "add_prefix_space": dummy_prefix}
            text = json.dumps(tok_config, indent=2) + "\n"
            _atomic_write(out / "tokenizer_config.json", lambda f: f.write(text.encode()))
    text = config.to_json_string()
    _atomic_write(out / "config.json", lambda f: f.write(text.encode()))
    return out
