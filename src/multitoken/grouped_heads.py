"""The heads of a self-speculative step as one computation instead of one block after another: the
extra heads at the accepted token, or (a greedy step of up to 16 tokens, `steps.DecodeSteps._greedy`)
every head, the next-token head too, at every token.

Every head reads the same trunk output at the same positions, so each stage of their blocks (a
norm, a projection, the attention, the feed-forward) can run for all heads at once: one call of the
packed kernel over the heads' weights (`kernels.linear_group`) and one of the attention kernel over their
caches (`kernels.attention_group`) where the per-head code makes one per head. On the shipped model a
head's block is ~7 operator calls of a few microseconds' work each: eagerly, where a call costs tens
of microseconds, grouping makes the greedy speculative step ~5% faster; compiled, about the same
(`benchmarks/bench_steps.py --compare heads [--eager]`).

Eagerly, with per-row positions and fused products, the whole computation is one kernel call
(`head_group`, the same operations from C++: ~120 us less a step at batch 1 here).

Only where the bf16 CPU kernels run the heads' products and attention (`DecodeSteps(cpu_kernels=True)`):
their outputs do not depend on what else a call computes, so grouped heads give the per-head path's
drafts bit for bit (`tests/test_grouped_heads.py`). Elsewhere `usable` is False and the heads run one by
one (`Transformer.forward_head`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multitoken import kernels
# steps imports this module (its draft_logits runs the heads grouped); the module, not its names, is
# imported here, so either can be imported first.
from multitoken import steps
from multitoken.model import Positions, RMSNorm, TransformerBlock, select_tokens


def usable(heads: list[TransformerBlock], h: torch.Tensor) -> bool:
    """Whether `heads` can run grouped on trunk output h: bf16, no gradients, every product a packed
    kernel's and every attention the kernel's, all heads alike (the same fusions, norms and caches)."""
    if not heads or h.dtype != torch.bfloat16 or torch.is_grad_enabled() or h.shape[:-1].numel() > kernels.PACKED_MAX_ROWS:
        return False
    a0, f0, n0, m0 = kernels.block_parts(heads[0])
    for block in heads:
        a, f, norm1, norm2 = kernels.block_parts(block)
        if (a.sdpa is not kernels.attention or a._modules.get("cache") is None or type(a) is not type(a0)
                or type(f) is not type(f0) or type(norm1) is not type(n0) or type(norm2) is not type(m0)
                or a.rotate is not a0.rotate or norm1.eps != n0.eps or norm2.eps != m0.eps):
            return False
        if not all(isinstance(m, kernels.PackedLinear) and m._buffers.get("packed") is not None
                   for m in steps.block_products(block)):
            return False
    return True


def _norm(x: torch.Tensor, norms: list[RMSNorm]) -> torch.Tensor:
    """norms[g] on x (batch, seq, dim), or on x[g] of x (G, batch, seq, dim): (G, batch, seq, dim),
    computed as the heads' norms compute it (`kernels.KernelRMSNorm` where decode steps made them so)."""
    if isinstance(norms[0], kernels.KernelRMSNorm) and kernels._elementwise_runs(x):
        return kernels.rms_norm(x, norms, per_group=x.dim() == 4)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norms[0].eps)
    weight = torch.stack([n.weight for n in norms])  # (G, dim), broadcast over batch and seq
    return xf.type_as(x) * weight.view(len(norms), 1, 1, -1)


