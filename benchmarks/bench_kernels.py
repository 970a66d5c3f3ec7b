"""`multitoken.kernels` against ATen, operator by operator, interleaved in one run.

    python benchmarks/bench_kernels.py --ckpt-dir CKPT [--rows 1 2 4 5 8 9 16 17 64] [--queries 1 4 9 17]
        [--keys 144] [--batch 1] [--rounds 12] [--threads 2] [--baseline-source OLD.cpp]

Products: every product a decode step runs (`steps.inference_products` of the model with fused
projections, in bf16), called in a row for each row count, as the packed kernel and as ATen's
F.linear; the time of all of them, the multiply-adds per second and the weight bytes per second.
Attention: one block's attention over --keys cached keys (bf16, masked like a compiled step's) for
each query count and --batch rows, as the kernel and as `model.scaled_dot_product`. Rounds alternate
between the two ways; each figure is the fastest round (noise only adds time). The kernels need x86-64 Linux with
AVX-512 BF16 (`kernels.available()`).

--baseline-source also builds another version of `csrc/packed_linear.cpp` (e.g. `git show
HEAD~1:src/multitoken/csrc/packed_linear.cpp > old.cpp`) under its own operator names and times it in
the same rounds: a kernel change measured against the code it replaces, in one process, where this
host's drift (10-40% between runs) cannot pass for a gain.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from multitoken import kernels
from multitoken.checkpoint import load_model
from multitoken.model import scaled_dot_product
from multitoken.steps import fuse_projections, inference_products


def fastest(calls: dict[str, Callable[[], object]], rounds: int, repeats: int = 5) -> dict[str, float]:
    """Seconds per call of each, the fastest of `rounds` rounds of `repeats` calls, the calls alternating.
    Each round starts with the next call: the kernel and its baseline read the same packed weights, and
    whichever ran right after the other would find them in cache."""
    best = {name: float("inf") for name in calls}
    for call in calls.values():
        call()  # warm: the first call of an operator pays for its thread pool and page faults
    order = list(calls.items())
    for i in range(rounds):
        for name, call in order[i % len(order):] + order[:i % len(order)]:
            t0 = time.perf_counter()
            for _ in range(repeats):
                call()
            best[name] = min(best[name], (time.perf_counter() - t0) / repeats)
    return best


def load_baseline(source: Path) -> object:
    """The operators of another version of the kernels' source, built and loaded as torch.ops.multitoken_baseline."""
    text = source.read_text()
    renamed = text.replace("TORCH_LIBRARY(multitoken,", "TORCH_LIBRARY(multitoken_baseline,")
    renamed = renamed.replace("TORCH_LIBRARY_IMPL(multitoken,", "TORCH_LIBRARY_IMPL(multitoken_baseline,")
    if renamed.count("multitoken_baseline") != 2:
        raise SystemExit(f"error: {source} does not define the multitoken operator library (TORCH_LIBRARY(multitoken, m))")
    with tempfile.TemporaryDirectory(prefix="bench_kernels_") as tmp:  # a loaded library outlives its file
        (Path(tmp) / "baseline.cpp").write_text(renamed)
        try:
            kernels._build(Path(tmp) / "baseline.so", Path(tmp) / "baseline.cpp")
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"error: {source} does not build: {kernels.build_error(e)}") from None
        torch.ops.load_library(str(Path(tmp) / "baseline.so"))
    return torch.ops.multitoken_baseline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 5, 8, 9, 16, 17, 64],
                   help="rows (tokens x batch) per product")
    p.add_argument("--queries", type=int, nargs="+", default=[1, 4, 9, 17], help="queries per row for attention")
    p.add_argument("--keys", type=int, default=144, help="cached keys each query may see")
    p.add_argument("--batch", type=int, default=1, help="rows of the attention calls (each its own keys)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--baseline-source", type=Path, default=None,
                   help="another version of csrc/packed_linear.cpp to time beside the current one")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.baseline_source and not a.baseline_source.is_file():
        raise SystemExit(f"error: --baseline-source {a.baseline_source} is not a file (e.g. git show "
                         "HEAD~1:src/multitoken/csrc/packed_linear.cpp > old.cpp)")
    if not kernels.available():
        raise SystemExit("error: multitoken.kernels do not run on this host (x86-64 Linux with avx512_bf16 and a "
                         "C++ compiler needed)")
    if max(a.rows) > kernels.PACKED_MAX_ROWS or max(a.queries) > kernels.ATTENTION_MAX_QUERIES:
        raise SystemExit(f"error: the kernels take up to {kernels.PACKED_MAX_ROWS} rows and "
                         f"{kernels.ATTENTION_MAX_QUERIES} queries")
    baseline = load_baseline(a.baseline_source) if a.baseline_source else None
    model = load_model(a.ckpt_dir, device="cpu", dtype=torch.bfloat16, max_seq_len=a.keys + max(a.queries))
    fuse_projections(model)
    products = inference_products(model)
    kernels.use_packed_matmuls(products)
    weights = [(m.packed, m.weight) for m in products]
    macs = sum(w.numel() for _, w in weights)
    print(f"{a.ckpt_dir}: {len(weights)} products, {macs / 1e6:.1f}M weights ({2 * macs / 1e6:.1f} MB in bf16), "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}", flush=True)

    extra = f" {'baseline ms':>12} {'baseline / kernel':>18}" if baseline else ""
    print(f"{'rows':>4} {'kernel ms':>10} {'GMAC/s':>7} {'GB/s':>6} {'aten ms':>9} {'GMAC/s':>7} {'aten / kernel':>14}{extra}")
    with torch.inference_mode():
        for rows in a.rows:
            xs = {n: torch.randn(rows, n, dtype=torch.bfloat16) for n in {w.shape[1] for _, w in weights}}
            calls = {
                "kernel": lambda: [torch.ops.multitoken.packed_linear(xs[w.shape[1]], pw, w.shape[0]) for pw, w in weights],
                "aten": lambda: [F.linear(xs[w.shape[1]], w) for _, w in weights],
            }
            if baseline:
                calls["baseline"] = lambda: [baseline.packed_linear(xs[w.shape[1]], pw, w.shape[0]) for pw, w in weights]
                same = all(torch.equal(torch.ops.multitoken.packed_linear(xs[w.shape[1]], pw, w.shape[0]),
                                       baseline.packed_linear(xs[w.shape[1]], pw, w.shape[0])) for pw, w in weights)
            t = fastest(calls, a.rounds)
            k, at = t["kernel"], t["aten"]
            extra = f" {1e3 * t['baseline']:>12.3f} {t['baseline'] / k:>17.2f}x{'' if same else '  (outputs differ)'}" if baseline else ""
            print(f"{rows:>4} {1e3 * k:>10.3f} {rows * macs / k / 1e9:>7.1f} {2 * macs / k / 1e9:>6.1f} "
                  f"{1e3 * at:>9.3f} {rows * macs / at / 1e9:>7.1f} {at / k:>13.2f}x{extra}", flush=True)

        args = model.args
        print(f"\nattention of one block: {args.n_heads} heads, {args.n_kv_heads} kv heads, head_dim {args.head_dim}, "
              f"{a.keys} keys, batch {a.batch}")
        extra = f" {'baseline us':>12} {'baseline / kernel':>18}" if baseline else ""
        print(f"{'queries':>7} {'kernel us':>10} {'aten us':>9} {'aten / kernel':>14}{extra}")
        for n_q in a.queries:
            keys = a.keys + n_q
            q = torch.randn(a.batch, args.n_heads, n_q, args.head_dim, dtype=torch.bfloat16)
            k, v = (torch.randn(a.batch, args.n_kv_heads, keys, args.head_dim, dtype=torch.bfloat16) for _ in range(2))
            # As a compiled step masks: the cache before the new tokens, then causal among them.
            mask = torch.ones(1, 1, n_q, keys, dtype=torch.bool).tril(keys - n_q)
            # The operator itself, as the baseline's is called (kernels.attention's checks cost ~1.5 us a call).
            calls = {"kernel": lambda: torch.ops.multitoken.few_query_attention(q, k, v, mask),
                     "aten": lambda: scaled_dot_product(q, k, v, mask)}
            if baseline:
                calls["baseline"] = lambda: baseline.few_query_attention(q, k, v, mask)
            t = fastest(calls, a.rounds, repeats=50)
            extra = f" {1e6 * t['baseline']:>12.1f} {t['baseline'] / t['kernel']:>17.2f}x" if baseline else ""
            print(f"{n_q:>7} {1e6 * t['kernel']:>10.1f} {1e6 * t['aten']:>9.1f} {t['aten'] / t['kernel']:>13.2f}x{extra}")


if __name__ == "__main__":
    main()
