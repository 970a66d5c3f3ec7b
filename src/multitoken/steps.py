"""The forwards of a decoding loop, eager or compiled.

A decoding loop needs two forwards: a step (tokens at per-row positions through the trunk and the
next-token head) and, for self-speculation, a draft (the extra heads at one token per row). Eager,
they attend the cache prefix the positions need. Compiled, they attend a fixed span of the cache under
a mask (`Transformer.positions(..., span=...)`), so every step of a given batch size, token count and
span has the same shapes: torch.compile traces each shape once, nothing is allocated or decided in
Python per block, and on a GPU `mode="reduce-overhead"` replays the step as a CUDA graph. The span
grows with the text (`DecodeSteps.span`): a step costs what the text so far needs, not what
max_seq_len allows (at 2048 slots a 1-token step of the shipped model cost 1.75x, a speculative one
2.2x, what they cost at 256). On a CPU it is the written slots rounded up to WINDOW slots and reaches
the compiled step as the length of a tensor marked dynamic (`DecodeSteps.window`), so one graph serves
every span short of the whole cache. On a GPU it is a power of two from MIN_SPAN, one graph (and CUDA
graph) per span; a warm-up can compile the spans a run will reach first (`DecodeSteps.spanning`).
Both compute the same function; the model itself knows nothing of compilation.

In bf16 on a CPU with AVX-512 BF16, steps (eager or compiled) run their products and attention in
`multitoken.kernels` (`cpu_kernels`): each token of a verify step is computed exactly as in a 1-token
step, so bf16 self-speculation is lossless to the bit, and eager steps take half the time. Eager
steps there also run their norms, rotations and indexed cache stores as one kernel call each
(`kernels.KernelRMSNorm`, `kernels.rotate`, `kernels.KernelKVCache`), a fifth to a third off a step
whose time goes mostly to calling operators; compiled steps leave those to inductor.

On a CPU with bfloat16 or float16 weights, compiled steps are also frozen (`freeze`): inductor takes
the weights as constants, packs them once into the tiles of its own matrix kernels (AMX and
AVX-512 bf16 here) and keeps them where they beat ATen's; a SmolLM2-135M decode step went from
21.0-21.5 to 11.6-12.8 ms, and a 4-token verify costs 1.13-1.23x a 1-token step. Compiled steps
also compute each block's q, k, v products as one product and w1, w3 as one (`fuse_projections`):
fewer, wider products (on an H100, the 7B plain step went from 5.65 to 5.12-5.25 ms); eager steps too
(33 fewer products in a step of the shipped model: bf16 1-token steps 3.69 -> 3.39 ms, speculative
5.77 -> 5.09 ms on the 2-core CPU).
"""

from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from multitoken import grouped_heads, kernels
from multitoken.model import Attention, FeedForward, Positions, Transformer, apply_rope, scaled_dot_product, select_tokens
from multitoken.sampling import greedy as greedy_tokens

# Up to this many rows (tokens x batch) a bf16 product runs as a fused reduction on a CPU. Measured
# here (2-core AVX-512): 3.5x ATen's speed at 1 row, equal at 4 in isolation; but inside a whole
# verify step (4 rows) the reductions ran 10x slower than ATen, so only single rows use them.
ROWWISE_MAX_ROWS = 1

# Up to this many tokens (batch x (1 + drafts)) a greedy self-speculative step runs every head at every
# token where the CPU kernels run the heads (`DecodeSteps._greedy`). Measured here: see docs/benchmarks.md.
ALL_HEADS_MAX_ROWS = 16


