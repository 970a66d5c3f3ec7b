"""Hugging Face `LlamaForCausalLM` <-> Meta layout: one key-map table plus the rotary row permutation.

Meta's rotary embedding rotates interleaved pairs (2i, 2i+1) of each head; Hugging Face rotates the
two halves (i, i + head_dim/2). Permuting the rows of wq and wk turns one convention into the other.
A multi-token model exports as a plain Llama per prediction head: the trunk plus that head as the
last layer (head 0 gives the next-token model).
"""

from __future__ import annotations

import torch

from multitoken.model import ModelArgs

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
