"""The multi-token prediction Transformer (Gloeckle et al. 2024) in Meta's Llama layout.

`n_layers` counts every block. With n = n_future_tokens, `layers` holds n_layers - n + 1 blocks and
`extra_heads` holds n - 1: the trunk is `layers[:-1]`, the prediction heads are
`[layers[-1]] + extra_heads`, every head reads the same trunk output, and all heads share one final
`norm` and one `output` projection. Head i predicts token t + 1 + i.

The model knows nothing of training, parallelism or sampling. It runs in two modes:
- cache-free (after construction): causal attention over the given tokens, for training;
- cached (after `setup_caches`): every block, extra heads included, keeps keys/values indexed by
  absolute position, and `start_pos` says where the given tokens go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class ModelArgs:
    # The released fields and defaults: a released params.json loads unchanged.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1: taken from the tokenizer / the weights
    multiple_of: int = 256  # SwiGLU hidden size rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048
    n_future_tokens: int = 1

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            problems.append(f"head_dim={self.dim // self.n_heads} must be even for rotary embeddings")
        if not 1 <= self.n_future_tokens <= self.n_layers:
            problems.append(
                f"n_future_tokens={self.n_future_tokens} must be between 1 and n_layers={self.n_layers}"
            )
        if problems:
            raise ValueError("invalid model arguments: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Build from a params.json dict; keys this model does not know are reported, not guessed at."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"params.json has fields this model does not support: {unknown}. "
                f"Supported fields: {sorted(known)}"
            )
        return cls(**{**params, **overrides})

    def to_params(self) -> dict[str, Any]:
        """The params.json dict: runtime sizes (max_seq_len, max_batch_size) are not part of a checkpoint."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("max_batch_size", "max_seq_len")
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16/fp16 models match the reference numerics.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def precompute_rope(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """(max_seq_len, 2, 1, head_dim) float32 table of Meta's rotations (frequencies theta^(-2i/hd)):
    per position, cos of pair i at dims 2i and 2i + 1, then -sin at 2i and sin at 2i + 1, as
    `apply_rope` multiplies them; the 1 broadcasts over attention heads."""
    if torch.empty(0, device=device).is_meta:
        # A meta table has a shape and nothing else (the real one is built where the weights land), and
        # arithmetic on meta tensors imports torch._dynamo on first use (`Transformer`).
        return torch.empty(max_seq_len, 2, 1, head_dim, device=device)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    threads = torch.get_num_threads() if angles.is_cpu else 1
    if threads > 1:
        # On one thread: a process's first float32 cos or sin on the CPU, split between threads, has given
        # the second thread's share with errors of ~1e-4 (torch 2.13, 2 threads: one process in three),
        # and then every position past the middle of the table rotated wrongly for the model's lifetime.
        torch.set_num_threads(1)
    try:
        cos, sin = angles.cos(), angles.sin()
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
    pairs = torch.stack([torch.stack([cos, cos], -1), torch.stack([-sin, sin], -1)], dim=1)
    return pairs.flatten(-2).unsqueeze(-2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (dims 2i, 2i+1) of x (..., seq, heads, head_dim), Meta's convention;
    `rope` holds the table rows of x's positions: (seq, 2, 1, head_dim), or (batch, seq, ...) when
    rows sit at different positions. Pair (x0, x1) becomes (x0 cos - x1 sin, x1 cos + x0 sin), in
    float32: as x * cos + (x with each pair swapped) * (-sin, sin), the same numbers in 9 operator
    calls instead of 17 (an eager decode step rotates keys and queries in every block)."""
    xf = x.float()
    cos, sin = rope.unbind(-3)
    return (xf * cos + xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin).type_as(x)


def select_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Token index[b] of each row b of x (batch, seq, ...), as (batch, 1, ...)."""
    return x[torch.arange(x.shape[0], device=x.device), index].unsqueeze(1)


class Positions(NamedTuple):
    """Where a forward's tokens sit: `start` is an int (every row at the same offset) or a (batch, seq)
    tensor of each token's cache slot (rows at their own offsets, as in batched speculative decoding);
    `rope` holds the rotary rows of every token (its absolute position, which is its slot except where
    several tokens share a position, as the candidates of a draft tree do); `mask` (or None for plain
    causal) says which cached keys each query sees; `rows` (or None for rows 0 .. batch - 1) says which
    KV cache rows the batch's rows are, so a server can prefill a free row while others hold running
    requests."""

    start: int | torch.Tensor
    rope: torch.Tensor
    mask: torch.Tensor | None
    rows: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> Positions:
        """The positions of one token per row, token `index[b]` of row b."""
        if isinstance(self.start, int):
            # Without per-row masks a lone query would see the keys after it: refuse rather than leak.
            raise ValueError("query_index needs per-row positions: pass start_pos as a (batch,) tensor")
        rows = torch.arange(index.shape[0], device=index.device)
        return Positions(self.start, self.rope[rows, index].unsqueeze(1), self.mask[rows, :, index].unsqueeze(2),
                         self.rows)


class KVCache(nn.Module):
    """Keys and values of one block by absolute position, laid out (batch, kv_heads, seq, head_dim)
    so attention reads a prefix without copying."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: Positions, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, kv_heads, seq, head_dim) at their positions; return every key/value the
        queries may need, positions 0 .. end (masked per row where rows differ)."""
        self.write(pos, k, v)
        bsz, _, seqlen, _ = k.shape
        if isinstance(pos.start, int):
            end = pos.start + seqlen
        else:
            end = pos.mask.shape[-1]
            if pos.rows is not None:  # a gather (copy) of the selected rows, not a view
                return self.k[pos.rows, :, :end], self.v[pos.rows, :, :end]
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]

    def write(self, pos: Positions, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (batch, kv_heads, seq, head_dim) in the slots of their positions."""
        bsz, _, seqlen, _ = k.shape
        if isinstance(pos.start, int):
            self.k[:bsz, :, pos.start : pos.start + seqlen] = k
            self.v[:bsz, :, pos.start : pos.start + seqlen] = v
        else:
            rows = torch.arange(bsz, device=k.device) if pos.rows is None else pos.rows
            self.k[rows[:, None], :, pos.start] = k.transpose(1, 2)
            self.v[rows[:, None], :, pos.start] = v.transpose(1, 2)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy row b's entries at slots src[b] to slots dst[b] (both (batch, n)), e.g. to close the gaps
        that the rejected tokens of a verified draft tree leave between the accepted ones."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        self.k[rows, :, dst] = self.k[rows, :, src]  # the right side is gathered (copied) first
        self.v[rows, :, dst] = self.v[rows, :, src]


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of queries q (batch, n_heads, n_q, head_dim) over keys and values (batch, n_kv_heads,
    keys, head_dim) where mask (broadcast to (batch, 1, n_q, keys)) is True, or causal if it is None."""
    gqa = {}
    if k.shape[1] != q.shape[1]:
        # Grouped-query attention: each kv head serves n_heads // n_kv_heads query heads.
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}  # no copy of the cache
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    is_causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos: Positions, query_index: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output for every token, or, given `query_index` (batch,), for token
        query_index[b] of each row alone: keys and values are still computed and cached for all."""
        k, v = self.store(self.wk(x), self.wv(x), pos)
        if query_index is not None:
            x, pos = select_tokens(x, query_index), pos.select(query_index)
        return self.attend(self.wq(x), k, v, pos)

    def store(self, xk: torch.Tensor, xv: torch.Tensor, pos: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate the keys xk and cache them with the values xv (batch, seq, kv_heads * head_dim); returns
        the keys and values to attend, (batch, kv_heads, keys, head_dim): the cache's, if any."""
        bsz, seqlen, _ = xk.shape
        k = self.rotate(xk.view(bsz, seqlen, self.n_kv_heads, self.head_dim), pos.rope).transpose(1, 2)
        v = xv.view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)
        return k, v

    # How queries attend, a function of (q, k, v, mask) as `scaled_dot_product`, and how keys and
    # queries are rotated, as `apply_rope`: decode steps put others in their place for some shapes
    # (steps.py); the model computes the same either way.
    sdpa = staticmethod(scaled_dot_product)
    rotate = staticmethod(apply_rope)

    def attend(self, xq: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions) -> torch.Tensor:
        """Queries xq (batch, n_q, n_heads * head_dim) at `pos` attending to keys k and values v, through
        the output projection."""
        bsz, n_q, _ = xq.shape
        q = self.rotate(xq.view(bsz, n_q, self.n_heads, self.head_dim), pos.rope).transpose(1, 2)
        out = self.sdpa(q, k, v, pos.mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, n_q, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, pos: Positions, query_index: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attention(self.attention_norm(x), pos, query_index)
        if query_index is not None:
            x = select_tokens(x, query_index)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(
                "vocab_size must be set (params.json may say -1: resolve it from the tokenizer first)"
            )
        self.args = args
        n = args.n_future_tokens
        # Built on the meta device (load_model: the checkpoint brings the weights), the embedding skips
        # its random init: a meta tensor's normal_ runs through torch's Python references, whose first
        # use imports torch._dynamo (1.2 s, half of what `multitoken generate` took here).
        meta = torch.empty(0).is_meta
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim,
                                           _weight=torch.empty(args.vocab_size, args.dim) if meta else None)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers - n + 1))
        self.extra_heads = nn.ModuleList(TransformerBlock(args) for _ in range(n - 1))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope", self._rope_table(args.max_seq_len, None), persistent=False)

    def _rope_table(self, max_seq_len: int, device) -> torch.Tensor:
        return precompute_rope(self.args.head_dim, max_seq_len, self.args.rope_theta, device)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the rotary table; keep it float32 whatever the weights' dtype.
        super()._apply(fn, recurse)
        self.rope = self._rope_table(self.rope.shape[0], self.rope.device)
        return self

    @property
    def n_future_tokens(self) -> int:
        return self.args.n_future_tokens

    @property
    def heads(self) -> list[TransformerBlock]:
        """Prediction heads in order: head i predicts token t + 1 + i."""
        return [self.layers[-1], *self.extra_heads]

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate a KV cache in every block (extra heads included) on the model's device and dtype."""
        weight = self.tok_embeddings.weight
        self.args.max_batch_size, self.args.max_seq_len = max_batch_size, max_seq_len
        self.rope = self._rope_table(max_seq_len, weight.device)
        for block in [*self.layers, *self.extra_heads]:
            block.attention.cache = KVCache(
                max_batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim, weight.dtype, weight.device
            )

    def copy_cache_rows(self, src: torch.Tensor, dst: torch.Tensor, end: int | None = None) -> None:
        """Copy the KV cache rows `src` to rows `dst` in every block (a server keeps its running
        requests in rows 0 .. n - 1 so that each step attends to no idle row); with `end`, only their
        slots 0 .. end - 1 (the rest of a row is rewritten before it is read)."""
        for block in [*self.layers, *self.extra_heads]:
            cache = block.attention.cache
            cache.k[dst, :, :end] = cache.k[src, :, :end]
            cache.v[dst, :, :end] = cache.v[src, :, :end]

    def free_caches(self) -> None:
        for block in [*self.layers, *self.extra_heads]:
            block.attention.cache = None

    @property
    def has_caches(self) -> bool:
        return self.layers[0].attention.cache is not None

    def positions(
        self, start_pos: int | torch.Tensor, bsz: int, seqlen: int, rows: torch.Tensor | None = None,
        span: int | None = None,
    ) -> Positions:
        """Rotary rows and attention mask for `seqlen` tokens per row from `start_pos` on, an int or a
        (batch,) tensor of per-row offsets (which needs the KV caches). `rows` (batch,) picks the KV
        cache rows to use instead of 0 .. batch - 1 (per-row offsets only). With `span` (per-row
        offsets only) the mask spans the cache's first `span` slots, whatever the positions: every step
        of a given batch, length and span then has the same shapes, as compiled steps need, and nothing
        waits for the offsets' values (the caller keeps them below the span)."""
        if self.has_caches and bsz > self.args.max_batch_size:
            raise ValueError(f"batch of {bsz} exceeds max_batch_size={self.args.max_batch_size}")
        if isinstance(start_pos, int):
            if rows is not None:
                raise ValueError("cache rows need per-row positions: pass start_pos as a (batch,) tensor")
            end = start_pos + seqlen
            self._check_end(end)
            mask = None
            if self.has_caches and seqlen > 1 and start_pos > 0:
                # Query i sits at absolute position start_pos + i and sees keys 0 .. start_pos + i.
                mask = torch.ones(seqlen, end, dtype=torch.bool, device=self.rope.device).tril(start_pos)
            return Positions(start_pos, self.rope[start_pos:end], mask)
        if not self.has_caches:
            raise ValueError("per-row positions need KV caches: call setup_caches first")
        if rows is not None and (rows.shape != (bsz,) or int(rows.min()) < 0 or int(rows.max()) >= self.args.max_batch_size):
            raise ValueError(f"rows must be {bsz} cache rows in [0, {self.args.max_batch_size}), got {rows.tolist()}")
        at = start_pos[:, None] + torch.arange(seqlen, device=start_pos.device)  # (batch, seq)
        end = span if span is not None else int(at.max()) + 1
        self._check_end(end)
        # Each row's queries see its own keys up to their position: stale entries past it never count.
        mask = torch.arange(end, device=at.device) <= at[..., None]
        return Positions(at, self.rope[at], mask.unsqueeze(1), rows)

    def positions_at(self, slots: torch.Tensor, at: torch.Tensor, mask: torch.Tensor) -> Positions:
        """Positions of tokens cached at `slots` and rotated as at absolute positions `at` (both
        (batch, seq)), each query seeing the cached keys where `mask` (batch, seq, end) is True: any
        attention pattern over the cache, such as a tree of draft tokens that share positions."""
        self._check_end(max(mask.shape[-1], int(at.max()) + 1))
        return Positions(slots, self.rope[at], mask.unsqueeze(1))

    def move_cache_entries(self, src: torch.Tensor, dst: torch.Tensor, extra_heads: bool = True) -> None:
        """Copy each row's cached keys/values from slots src[b] to dst[b] (both (batch, n)) in the trunk,
        the next-token head and, unless `extra_heads=False`, the extra heads."""
        for block in [*self.layers, *(self.extra_heads if extra_heads else [])]:
            block.attention.cache.move(src, dst)

    def _check_end(self, end: int) -> None:
        if end > self.rope.shape[0]:
            raise ValueError(f"position {end - 1} is past max_seq_len={self.rope.shape[0]}")

    def _as_positions(self, start_pos: int | torch.Tensor | Positions, x: torch.Tensor) -> Positions:
        return start_pos if isinstance(start_pos, Positions) else self.positions(start_pos, x.shape[0], x.shape[1])

    def forward_trunk(self, tokens: torch.Tensor, start_pos: int | torch.Tensor | Positions = 0) -> torch.Tensor:
        """Embeddings and trunk blocks: the hidden state every head reads, (batch, seq, dim)."""
        pos = self._as_positions(start_pos, tokens)
        h = self.tok_embeddings(tokens)
        for layer in list(self.layers)[:-1]:  # (slicing the ModuleList would build a new one: ~30 us a step)
            h = layer(h, pos)
        return h

    def forward_head(
        self,
        i: int,
        h_trunk: torch.Tensor,
        start_pos: int | torch.Tensor | Positions = 0,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head i's block on the trunk output, before the shared norm and output projection. With
        `query_index` (batch,), only token query_index[b] of each row gets an output, (batch, 1, dim);
        the head's keys and values are still cached for every token."""
        return self.heads[i](h_trunk, self._as_positions(start_pos, h_trunk), query_index)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Shared final norm and unembedding, float32 logits."""
        return self.output(self.norm(h)).float()

    def forward(
        self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, return_all_heads: bool = False
    ) -> torch.Tensor:
        """Logits (batch, seq, n_heads_used, vocab) in float32; n_heads_used is 1 unless return_all_heads.

        Without return_all_heads the extra heads do not run, so their KV caches are not filled:
        self-speculative decoding runs every forward with return_all_heads=True.
        """
        pos = self.positions(start_pos, *tokens.shape)
        h_trunk = self.forward_trunk(tokens, pos)
        n_used = self.n_future_tokens if return_all_heads else 1
        return torch.stack([self.logits(self.forward_head(i, h_trunk, pos)) for i in range(n_used)], dim=2)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Scaled normal init for training from scratch (GPT-2 style): residual projections get
        std / sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        residual_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, std)