class RowwiseLinear(nn.Linear):
    """nn.Linear whose product, for up to ROWWISE_MAX_ROWS rows and under torch.compile, is a float32
    multiply-and-sum over the weights: on a CPU, one pass over the bf16 weights that widens and
    accumulates in registers. Eagerly, and for more rows, it is nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        # Eagerly the reduction would materialise float32 weights: only compiled is it one fused pass.
        if not torch.compiler.is_compiling() or rows > ROWWISE_MAX_ROWS or self.bias is not None:
            return F.linear(x, self.weight, self.bias)
        # (out, rows) with the weights outermost: each weight row is read once for all rows of x.
        y = (self.weight.float()[:, None, :] * x.reshape(rows, -1).float()[None]).sum(-1)
        return y.t().reshape(*x.shape[:-1], -1).to(x.dtype)


def use_rowwise_matmuls(model: nn.Module) -> nn.Module:
    """Make every nn.Linear of `model` a RowwiseLinear, in place, fused products included: the same
    parameters and state dict keys, another forward under torch.compile (worth it on a CPU in bf16)."""
    fused = inference_products(model) if isinstance(model, Transformer) else []
    for module in [*model.modules(), *fused]:
        if type(module) is nn.Linear:
            module.__class__ = RowwiseLinear
    return model


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`model.scaled_dot_product` for steps compiled on a CPU: one query per row, q (batch, n_heads, 1,
    head_dim), as float32 multiplies and sums, which inductor fuses into passes over the cache (ATen's
    flash kernel pays for blocking and threads that one query cannot use: on the shipped model in
    bf16 a 1-token step took 1.10-1.19 instead of 1.41-1.54 ms). More queries, or eagerly: scaled_dot_product."""
    if q.shape[2] != 1 or q.device.type != "cpu" or not torch.compiler.is_compiling():
        return scaled_dot_product(q, k, v, mask)
    bsz, n_heads, _, head_dim = q.shape
    # Query heads grouped by the kv head they share: (batch, kv_heads, group, 1, head_dim).
    q = q.reshape(bsz, k.shape[1], n_heads // k.shape[1], 1, head_dim).float()
    scores = (q * k[:, :, None].float()).sum(-1) * head_dim**-0.5  # (batch, kv_heads, group, keys)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (batch, 1, 1, keys) broadcasts
    weights = torch.softmax(scores, dim=-1)
    out = (weights[..., None] * v[:, :, None].float()).sum(-2)  # (batch, kv_heads, group, head_dim)
    return out.reshape(bsz, n_heads, 1, head_dim).to(v.dtype)


@torch.library.custom_op("multitoken::materialized", mutates_args=())
def materialized(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x, made by a kernel of its own under torch.compile: inductor cannot inline
    the computation of a custom op's output into the kernels that read it."""
    return x.clone(memory_format=torch.contiguous_format)


@materialized.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def masked_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`model.scaled_dot_product` as FlexAttention, for compiled steps (`DecodeSteps(flex=True)`): an
    alternative to SDPA's kernels for the few queries of a decode step, whose attention is 13% of a 7B
    plain step on an H200 and half of what a self-speculative step adds to it. A score_mod reads the
    mask, so any pattern works (ragged rows, tree masks). Measured there (torch 2.11, docs/benchmarks.md)
    it does not pay: 22 us per block for 1 query against cuDNN's 10, no faster for 4, 588 us for 65 (a
    draft tree) against 14. Eagerly, or without a mask (causal): scaled_dot_product."""
    if mask is None or not torch.compiler.is_compiling():
        return scaled_dot_product(q, k, v, mask)
    bsz, n_heads, n_q, _ = q.shape
    # Imported here: the module pulls in the compiler, which eager decoding never needs.
    from torch.nn.attention.flex_attention import flex_attention

    # Read from a buffer of its own: inductor would otherwise inline the mask's computation (positions
    # compared with slots) into the attention kernel, which fails to compile on a GPU (torch 2.11:
    # "NameError: XBLOCK is not defined").
    mask = materialized(mask).expand(bsz, 1, n_q, k.shape[2])

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(mask[b, 0, q_idx, kv_idx], score, -float("inf"))

    return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=k.shape[1] != n_heads)


def _fused_pays(fused: nn.Linear, x: torch.Tensor) -> bool:
    """Whether a fused product should replace the separate ones: not with gradients on (the fused
    weight is not a parameter), nor for row-wise reductions, which inductor fuses side by side
    already (a fused one decoded SmolLM2-135M at 0.8x the speed on this CPU)."""
    rowwise = isinstance(fused, RowwiseLinear) and x.shape[:-1].numel() <= ROWWISE_MAX_ROWS
    return not torch.is_grad_enabled() and not (rowwise and torch.compiler.is_compiling())


class FusedAttention(Attention):
    """Attention whose query, key and value projections run as one product (`fuse_projections`)."""

    wqkv: nn.Linear

    def forward(self, x: torch.Tensor, pos: Positions, query_index: torch.Tensor | None = None) -> torch.Tensor:
        if not _fused_pays(self.wqkv, x):
            return super().forward(x, pos, query_index)
        q, xk, xv = self.wqkv(x).split([self.wq.out_features, self.wk.out_features, self.wv.out_features], -1)
        k, v = self.store(xk, xv, pos)
        if query_index is not None:
            # Queries of every token, then the selected one's: the weights are read once either way.
            q, pos = select_tokens(q, query_index), pos.select(query_index)
        return self.attend(q, k, v, pos)

    def _apply(self, fn, recurse=True):
        # .to() and the like move each parameter apart from the fused weight: fuse them again.
        super()._apply(fn, recurse)
        _fuse(self, "wqkv", [self.wq, self.wk, self.wv])
        return self


class FusedFeedForward(FeedForward):
    """FeedForward whose gate and up projections (w1, w3) run as one product (`fuse_projections`)."""

    w13: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fused_pays(self.w13, x):
            return super().forward(x)
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _fuse(self, "w13", [self.w1, self.w3])
        return self


def _fuse(module: nn.Module, name: str, parts: list[nn.Linear]) -> None:
    """Give `module` a linear layer `name` over the stacked weights of `parts`, whose weights become
    row views of it: the same parameters and memory, one product instead of len(parts)."""
    weight = torch.cat([part.weight.detach() for part in parts])
    # On the meta device (no memory, no init) until it takes the fused weight; skip_init's to_empty
    # would run a meta empty_like, whose first use imports much of torch's compiler stack (0.4 s).
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    # A RowwiseLinear stays one; a PackedLinear's packed copy is the caller's to make (DecodeSteps).
    fused.__class__ = RowwiseLinear if isinstance(parts[0], RowwiseLinear) else nn.Linear
    fused.weight = nn.Parameter(weight, requires_grad=False)
    start = 0
    for part in parts:
        rows = part.weight.shape[0]
        # The same Parameter objects, their storage now the fused weight's: an optimizer that holds
        # them still trains the model, and its in-place updates reach the fused product.
        part.weight.data = weight[start:start + rows]
        start += rows
    # Not a submodule: state_dict(), parameters() and .to() see the parameters alone, as before.
    object.__setattr__(module, name, fused)


def fuse_projections(model: Transformer) -> Transformer:
    """Compute each block's wq, wk, wv products as one, and w1, w3 as one, in place and for inference
    (grad-enabled forwards are unchanged). At batch 1 a decode step is a chain of matrix-vector
    products, each paying a kernel's fixed cost; fused, the same bytes stream in fewer kernels. The
    parameters become views of the fused weights (a later .to() fuses the moved ones again)."""
    for block in [*model.layers, *model.extra_heads]:
        attention, ffn = block.attention, block.feed_forward
        if type(attention) is Attention:
            _fuse(attention, "wqkv", [attention.wq, attention.wk, attention.wv])
            attention.__class__ = FusedAttention
        if type(ffn) is FeedForward:
            _fuse(ffn, "w13", [ffn.w1, ffn.w3])
            ffn.__class__ = FusedFeedForward
    return model


def unfuse_projections(model: Transformer) -> Transformer:
    """Undo `fuse_projections`, in place: each block runs its separate products again (the
    parameters stay views of what were the fused weights, which is all they need)."""
    for block in [*model.layers, *model.extra_heads]:
        if isinstance(block.attention, FusedAttention):
            del block.attention.__dict__["wqkv"]
            block.attention.__class__ = Attention
        if isinstance(block.feed_forward, FusedFeedForward):
            del block.feed_forward.__dict__["w13"]
            block.feed_forward.__class__ = FeedForward
    return model


def block_products(block: nn.Module) -> list[nn.Linear]:
    """The linear layers a block's forward without gradients runs: its fused products where
    `fuse_projections` made them, its separate ones elsewhere."""
    attention, ffn = block._modules["attention"], block._modules["feed_forward"]  # (no nn.Module.__getattr__: hot)
    return ([attention.wqkv] if isinstance(attention, FusedAttention) else [attention.wq, attention.wk, attention.wv]) \
        + [attention.wo, ffn.w2] + ([ffn.w13] if isinstance(ffn, FusedFeedForward) else [ffn.w1, ffn.w3])


def inference_products(model: Transformer) -> list[nn.Linear]:
    """The linear layers a forward without gradients runs: every block's (`block_products`) and the
    unembedding."""
    return [model.output] + [m for block in [*model.layers, *model.extra_heads] for m in block_products(block)]


@dataclass
class StepTimes:
    """Recent wall times of one step shape. The first call's is not kept: it includes compiling."""

    calls: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=16))

    def add(self, seconds: float) -> None:
        self.calls += 1
        if self.calls > 1:
            self.recent.append(seconds)

    @property
    def cost(self) -> float | None:
        """The least recent time (noise only adds time), or None before a kept time."""
        return min(self.recent) if self.recent else None