def _select(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Token index[b] of each row b of each x[g] (G, batch, seq, ...), as (G, batch, 1, ...)."""
    return x[:, torch.arange(x.shape[1], device=x.device), index].unsqueeze(2)


def forward(heads: list[TransformerBlock], h: torch.Tensor, pos: Positions, index: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The outputs of heads[g] on the trunk output h (batch, seq, dim), before the shared norm and
    unembedding; every head's keys and values are cached for every token of h. With `index` (batch,), at
    token index[b] of each row alone: (batch, G, dim), the same as `torch.cat([head(h, pos, index) for
    head in heads], 1)`; without, at every token: (batch, seq, G, dim), the same as
    `torch.stack([head(h, pos) for head in heads], 2)` (`usable(heads, h)` first)."""
    if _in_one_call(heads, h, pos):
        return _one_call(heads, h, pos, index)
    n, a = len(heads), heads[0].attention
    bsz, seqlen, _ = h.shape
    queries = 1 if index is not None else seqlen
    x = _norm(h, [b.attention_norm for b in heads])  # (G, batch, seq, dim)
    if isinstance(a, steps.FusedAttention):
        # Queries of every token, then the selected one's, as FusedAttention computes them.
        q, xk, xv = kernels.linear_group(x, [b.attention.wqkv for b in heads]).split(
            [a.wq.out_features, a.wk.out_features, a.wv.out_features], -1)
        q = q if index is None else _select(q, index)
    else:
        xk = kernels.linear_group(x, [b.attention.wk for b in heads])
        xv = kernels.linear_group(x, [b.attention.wv for b in heads])
        q = kernels.linear_group(x if index is None else _select(x, index), [b.attention.wq for b in heads])
    # Keys rotated for every head at once (the rotary rows broadcast), then cached in each head's own buffers.
    k = a.rotate(xk.view(n, bsz, seqlen, a.n_kv_heads, a.head_dim), pos.rope).transpose(2, 3)
    v = xv.view(n, bsz, seqlen, a.n_kv_heads, a.head_dim).transpose(2, 3)
    cached = [b.attention.cache.update(pos, k[g], v[g]) for g, b in enumerate(heads)]
    at = pos if index is None else pos.select(index)
    q = a.rotate(q.view(n, bsz, queries, a.n_heads, a.head_dim), at.rope).transpose(2, 3)
    out = kernels.attention_group(q, [k for k, _ in cached], [v for _, v in cached], at.mask)
    hh = (h if index is None else select_tokens(h, index)) + kernels.linear_group(
        out.transpose(2, 3).reshape(n, bsz, queries, -1), [b.attention.wo for b in heads])  # (G, batch, queries, dim)
    x = _norm(hh, [b.ffn_norm for b in heads])
    if isinstance(heads[0].feed_forward, steps.FusedFeedForward):
        gate, up = kernels.linear_group(x, [b.feed_forward.w13 for b in heads]).chunk(2, dim=-1)
    else:
        gate = kernels.linear_group(x, [b.feed_forward.w1 for b in heads])
        up = kernels.linear_group(x, [b.feed_forward.w3 for b in heads])
    return _as_output(hh + kernels.linear_group(F.silu(gate) * up, [b.feed_forward.w2 for b in heads]), index)


def _as_output(out: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """(G, batch, queries, dim) as `forward` returns it."""
    return out[:, :, 0].transpose(0, 1) if index is not None else out.permute(1, 2, 0, 3)


def _in_one_call(heads: list[TransformerBlock], h: torch.Tensor, pos: Positions) -> bool:
    """Whether `forward` runs as one kernel call (`head_group`): eagerly, with per-row positions, fused
    products, the kernels' norms and rotations, bf16 caches (beside what `usable` checked)."""
    if torch.compiler.is_compiling() or isinstance(pos.start, int) or pos.mask is None or pos.mask.dim() != 4:
        return False
    a, f, norm1, norm2 = kernels.block_parts(heads[0])
    return (isinstance(a, steps.FusedAttention) and isinstance(f, steps.FusedFeedForward)
            and type(norm1) is kernels.KernelRMSNorm and type(norm2) is kernels.KernelRMSNorm
            and a.rotate is kernels.rotate and kernels._elementwise_runs(h) and a.head_dim % kernels.BLOCK == 0
            and a.head_dim <= 256 and all(kernels.block_parts(b)[0]._modules["cache"]._buffers["k"].dtype == h.dtype for b in heads))


def _one_call(heads: list[TransformerBlock], h: torch.Tensor, pos: Positions, index: torch.Tensor | None
              ) -> torch.Tensor:
    """`forward` in one kernel call: the same operations from C++, the same numbers bit for bit."""
    packed, norms, caches = [], [], []
    for b in heads:  # alike (`usable`): the first one's sizes, eps and head counts serve them all
        parts = kernels.block_parts(b)
        b_packed, out_features, b_norms = kernels.block_operands(*parts)
        packed += b_packed
        norms += b_norms
        cache = parts[0]._modules["cache"]._buffers
        caches += [cache["k"], cache["v"]]
    a, _, norm1, _ = kernels.block_parts(heads[0])
    bsz, seqlen, _ = h.shape
    tokens = index if index is not None else torch.arange(seqlen, device=h.device).expand(bsz, seqlen)
    out = torch.ops.multitoken.head_group.default(h, tokens, packed, out_features, norms, norm1.eps,
                                                  a.n_heads, a.n_kv_heads, pos.rope, pos.mask, caches, pos.start, pos.rows)
    return _as_output(out, index)
