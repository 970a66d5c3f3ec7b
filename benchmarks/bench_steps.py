"""Compiled decode steps alone, two ways of compiling them side by side, interleaved in one run.

    python benchmarks/bench_steps.py --ckpt-dir CKPT [--compare fuse|freeze|attention|kernels|checks|wrapper|heads]
        [--dtype float32] [--batch 1] [--position 64] [--rounds 8] [--calls 10] [--threads 2] [--tree N] [--eager]

Times the three step functions a decoding loop calls, as compiled graphs with no loop around them:
the 1-token plain step, the (k+1)-token verify step and the fused greedy self-speculative step
(verify, accept, extra heads and drafts at the accepted token), k = the model's extra heads. Each on
two copies of the model, compiled the two ways --compare names: `fuse`, every block's q, k, v
products and w1, w3 products as one product each or not (`steps.fuse_projections`); `freeze`, the
weights as constants packed for the CPU's matrix units or not (`DecodeSteps(freeze=...)`; the
default for compiled bf16/fp16 steps on a CPU); `attention`, one query's attention as ATen's flash
kernel or as multiplies and sums (`DecodeSteps(single_query=...)`, the default on a CPU without `kernels`);
`kernels`, bf16 products and attention by ATen (and inductor) or by `multitoken.kernels`
(`DecodeSteps(cpu_kernels=...)`, the default in bf16 where they run); `checks`, inductor's checks of
sizes, strides and alignment around its kernel calls or not (`steps.UNCHECKED_OPTIONS`, the default);
`wrapper`, inductor's generated code that calls the kernels as Python or as C++ (`cpp_wrapper`); `heads`,
the extra heads one by one or as one computation (`DecodeSteps(group_heads=...)`, the default where the
bf16 kernels run them; in the greedy spec step, while tree steps group them either way). --eager times
eager steps instead (the comparisons of compiling options then compare nothing). --tree N also times
the fused greedy tree step of an N-node tree (`tree.greedy_tree_step`). Rounds alternate between the
two so that the machine's drift hits both alike; each figure is the fastest round's mean over --calls
calls (noise only adds time).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.steps import UNCHECKED_OPTIONS, DecodeSteps
from multitoken.tree import TreeDrafter, greedy_tree_step

# --compare: the (name, DecodeSteps options) of the baseline, then of the variant.
COMPARISONS = {
    "fuse": (("separate", {"fuse": False}), ("fused", {"fuse": True})),
    "freeze": (("unfrozen", {"freeze": False}), ("frozen", {"freeze": True})),
    "attention": (("flash", {"single_query": False, "cpu_kernels": False}),
                  ("single-query", {"single_query": True, "cpu_kernels": False})),
    "kernels": (("aten", {"cpu_kernels": False}), ("kernels", {"cpu_kernels": True})),
    "checks": (("checked", {"compile_options": {name: True for name in UNCHECKED_OPTIONS}}), ("unchecked", {})),
    "wrapper": (("python", {}), ("c++", {"compile_options": {"cpp_wrapper": True}})),
    "heads": (("per-head", {"group_heads": False}), ("grouped", {})),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="fuse",
                   help="fuse: fused q/k/v and w1/w3 products against separate ones; freeze: frozen steps against "
                        "unfrozen; attention: single-query attention as multiplies and sums against ATen's flash kernel; "
                        "kernels: multitoken.kernels' bf16 products and attention against ATen's; checks: inductor's "
                        "size/stride/alignment checks around kernel calls or not; wrapper: Python or C++ generated wrapper; "
                        "heads: the extra heads one by one or grouped")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--position", type=int, default=64, help="cache position the steps write at")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--calls", type=int, default=10, help="calls per round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tree", type=int, default=0, help="also time the greedy tree step of this node budget")
    p.add_argument("--eager", action="store_true", help="eager steps instead of compiled ones")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    (base, base_options), (variant, variant_options) = COMPARISONS[a.compare]
    steps = {}
    for name, options in ((base, base_options), (variant, variant_options)):
        model = load_model(a.ckpt_dir, device="cpu", dtype=dtype, max_seq_len=a.position + 64, max_batch_size=a.batch)
        steps[name] = DecodeSteps(model.eval(), compile=not a.eager, **options)
    k = steps[base].model.n_future_tokens - 1
    if k < 1:
        raise SystemExit(f"error: {a.ckpt_dir} has no extra heads (n_future_tokens=1): nothing to verify or draft")
    start = torch.full((a.batch,), a.position)
    one, verify = torch.zeros(a.batch, 1, dtype=torch.long), torch.zeros(a.batch, k + 1, dtype=torch.long)
    calls = {
        "1-token step": lambda s: s.step(one, start),
        f"{k + 1}-token verify": lambda s: s.step(verify, start),
        "greedy spec step": lambda s: s.greedy(verify, start, k),
    }
    if a.tree:
        drafter = TreeDrafter(a.tree, k, steps[base].model.args.vocab_size)
        with torch.inference_mode():  # equal draft logits: ties, broken the same way every call
            t, _ = drafter(torch.zeros(a.batch, k, drafter.n_ranks), torch.zeros(a.batch, dtype=torch.long), 0.0, 1.0)
        calls[f"tree {a.tree} step"] = lambda s: s.compile_fn(greedy_tree_step)(
            s.model, drafter, t.tokens, t.parent, t.depth, t.rank, start)
    print(f"{a.ckpt_dir}: {a.dtype}, batch {a.batch}, position {a.position}, k = {k}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}; compiling...", flush=True)
    best: dict[tuple[str, str], float] = {}
    with torch.inference_mode():
        for call in calls.values():
            for s in steps.values():
                call(s), call(s)  # compile, then once warm
        # The same cache contents in both copies, then the same step: the same tokens and drafts.
        outputs = [tuple(t.clone() for t in calls["greedy spec step"](s)) for s in steps.values()]
        same = all(torch.equal(x, y) for x, y in zip(*outputs))
        print(f"{variant} and {base} greedy steps give the same tokens, accepted counts and drafts: "
              f"{'yes' if same else 'no'}", flush=True)
        for _ in range(a.rounds):
            for name, call in calls.items():
                for way, s in steps.items():
                    t0 = time.perf_counter()
                    for _ in range(a.calls):
                        call(s)
                    seconds = (time.perf_counter() - t0) / a.calls
                    best[name, way] = min(best.get((name, way), float("inf")), seconds)
    ratio = f"{variant} / {base}"
    print(f"{'step':<18} {base + ' ms':>11} {variant + ' ms':>11} {ratio:>18}")
    for name in calls:
        b, v = best[name, base], best[name, variant]
        print(f"{name:<18} {1e3 * b:>11.2f} {1e3 * v:>11.2f} {v / b:>18.3f}")
    for way in steps:
        ratios = ", ".join(f"{name} {best[name, way] / best['1-token step', way]:.2f}x" for name in list(calls)[1:])
        print(f"{way}, against a 1-token step: {ratios}")


if __name__ == "__main__":
    main()
