"""CPU kernels of our own for bf16 decode steps (`csrc/packed_linear.cpp`): products of a few rows
(`PackedLinear`) and attention of a few queries (`attention`); and, for eager steps, whose time goes
mostly to calling operators, the norms (`KernelRMSNorm`), rotations (`rotate`) and indexed KV cache
stores (`KernelKVCache`) each as one call (eight, nine and about twelve operator calls in ATen), and
a whole block as one call where all of its parts run in the kernels (`KernelBlock`).
Beside them (`csrc/top_p.cpp`), the top-p truncation of sampling's distributions (`top_p`), ATen's
numbers bit for bit at a third to a half of its cost; and (`csrc/tree.cpp`) a draft tree's bookkeeping
between forwards (`tree_ops`), each step a few calls where ATen needs over a hundred on tiny tensors.

A decode step multiplies 1 to a few dozen rows (a token, or the last token and its drafts, per batch
row) by every weight matrix. ATen's bf16 products pay ~30 us a call here whatever their size and grow
with every row; the kernel reads weights packed for AVX-512 BF16's pairwise multiply-add from memory
once whatever the rows (a tile at a time, from cache for its later rows). On the 2-core AVX-512 BF16
host, a (1536 x 256) product of 1 row took 10 us (ATen 58), of 4 rows 14 (ATen 68). Each output, and each query's attention, is the same float32 sum in the same order
whatever the other rows are, so a token's result does not depend on the tokens beside it.

On CPUs with AMX (Intel's tile unit: Xeons from Sapphire Rapids on) every product whose inputs are
a multiple of 32 runs on its tiles instead, whatever its rows (their sums round unlike vdpbf16ps's,
but each row's alone, so a verify step still computes each token as a 1-token step does): the
shipped model's products of 64 rows in 1.5 ms instead of 7.4 (ATen 2.9), of 16 in 0.85 instead of
2.2, of 1 in 0.8 instead of 0.7. MULTITOKEN_AMX=0 keeps vdpbf16ps.

The kernels are built on first use with the host's C++ compiler (~10 s, cached under
~/.cache/multitoken), only on x86-64 Linux CPUs that report avx512_bf16; `available()` says whether
they run here, and everything falls back to ATen where it does not. MULTITOKEN_KERNELS=0 turns them off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from multitoken.model import KVCache, Positions, RMSNorm, Transformer, TransformerBlock, apply_rope, scaled_dot_product

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "packed_linear.cpp"
# Built into one library with SOURCE: top-p truncation for sampling (`top_p`), a draft tree's bookkeeping (`tree_ops`).
SOURCES = (SOURCE, Path(__file__).parent / "csrc" / "top_p.cpp", Path(__file__).parent / "csrc" / "tree.cpp")
BLOCK = 16  # outputs per packed block: one 512-bit vector of float32 sums
TILE = 128  # outputs per packed tile: 8 blocks, whose weights are one stream in memory
# Up to this many rows (tokens x batch) a product runs in the kernel; more (a prefill) go to ATen,
# whose blocked GEMMs win once the weights are read often enough.
PACKED_MAX_ROWS = 64
# Up to this many queries per row attention runs in the kernel (`attention`).
ATTENTION_MAX_QUERIES = 64


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _build(so_path: Path, sources: Path | Iterable[Path] = SOURCES) -> None:
    """Compile `sources` against this torch into so_path (a temporary name, then renamed: concurrent
    builds and a killed one never leave a half-written library)."""
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    sources = [sources] if isinstance(sources, Path) else list(sources)
    so_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so_path.parent) as tmp:
        out = Path(tmp) / so_path.name
        cmd = [os.environ.get("CXX", "c++"), "-O3", "-std=c++20", "-shared", "-fPIC", "-march=x86-64-v4",
               "-mavx512bf16", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[f"-I{p}" for p in include_paths()], *map(str, sources), "-o", str(out),
               # torch's own OpenMP runtime (libgomp.so.1 in torch/lib), already loaded: one thread pool.
               f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
        try:
            subprocess.run([*cmd, "-mamx-tile", "-mamx-bf16"], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError:
            # A compiler without AMX: the kernels without it (products on vdpbf16ps alone).
            subprocess.run([*cmd, "-DMULTITOKEN_NO_AMX"], check=True, capture_output=True, text=True)
        out.replace(so_path)


def _packed_linear_shape(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    # What torch.compile traces in place of the kernel: the output's shape and dtype.
    return x.new_empty(*x.shape[:-1], out_features)


def _attention_shape(q: torch.Tensor, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    # (..., batch, heads, n_q, dim) laid out (..., batch, n_q, heads, dim), as the kernel returns it.
    return q.new_empty(*q.shape[:-3], q.shape[-2], q.shape[-3], q.shape[-1]).transpose(-3, -2)


def _rms_norm_shape(x: torch.Tensor, weights: list[torch.Tensor], eps: float, per_group: bool) -> torch.Tensor:
    return x.new_empty(x.shape if per_group else (len(weights), *x.shape))


def _rope_shape(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


def _top_p_shape(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    return probs.new_empty(probs.shape)


def supported() -> bool:
    """Whether the kernels can run on this host (without building them): x86-64 Linux with AVX-512 BF16,
    and not turned off (MULTITOKEN_KERNELS=0)."""
    return (os.environ.get("MULTITOKEN_KERNELS", "1") != "0" and platform.system() == "Linux"
            and platform.machine() == "x86_64" and "avx512_bf16" in _cpu_flags())


def _so_path() -> Path:
    # One build per version of the sources and torch, kept across processes.
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + torch.__version__.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MULTITOKEN_CACHE", Path.home() / ".cache" / "multitoken"))
    return cache / "kernels" / key / "packed_linear.so"


def built() -> bool:
    """Whether a build of the kernels for this source and torch is cached (`available()` then loads it
    at once rather than compiling for ~10 s)."""
    return _so_path().exists()


@functools.cache
def available() -> bool:
    """Whether the kernel runs on this host (built and loaded on the first call)."""
    if not supported():
        return False
    so_path = _so_path()
    try:
        if not so_path.exists():
            log.info("building the packed bf16 kernel into %s", so_path)
            _build(so_path)
        torch.ops.load_library(str(so_path))
        for op, shape in [("packed_linear", _packed_linear_shape), ("packed_linear_group", _packed_linear_shape),
                          ("few_query_attention", _attention_shape), ("few_query_attention_group", _attention_shape),
                          ("rms_norm", _rms_norm_shape), ("rope", _rope_shape), ("top_p", _top_p_shape)]:
            torch.library.register_fake(f"multitoken::{op}")(shape)
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("multitoken: the bf16 CPU kernels did not build or load (%s); using ATen's", build_error(e))
        return False
    return True


def build_error(e: Exception) -> str:
    """The line of a failed build's (or load's) output that says what went wrong."""
    lines = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
    return next((line for line in lines if "error" in line), lines[-1] if lines else repr(e))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 (out, in) weight as the kernel reads it: (tiles, in / 2, 8, 32), for each tile of 128 outputs
    and each pair of consecutive inputs, 8 vectors of 16 outputs x 2 inputs (one stream in memory per
    tile); outputs padded with zeros to a multiple of 128."""
    out_features, in_features = weight.shape
    if in_features % 2:
        raise ValueError(f"packed products need an even number of input features, got {in_features}")
    tiles = -(-out_features // TILE)
    w = F.pad(weight.detach().to(torch.bfloat16), (0, 0, 0, tiles * TILE - out_features))
    w = w.reshape(tiles, TILE // BLOCK, BLOCK, in_features // 2, 2).permute(0, 3, 1, 2, 4)
    return w.reshape(tiles, in_features // 2, TILE // BLOCK, 2 * BLOCK).contiguous()


def _version(weight: torch.Tensor) -> tuple[int, int]:
    """What changes when a weight does: its storage, or its version counter (bumped by in-place updates,
    an optimizer's too). Inference tensors keep no counter; they cannot be changed in place outside
    inference mode anyway."""
    try:
        return weight.data_ptr(), weight._version
    except RuntimeError:
        return weight.data_ptr(), -1


class PackedLinear(nn.Linear):
    """nn.Linear without bias that, for inference with up to PACKED_MAX_ROWS rows of bf16 input, runs the packed kernel
    on a packed copy of its weight (`packed`, made by `use_packed_matmuls`; not in the state dict).
    With gradients on, more rows, or no packed copy, it is nn.Linear. Eagerly the copy follows changes
    to the weight; a compiled graph keeps the copy it was traced with (build new steps after training)."""

    _packed_from: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each module attribute read is a lookup of its own (~1 us), and an eager step makes ~50 of these calls.
        weight = self.weight
        if self.packed is None or torch.is_grad_enabled() or x.dtype != torch.bfloat16 or x.shape[:-1].numel() > PACKED_MAX_ROWS:
            return F.linear(x, weight)
        # The weight's shape, not self.out_features: compiled steps guard every plain attribute they read.
        return torch.ops.multitoken.packed_linear.default(x, self.refresh(weight), weight.shape[0])

    def refresh(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The packed copy, packed again first if the weight (`weight`, if given) changed since it was
        packed (eagerly: a compiled graph keeps its copy)."""
        if torch.compiler.is_compiling():
            return self.packed
        if self._packed_from != _version(self.weight if weight is None else weight):
            self.repack()
        return self._buffers["packed"]  # from the dict: nn.Module.__getattr__ costs ~0.5 us a lookup

    def repack(self) -> None:
        """Pack the current weight (a bf16 CPU one; anything else drops the copy)."""
        w = self.weight
        usable = w.device.type == "cpu" and w.dtype == torch.bfloat16
        # A buffer, not a plain attribute: frozen steps take it as a constant, as they take the weights,
        # and guard it no more than them. Not persistent: the state dict is the model's as it was.
        packed = pack_weight(w) if usable else None
        if packed is not None:
            packed.is_packed_weight = True  # for frozen steps' guard filter (steps._frozen_guards)
        self.register_buffer("packed", packed, persistent=False)
        self._packed_from = _version(w) if usable else None

    def _apply(self, fn, recurse=True):
        # .to() and the like: the copy follows the weight (dropped off the CPU or bf16).
        super()._apply(fn, recurse)
        self.repack()
        return self


def use_packed_matmuls(modules: Iterable[nn.Module], packed: bool = True) -> None:
    """Make each bf16 CPU nn.Linear without bias among `modules` a PackedLinear with its packed copy, in
    place (the same parameters and state dict; the copy doubles their memory); `packed=False` makes every
    PackedLinear among them plain again. Other modules are left as they are."""
    if packed and not available():
        raise RuntimeError("the packed bf16 kernel does not run on this host (it needs x86-64 Linux with "
                           "avx512_bf16 and a C++ compiler): leave products to ATen")
    for module in modules:
        if not packed and type(module) is PackedLinear:
            module._buffers.pop("packed", None)
            module.__class__ = nn.Linear
        elif packed and type(module) is nn.Linear and module.bias is None:
            w = module.weight
            if w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.shape[1] % 2 == 0:
                module.__class__ = PackedLinear
                module.repack()


def linear_group(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """linears[g](x[g]) for each g, stacked: x is (G, ..., in_features), the layers of the same shape. One
    call of the packed kernel where every layer is a PackedLinear it would run (the same outputs, bit for
    bit, as each layer's own call); otherwise each layer in turn."""
    if (all(isinstance(m, PackedLinear) and m.packed is not None for m in linears) and not torch.is_grad_enabled()
            and x.dtype == torch.bfloat16 and x[0].shape[:-1].numel() <= PACKED_MAX_ROWS):
        return torch.ops.multitoken.packed_linear_group(x, [m.refresh() for m in linears], linears[0].weight.shape[0])
    return torch.stack([m(x[g]) for g, m in enumerate(linears)])


def attention_group(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], mask: torch.Tensor | None
                    ) -> torch.Tensor:
    """`attention` of G layers at the same positions: q (G, batch, heads, n_q, head_dim), ks[g] and vs[g]
    layer g's keys and values, one mask. One call of the kernel where it would run each layer's; else
    layer by layer."""
    if _attention_runs(q) and all(k.shape == ks[0].shape for k in ks):
        return torch.ops.multitoken.few_query_attention_group(q, ks, vs, mask)
    return torch.stack([attention(q[g], k, v, mask) for g, (k, v) in enumerate(zip(ks, vs))])


def _attention_runs(q: torch.Tensor) -> bool:
    """Whether `attention` runs queries q (..., heads, n_q, head_dim) in the kernel."""
    dim = q.shape[-1]
    return not (q.dtype != torch.bfloat16 or q.device.type != "cpu" or dim % 16 or dim > 256 or torch.is_grad_enabled()
                or q.shape[-2] > ATTENTION_MAX_QUERIES)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`model.scaled_dot_product` for decode steps: in the kernel for bf16 CPU tensors of up to
    ATTENTION_MAX_QUERIES queries per row and a head_dim that is a multiple of 16 (at most 256), each
    query on its own (bf16 products summed in float32, a float32 softmax); otherwise, and with gradients
    on, scaled_dot_product."""
    if not _attention_runs(q):
        return scaled_dot_product(q, k, v, mask)
    return torch.ops.multitoken.few_query_attention(q, k, v, mask)


def _elementwise_runs(x: torch.Tensor) -> bool:
    """Whether the norm and rotary kernels run on x (..., dim): bf16 on the CPU, dim a multiple of 16, no
    gradients, eagerly (compiled steps leave norms and rotations to inductor, which fuses them with their
    neighbours)."""
    return (x.dtype == torch.bfloat16 and x.is_cpu and not torch.is_grad_enabled() and x.shape[-1] % 16 == 0
            and not torch.compiler.is_compiling() and available())


class KernelRMSNorm(RMSNorm):
    """RMSNorm whose bf16 inference forward is one kernel call (`rms_norm`) instead of eight operator
    calls; the same formula, its sum of squares in an order of its own. Otherwise, and compiled, RMSNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.bfloat16 or not _elementwise_runs(x):
            return super().forward(x)
        return torch.ops.multitoken.rms_norm.default(x, [self.weight], self.eps, False)[0]


class KernelKVCache(KVCache):
    """KVCache whose store is one kernel call (`cache_write`) instead of four operator calls (a step
    at one position for all rows) to a dozen (per-row positions: speculative and tree steps), eagerly;
    otherwise, and compiled, KVCache's."""

    def write(self, pos: Positions, k: torch.Tensor, v: torch.Tensor) -> None:
        cache_k, cache_v = self.k, self.v
        if (k.dtype != cache_k.dtype or v.dtype != cache_k.dtype or cache_k.element_size() != 2 or not k.is_cpu
                or k.stride(-1) != 1 or v.stride(-1) != 1 or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or not available()):
            return super().write(pos, k, v)
        at = isinstance(pos.start, int)
        torch.ops.multitoken.cache_write.default(cache_k, cache_v, k, v, None if at else pos.start,
                                                 pos.start if at else 0, pos.rows)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        # One call (`csrc/tree.cpp`) instead of ATen's indexed gather and store of keys and values (~25 us a block).
        if tree_ops(src) and self.k.is_contiguous() and self.v.is_contiguous():
            torch.ops.multitoken.move_cache_entries.default([self.k, self.v], src, dst)
        else:
            super().move(src, dst)


def block_parts(block: TransformerBlock) -> tuple:
    """A block's attention, feed-forward and two norms, read from its module dict: nn.Module.__getattr__
    costs ~0.5 us a lookup, and eager decode steps read these parts hundreds of times a step."""
    m = block._modules
    return m["attention"], m["feed_forward"], m["attention_norm"], m["ffn_norm"]


def block_operands(attention: nn.Module, feed_forward: nn.Module, attention_norm: RMSNorm, ffn_norm: RMSNorm
                   ) -> tuple[list[torch.Tensor | None], list[int], list[torch.Tensor]]:
    """What the `block` and `head_group` kernels take of a block with fused products (`block_parts`):
    the packed copies of its q/k/v, wo, gate/up and w2 products (None where one is not a PackedLinear),
    their output sizes, and its two norms' weights; read from the modules' dicts, as block_parts."""
    products = (attention.__dict__["wqkv"], attention._modules["wo"], feed_forward.__dict__["w13"],
                feed_forward._modules["w2"])
    packed = [p.refresh(p._parameters["weight"]) if type(p) is PackedLinear else None for p in products]
    return (packed, [p._parameters["weight"].shape[0] for p in products],
            [attention_norm._parameters["weight"], ffn_norm._parameters["weight"]])


class KernelBlock(TransformerBlock):
    """TransformerBlock whose eager bf16 inference forward over all its tokens is one kernel call
    (`block`) where the decode steps' kernels run every part of it: fused q/k/v and gate/up products
    (`steps.fuse_projections`), all four packed, kernel norms, rotations and attention, a bf16 cache,
    at most PACKED_MAX_ROWS tokens. The same operations in the same order, the residual adds and the
    SiLU rounded as ATen's, called from C++ instead of ~30 calls from Python: the same numbers bit for
    bit, in half the time at batch 1 here (~60 us a block instead of ~125). Otherwise (a query_index,
    gradients, compiling, other modules), TransformerBlock's forward."""

    def forward(self, x: torch.Tensor, pos: Positions, query_index: torch.Tensor | None = None) -> torch.Tensor:
        if query_index is not None or torch.compiler.is_compiling():
            return super().forward(x, pos, query_index)
        # Submodules, parameters and buffers are read from their dicts: each nn.Module.__getattr__ costs
        # ~0.5 us, and this call made ~40 (eager batch-1 decoding of the shipped model: ~10% of its time).
        a, f, norm1, norm2 = block_parts(self)
        # The fused products are instance attributes, not submodules (steps._fuse).
        wqkv, w13, cache = a.__dict__.get("wqkv"), f.__dict__.get("w13"), a._modules.get("cache")
        if (wqkv is None or w13 is None or cache is None or a.sdpa is not attention or a.rotate is not rotate
                or type(norm1) is not KernelRMSNorm or type(norm2) is not KernelRMSNorm or not _elementwise_runs(x)
                or x.dim() != 3 or x.shape[0] * x.shape[1] > PACKED_MAX_ROWS or x.shape[1] > ATTENTION_MAX_QUERIES
                or a.head_dim % BLOCK or a.head_dim > 256):
            return super().forward(x, pos, query_index)
        packed, out_features, norms = block_operands(a, f, norm1, norm2)
        cache_k = cache._buffers["k"]
        # (`None in packed` would compare None with each tensor: ~10 us apiece.)
        if any(p is None for p in packed) or any(w.dtype != x.dtype for w in norms) or cache_k.dtype != x.dtype:
            return super().forward(x, pos, query_index)
        at = isinstance(pos.start, int)
        return torch.ops.multitoken.block.default(
            x, packed, out_features, norms, norm1.eps, a.n_heads, a.n_kv_heads, pos.rope, pos.mask, cache_k,
            cache._buffers["v"], None if at else pos.start, pos.start if at else 0, pos.rows,
            pos.start + x.shape[1] if at else pos.mask.shape[-1])


_KERNEL_CLASSES = {RMSNorm: KernelRMSNorm, KVCache: KernelKVCache, TransformerBlock: KernelBlock}


def use_kernel_modules(modules: Iterable[nn.Module], on: bool = True) -> None:
    """Make each RMSNorm, KVCache and TransformerBlock among `modules` a KernelRMSNorm, KernelKVCache and
    KernelBlock (the same parameters and buffers), in place; `on=False` makes them plain again."""
    for module in modules:
        for plain, kernel in _KERNEL_CLASSES.items():
            if on and type(module) is plain:
                module.__class__ = kernel
            elif not on and type(module) is kernel:
                module.__class__ = plain


def rms_norm(x: torch.Tensor, norms: list[RMSNorm], per_group: bool = False) -> torch.Tensor:
    """Every norm of `norms` on x (..., dim), (G, ..., dim); or with `per_group` norms[g] on x[g] of x
    (G, ..., dim): in one kernel call (bf16 where `_elementwise_runs`; the norms share one eps)."""
    return torch.ops.multitoken.rms_norm.default(x, [n.weight for n in norms], norms[0].eps, per_group)


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`model.apply_rope` for decode steps: x (..., seq, heads, head_dim) rotated by the table rows
    rope ((seq, 2, 1, head_dim), or (batch, seq, ...) with x (..., batch, seq, heads, head_dim)), in one
    kernel call where it runs (`_elementwise_runs`), the same numbers bit for bit; else apply_rope."""
    if not _elementwise_runs(x):
        return apply_rope(x, rope)
    return torch.ops.multitoken.rope.default(x, rope)


def top_p_runs(probs: torch.Tensor) -> bool:
    """Whether `top_p` runs on probs in the kernel: float32 on the CPU, no gradients."""
    return probs.dtype == torch.float32 and probs.is_cpu and not probs.requires_grad and available()


def sampling_runs(probs: torch.Tensor) -> bool:
    """Whether `draw` runs on probs in the kernel: float32 on the CPU, eagerly, no gradients."""
    return top_p_runs(probs) and not torch.compiler.is_compiling()


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`sampling.draw` in one kernel call (where `sampling_runs`): an id per row of probs (..., vocab),
    given uniforms u (...) float64; ATen's ids (the same float64 cumulative sums in the same order)."""
    out = torch.ops.multitoken.draw.default(probs.reshape(-1, probs.shape[-1]), u.to(torch.float64).reshape(-1))
    return out.view(probs.shape[:-1])


def top_p(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """`sampling.probs_from_logits`'s top-p step in one kernel call (where `top_p_runs`): the tokens of
    each row of probs (..., vocab) kept while the probability mass before them (best first) is at most
    top_p, renormalised, in vocabulary order; zeros elsewhere. top_p is a float or a tensor
    broadcastable to probs[..., :1], compared with that mass as ATen compares them (a float as
    float32). ATen's result bit for bit: rows whose cut splits tokens of equal probability (which of
    them stay is torch.sort's order) or lies within a few roundings of top_p take ATen's full sort."""
    rows = probs.shape[:-1]
    if isinstance(top_p, torch.Tensor):
        top_p = top_p.to(probs.device).expand(*rows, 1).reshape(-1).double()
    else:
        top_p = torch.full((rows.numel(),), top_p, dtype=torch.float32).double()
    out = torch.ops.multitoken.top_p.default(probs.reshape(-1, probs.shape[-1]), top_p)
    return out.view(probs.shape)


def tree_ops(x: torch.Tensor) -> bool:
    """Whether a draft tree's bookkeeping for tensors like x runs in the kernels (`csrc/tree.cpp`): eagerly,
    on the CPU. tree.py's functions say what each computes; they are ATen's versions of the same."""
    return x.is_cpu and not torch.compiler.is_compiling() and available()


def row_positions(model: Transformer, start: torch.Tensor, seqlen: int) -> Positions:
    """`model.positions(start, len(start), seqlen)` for per-row offsets start (batch,), in one call
    (`csrc/tree.cpp`) where `tree_ops(start)`, else that call."""
    if not tree_ops(start):
        return model.positions(start, start.shape[0], seqlen)
    if start.shape[0] > model.args.max_batch_size:
        raise ValueError(f"batch of {start.shape[0]} exceeds max_batch_size={model.args.max_batch_size}")
    return Positions(*torch.ops.multitoken.row_positions.default(start, seqlen, model.rope))