# torch.compile options for frozen steps (`DecodeSteps(freeze=True)`): the weights become constants
# (inductor's freezing), which lets max-autotune's C++ GEMM template pack them once for AMX / AVX-512
# tiles and pick, per product shape, that kernel or ATen's, whichever its benchmark finds faster (and
# not print its timings of every shape to stderr, in the middle of a user's generated text).
FROZEN_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                  "autotune_num_choices_displayed": 0}


# Checks inductor's generated code makes around its kernel calls (the sizes, strides and alignment of
# extern kernels' outputs, the range of scalars): some 150 Python calls in a greedy self-speculative
# step of the shipped model. A step's shapes are fixed when it is traced; these check nothing per call
# that the tests of the kernels and steps do not. Dropped wherever steps take options (no mode).
UNCHECKED_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}


# Guards dynamo checks before every call that frozen steps do not need: the structure of the model's
# modules (hooks, attribute types, absent attributes) and the identity of its parameters (and of the
# kernels' packed weights), which a frozen graph holds as constants and never reads again. Some 1,200 of a step's 1,650 guards on the shipped
# model, ~0.1 ms a call; the guards on inputs, on the KV caches and on module constants stay.
_MODULE_STRUCTURE_GUARDS = {"EMPTY_NN_MODULE_HOOKS_DICT", "TYPE_MATCH", "NOT_PRESENT_IN_GENERIC_DICT"}


