"""Compiled decode steps alone, with and without fused projections, interleaved in one run.

    python benchmarks/bench_steps.py --ckpt-dir CKPT [--dtype float32] [--batch 1] [--position 64]
        [--rounds 8] [--calls 10] [--threads 2]

Times the three step functions a decoding loop calls, as compiled graphs with no loop around them:
the 1-token plain step, the (k+1)-token verify step and the fused greedy self-speculative step
(verify, accept, extra heads and drafts at the accepted token), k = the model's extra heads. Each on
two copies of the model: one with every block's q, k, v products and w1, w3 products fused into one
product each (`steps.fuse_projections`, the default for compiled steps), one without. Rounds
alternate between the two so that the machine's drift hits both alike; each figure is the fastest
round's mean over --calls calls (noise only adds time).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.steps import DecodeSteps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (bf16 uses row-wise single-row products)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--position", type=int, default=64, help="cache position the steps write at")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--calls", type=int, default=10, help="calls per round")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    steps = {}
    for fuse in (False, True):
        model = load_model(a.ckpt_dir, device="cpu", dtype=dtype, max_seq_len=a.position + 64, max_batch_size=a.batch)
        steps[fuse] = DecodeSteps(model.eval(), compile=True, fuse=fuse)
    k = steps[False].model.n_future_tokens - 1
    if k < 1:
        raise SystemExit(f"error: {a.ckpt_dir} has no extra heads (n_future_tokens=1): nothing to verify or draft")
    start = torch.full((a.batch,), a.position)
    one, verify = torch.zeros(a.batch, 1, dtype=torch.long), torch.zeros(a.batch, k + 1, dtype=torch.long)
    calls = {
        "1-token step": lambda s: s.step(one, start),
        f"{k + 1}-token verify": lambda s: s.step(verify, start),
        "greedy spec step": lambda s: s.greedy(verify, start, k),
    }
    print(f"{a.ckpt_dir}: {a.dtype}, batch {a.batch}, position {a.position}, k = {k}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}; compiling...", flush=True)
    best: dict[tuple[str, bool], float] = {}
    with torch.inference_mode():
        for call in calls.values():
            for s in steps.values():
                call(s), call(s)  # compile, then once warm
        # The same cache contents in both copies, then the same step: the same tokens and drafts.
        outputs = [tuple(t.clone() for t in calls["greedy spec step"](s)) for s in steps.values()]
        same = all(torch.equal(x, y) for x, y in zip(*outputs))
        print(f"fused and separate greedy steps give the same tokens, accepted counts and drafts: "
              f"{'yes' if same else 'no'}", flush=True)
        for _ in range(a.rounds):
            for name, call in calls.items():
                for fuse, s in steps.items():
                    t0 = time.perf_counter()
                    for _ in range(a.calls):
                        call(s)
                    seconds = (time.perf_counter() - t0) / a.calls
                    best[name, fuse] = min(best.get((name, fuse), float("inf")), seconds)
    print(f"{'step':<18} {'separate ms':>11} {'fused ms':>9} {'fused / separate':>16}")
    for name in calls:
        sep, fus = best[name, False], best[name, True]
        print(f"{name:<18} {1e3 * sep:>11.2f} {1e3 * fus:>9.2f} {fus / sep:>16.3f}")
    for fuse in (False, True):
        ratios = [best[name, fuse] / best["1-token step", fuse] for name in list(calls)[1:]]
        print(f"{'fused' if fuse else 'separate'}: verify {ratios[0]:.2f}x, greedy spec step {ratios[1]:.2f}x a 1-token step")


if __name__ == "__main__":
    main()