def _frozen_guards(guards) -> list[bool]:
    """torch.compile's guard_filter_fn for frozen steps: which guards to keep (see above). Any guard this
    does not recognise (guard entries are no stable API) is kept."""

    def needed(guard) -> bool:
        try:
            if guard.guard_type == "ID_MATCH" and (isinstance(guard.value, nn.Parameter)
                                                   or getattr(guard.value, "is_packed_weight", False)):
                return False
            return not (guard.guard_type in _MODULE_STRUCTURE_GUARDS
                        and guard.orig_guard.source.is_unspecialized_nn_module())
        except AttributeError:
            return True

    return [needed(guard) for guard in guards]


def _frozen(compiled):
    """`compiled` called with inductor's freezing on: dynamo reads that flag (not the compile options)
    when it traces, to take the parameters as constants of the graph; set per call, since any call
    may trace a new shape, and only then, so other compiled code in the process is left as it was."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)(compiled)


def _room_for_a_second_copy(model: nn.Module) -> bool:
    """Whether the host's memory holds the weights twice with room to spare: frozen steps keep a packed
    copy beside the model's (a 7B model in bf16 on a 24 GiB host would not fit)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * weights < 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Compiled CPU steps attend the slots they write rounded up to a multiple of WINDOW (whole vectors for the
# mask and the fused single-query attention, and never a span of 1, which dynamo would specialise).
WINDOW = 16
# Compiled GPU steps attend the least power of two from MIN_SPAN slots that holds their positions: few
# distinct spans, since each is a CUDA graph of its own. 512 slots hold a short prompt and `multitoken
# generate`'s 256 tokens: one span, one compile.
MIN_SPAN = 512


def span_length(span: int | torch.Tensor | None) -> int | None:
    """A step's span given as an int, or as compiled steps receive it: a tensor of that length
    (`DecodeSteps.window`)."""
    return span.shape[0] if isinstance(span, torch.Tensor) else span


class DecodeSteps:
    """`step`, `draft` and `greedy` (both fused in one graph) for `model`, eager or compiled (`mode`
    is torch.compile's, e.g. "reduce-overhead" for CUDA graphs on a GPU). `freeze` compiles the steps
    with the weights as constants, packed for the CPU's matrix units (`FROZEN_OPTIONS`; default: on a
    CPU in bfloat16 or float16 when memory holds the weights twice, where it halves a step's time; a
    packed copy of the weights is kept beside the model's, and later changes to the parameters are
    not seen: build new steps).
    `rowwise` makes compiled single-row products fused reductions (`use_rowwise_matmuls`; default:
    on a CPU in bf16 when not frozen); `fuse` computes each block's q, k, v products as one and w1, w3
    as one (`fuse_projections`; default: on, eager too: 8-12% off an eager bf16 step of the shipped
    model; fuse=False separates them again, `unfuse_projections`); `single_query` makes compiled attention of one query per row multiplies and sums
    (`single_query_attention`; default: compiled on a CPU); `flex` makes compiled attention FlexAttention
    (`masked_flex_attention`; default off: slower than SDPA's kernels on an H200, `benchmarks/bench_gpu.py --attention flex sdpa`);
    `dynamic_span` compiles one graph for every span short of the whole cache, with spans of the
    written slots rounded up to WINDOW, instead of one per power of two (default: compiled on a CPU).
    `cpu_kernels` runs bf16 products and attention in `multitoken.kernels` (default: bf16 on a CPU where
    they run and memory holds a packed copy of the weights; eager steps too, with their norms,
    rotations and indexed cache stores as kernel calls), which compute each token
    of a multi-token step exactly as a 1-token step does: bf16 self-speculation then emits plain
    decoding's tokens (compiled, with inductor rounding to bf16 where eager does). It takes the place
    of `single_query` and `rowwise`.
    Frozen steps also skip dynamo's guards on the model's modules before each call (`_frozen_guards`),
    and steps compiled without a mode inductor's checks around its kernel calls (`UNCHECKED_OPTIONS`);
    `compile_options` are inductor options over these defaults (e.g. {"cpp_wrapper": True}).
    `group_heads` runs the extra heads as one computation where the kernels run them (`grouped_heads`;
    default on: the same drafts, fewer calls)."""

    def __init__(self, model: Transformer, compile: bool = False, mode: str | None = None,
                 rowwise: bool | None = None, fuse: bool | None = None, freeze: bool | None = None,
                 single_query: bool | None = None, dynamic_span: bool | None = None, cpu_kernels: bool | None = None,
                 compile_options: dict | None = None, group_heads: bool = True, flex: bool = False):
        if not model.has_caches:
            raise ValueError("decode steps need KV caches: call model.setup_caches(batch, seq_len) first")
        self.model = model
        self.compiled = compile
        self.forced_span: int | None = None  # see `spanning`
        self.retire_rows = True  # see `batch_size`
        device = model.tok_embeddings.weight.device
        self.dynamic_span = compile and (device.type == "cpu" if dynamic_span is None else dynamic_span)
        self.device = device
        self._slots = torch.empty(0, dtype=torch.uint8, device=device)  # windows are views of it
        # Wall times of self-speculative steps by (batch, drafts), for draft_heads="auto" (speculative.py):
        # kept with the steps, so they are learnt once per model and machine.
        self.step_times: dict[tuple[int, int], StepTimes] = {}
        self.step = self._step
        self.draft = self._draft
        self.greedy = self._greedy
        weight = model.tok_embeddings.weight
        low_precision_cpu = weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
        room = _room_for_a_second_copy(model)
        if cpu_kernels is None:
            cpu_kernels = weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and kernels.available() and room
        if freeze is None:
            freeze = compile and mode is None and low_precision_cpu and room
        if freeze and (not compile or mode is not None):
            raise ValueError("freeze=True is for steps compiled without a mode (compile=True, mode=None)")
        self.frozen = freeze
        if flex and (not compile or device.type != "cuda"):
            raise ValueError("flex=True is for compiled steps on a GPU (compile=True, a CUDA model): inductor's "
                             "CPU FlexAttention does not take the steps' cache views; leave flex off here")
        if compile_options and mode is not None:
            raise ValueError("compile_options are for steps compiled without a mode (torch.compile takes one or the other)")
        options = {**FROZEN_OPTIONS, "guard_filter_fn": _frozen_guards} if freeze else {}
        if mode is None:
            options.update(UNCHECKED_OPTIONS)
            if cpu_kernels:
                # Round to bf16 wherever eager rounds: fused kernels otherwise keep float32 in between, and
                # how much they keep changes with the step's shape, so a verify step's tokens would round
                # unlike a 1-token step's (the kernels' own products and attention do not depend on it).
                options["emulate_precision_casts"] = True
            options.update(compile_options or {})
        # torch.compile takes a mode or inductor options, not both (without a mode, options is never empty).
        self._compile_kwargs = {"options": options} if mode is None else {"mode": mode}
        self._compiled_fns: dict = {}
        if rowwise is None:
            # Frozen steps pack the weights for their own kernels, which read them faster than the reductions.
            rowwise = low_precision_cpu and weight.dtype == torch.bfloat16 and not freeze and not cpu_kernels
        if compile and rowwise:
            use_rowwise_matmuls(model)
        # After use_rowwise_matmuls, so that fused products are row-wise too. Steps of either kind may
        # come and go on one model (an eager one beside compiled ones): each sets what it runs.
        self.fused = fuse is not False
        (fuse_projections if self.fused else unfuse_projections)(model)
        self.cpu_kernels = cpu_kernels
        self.group_heads = group_heads
        # Packed copies of exactly the products these steps run: earlier steps may have packed others
        # (separate q, k, v before fusing), and the copies they made of these are kept.
        products = inference_products(model)
        kept = {id(p) for p in products} if cpu_kernels else set()
        kernels.use_packed_matmuls([m for m in [*model.modules(), *products] if id(m) not in kept], packed=False)
        if cpu_kernels:
            kernels.use_packed_matmuls(products)
        if single_query is None:
            single_query = compile and weight.device.type == "cpu"
        kernels.use_kernel_modules(model.modules(), cpu_kernels)
        for block in [*model.layers, *model.extra_heads]:
            block.attention.sdpa = (kernels.attention if cpu_kernels else masked_flex_attention if flex
                                    else single_query_attention if single_query else scaled_dot_product)
            block.attention.rotate = kernels.rotate if cpu_kernels else apply_rope
        if compile:
            # One graph per (batch, tokens) shape: batch sizes times draft counts can pass dynamo's default 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.step = self.compile_fn(self._step)
            self.draft = self.compile_fn(self._draft)
            self.greedy = self.compile_fn(self._greedy)

    def compile_fn(self, fn):
        """`fn` compiled as these steps are (once per function), for fused forwards defined beside the
        decoding loops that use them (tree.greedy_tree_step); `fn` itself for eager steps. `fn` takes
        its span as a keyword (an int, or None for the whole cache); compiled, it receives the span's
        `window` instead, so that dynamo need not compile each int anew."""
        if not self.compiled:
            return fn
        if fn not in self._compiled_fns:
            compiled = torch.compile(fn, dynamic=False, fullgraph=True, **self._compile_kwargs)
            compiled = _frozen(compiled) if self.frozen else compiled

            def windowed(*args, span: int | None = None):
                return compiled(*args, span=self.window(span))

            self._compiled_fns[fn] = windowed
        return self._compiled_fns[fn]

    def batch_size(self, rows: int) -> int | None:
        """The batch size at which a decoding loop runs its `rows` unfinished rows once others have
        finished (None: keep the batch as it is). Eager, exactly `rows`; compiled on a CPU, the next
        power of two, so that rows leaving a batch of B compile at most log2(B) more graphs. Compiled
        on a GPU the batch stays: a step of a few rows costs there about what a full batch's does, and
        each new batch size would compile (and capture a CUDA graph) again. `retire_rows = False`
        keeps every batch whole (finished rows ride along to the end)."""
        if not self.retire_rows:
            return None
        if not self.compiled:
            return rows
        if self.device.type != "cpu":
            return None
        return 1 << (rows - 1).bit_length()

    def span(self, end: int) -> int | None:
        """The cache span a compiled step attends when its rows write below slot `end` (see the module
        docstring), at most the cache. None for eager steps, which attend exactly the prefix their
        positions need."""
        if not self.compiled:
            return None
        if self.forced_span is not None:
            return self.forced_span
        if self.dynamic_span:
            span = -(-end // WINDOW) * WINDOW
        else:
            span = MIN_SPAN
            while span < end:
                span *= 2
        return min(span, self.model.args.max_seq_len)

    def spans(self, end: int) -> list[int]:
        """A span for every graph that steps writing below slot `end` compile: what a warm-up compiles
        (`spanning`). With dynamic spans, one graph serves every span short of the whole cache and
        another the whole cache (the slice of all of it is contiguous; a shorter one is not)."""
        spans = {self.span(e) for e in range(1, min(end, self.model.args.max_seq_len) + 1)} - {None}
        if self.dynamic_span:
            full = self.model.args.max_seq_len
            spans = {min(spans)} | (spans & {full})
        return sorted(spans)

    def window(self, span: int | None) -> torch.Tensor:
        """`span` (None: the whole cache) as compiled steps receive it: a tensor of that length, a view
        of one buffer, its length marked dynamic where spans are (`dynamic_span`). Dynamo specialises
        every int argument, so an int span would compile a graph per span."""
        span = span or self.model.args.max_seq_len
        if self._slots.shape[0] < span:
            self._slots = torch.empty(max(span, self.model.args.max_seq_len), dtype=torch.uint8,
                                      device=self._slots.device)
        window = self._slots[:span]
        if self.dynamic_span:
            torch._dynamo.maybe_mark_dynamic(window, 0)
        return window

    @contextmanager
    def spanning(self, span: int):
        """Every compiled step attends `span` slots inside the block, whatever its positions: a short
        warm-up then compiles the steps of the span a long generation will reach."""
        self.forced_span = span
        try:
            yield
        finally:
            self.forced_span = None

    def _positions(self, start: torch.Tensor, bsz: int, seqlen: int, span: int | torch.Tensor | None) -> Positions:
        # Compiled steps need a fixed span (the whole cache unless told); eager ones read the positions.
        if self.cpu_kernels and not self.compiled:
            return kernels.row_positions(self.model, start, seqlen)
        return self.model.positions(start, bsz, seqlen,
                                    span=(span_length(span) or self.model.args.max_seq_len) if self.compiled else None)

    def _step(self, tokens: torch.Tensor, start: torch.Tensor, span: int | torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (batch, seq) at positions start[b] .. start[b] + seq - 1 of each row: the trunk output
        (batch, seq, dim) and the next-token head's float32 logits (batch, seq, vocab). Compiled, the
        step attends the cache's first `span` slots (`span(end)`; default: all of them)."""
        return self._verify(tokens, self._positions(start, tokens.shape[0], tokens.shape[1], span))

    def _verify(self, tokens: torch.Tensor, pos: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` at given positions."""
        m = self.model
        h = m.forward_trunk(tokens, pos)
        return h, m.logits(m.forward_head(0, h, pos))

    def _draft(self, h: torch.Tensor, start: torch.Tensor, index: torch.Tensor, k: int,
               span: int | torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, k, vocab) of extra heads 1 .. k at token index[b] of each row of the trunk
        output h of a `step` at `start`; the heads' keys and values are cached for every token of h."""
        return draft_logits(self.model, h, self._positions(start, h.shape[0], h.shape[1], span), index, k,
                            grouped=self.group_heads)

    def _greedy(self, tokens: torch.Tensor, start: torch.Tensor, k: int, span: int | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A greedy self-speculative step in one forward: tokens (batch, 1 + j) are each row's last token
        and j drafts at `start`. Returns the next-token head's tokens (batch, 1 + j), of which each row
        emits the first n_acc + 1 (accepted drafts equal the head's tokens); n_acc (batch,), the
        drafts the head agrees with before its first disagreement; and k new drafts (batch, k) from the
        extra heads at the last accepted position."""
        m = self.model
        pos = self._positions(start, tokens.shape[0], tokens.shape[1], span)  # once for the step and the drafts
        h = m.forward_trunk(tokens, pos)
        heads = m.heads[: k + 1]
        if self.group_heads and tokens.numel() <= ALL_HEADS_MAX_ROWS and grouped_heads.usable(heads, h):
            # Every head at every token, then the drafts at the accepted token: one call for the heads
            # and one pass over the unembedding, where drafting after acceptance makes two. Each token's
            # output is what the head computes for it alone (the kernels' rows are independent). The
            # logits stay bf16: float32 would hold the same values, so the same argmax.
            return accept_chain(tokens, m.output(m.norm(grouped_heads.forward(heads, h, pos))))
        target = greedy_tokens(m.logits(m.forward_head(0, h, pos)))
        n_acc = leading_true(target[:, :-1] == tokens[:, 1:])
        return target, n_acc, greedy_tokens(draft_logits(m, h, pos, n_acc, k, grouped=self.group_heads))


def accept_chain(tokens: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A greedy self-speculative step's acceptance given the logits (batch, seq, 1 + k, vocab) of every head
    at every token of tokens (batch, seq), each row's last token then its drafts: the next-token head's
    tokens (batch, seq), the drafts each row accepts (batch,) and the extra heads' tokens at the last
    accepted token (batch, k), the next drafts. In one kernel call where `kernels.tree_ops` (eagerly, on a
    CPU: ~0.1 ms of ATen calls less a step at batch 1 here), else as ATen computes it below."""
    if kernels.tree_ops(logits):
        return torch.ops.multitoken.accept_chain.default(tokens, logits)
    chosen = greedy_tokens(logits)
    target = chosen[..., 0]
    n_acc = leading_true(target[:, :-1] == tokens[:, 1:])
    return target, n_acc, chosen[torch.arange(tokens.shape[0], device=tokens.device), n_acc, 1:]


def leading_true(ok: torch.Tensor) -> torch.Tensor:
    """The number of leading True values in each row of ok (batch, j): how many drafts a row accepts
    before its first rejection. An argmax, which compiled steps fuse with the comparison before it (a
    cumulative product is an operator call of its own: 40-50 us in the shipped model's compiled step)."""
    if ok.shape[-1] == 0:
        return ok.new_zeros(ok.shape[:-1], dtype=torch.long)
    return torch.where(ok.all(-1), ok.shape[-1], (~ok).int().argmax(-1))


def draft_logits(model: Transformer, h: torch.Tensor, pos: Positions, index: torch.Tensor, k: int,
                 grouped: bool = True) -> torch.Tensor:
    """Logits (batch, k, vocab) of extra heads 1..k at token `index` of each row: the heads' keys and
    values are cached for every token of h, their full forward runs at `index` alone; as one computation
    where the CPU kernels run them (`grouped_heads`; unless `grouped=False`), else head by head."""
    heads = list(model.extra_heads)[:k]
    if grouped and grouped_heads.usable(heads, h):
        heads_out = grouped_heads.forward(heads, h, pos, index)
    else:
        heads_out = torch.cat([model.forward_head(j, h, pos, index) for j in range(1, k + 1)], dim=1)
    return model.logits(heads_out)  # one pass over the unembedding for all k heads
