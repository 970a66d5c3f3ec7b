"""The cost of turning logits into a token on this machine: ours beside the Llama reference's step.

    python benchmarks/bench_sampling.py [--vocab 4096 32000 49152] [--rows 1 4] [--threads 2]

- top-p, as `sample` runs it (`multitoken.sampling._top_p_sorted`: top-k when the best tokens hold
  top_p, else a full sort) against the reference's full sort, on logits of a peaked distribution
  (where the top-k path applies) and a flat one (where it falls back); the drawn tokens are checked
  equal to the reference's, seed for seed.
- the distribution the self-speculative paths test drafts against (`probs_from_logits`): with the CPU
  kernels, its top-p step in one call (`kernels.top_p`), beside the same in ATen ("ATen probs": the
  top-k shortcut, checking ties only at the cut; rows it cannot cut sorted one at a time) and the
  reference's full sort scattered back to vocabulary order; all checked bitwise equal.
- drawing one token from a distribution: `multitoken.sampling.draw` (inverse CDF, the
  self-speculative paths) against torch.multinomial.
"bf16" logits are the peaked ones rounded to bfloat16, as a bf16 model's are: many tie.
Median of --repeats calls each, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multitoken import kernels
from multitoken.sampling import draw, probs_from_logits, sample


def reference_sample(logits: torch.Tensor, temperature: float, top_p: float,
                     generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > top_p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, torch.multinomial(probs_sort, 1, generator=generator))[..., 0]


def reference_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sort[probs_sort.cumsum(-1) - probs_sort > top_p] = 0.0
    return torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort / probs_sort.sum(-1, keepdim=True))


def aten_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """probs_from_logits with its top-p step in ATen, as where the kernels do not run."""
    runs, kernels.top_p_runs = kernels.top_p_runs, lambda probs: False
    try:
        return probs_from_logits(logits, temperature, top_p)
    finally:
        kernels.top_p_runs = runs


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000, 49152])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, temperature {a.temperature}, "
          f"top_p {a.top_p}, top-p kernel {'on' if kernels.top_p_runs(torch.zeros(1)) else 'off (ATen)'}")
    print(f"{'vocab':>6} {'rows':>4} {'logits':>7}   {'reference ms':>12} {'sample ms':>9} {'ratio':>6} {'same':>5}"
          f"   {'ref. probs ms':>13} {'ATen probs ms':>13} {'probs ms':>8} {'ratio':>6} {'same':>5}"
          f"   {'multinomial ms':>14} {'draw ms':>7} {'ratio':>6}")
    for vocab in a.vocab:
        for rows in a.rows:
            for kind, scale in (("peaked", 12.0), ("flat", 1.0), ("bf16", 12.0)):
                logits = torch.randn(rows, vocab) * scale
                if kind == "bf16":
                    logits = logits.bfloat16().float()
                seeded = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
                same = all(torch.equal(sample(logits, a.temperature, a.top_p, seeded(s)),
                                       reference_sample(logits, a.temperature, a.top_p, seeded(s))) for s in range(20))
                probs = probs_from_logits(logits, a.temperature, a.top_p)
                same_probs = (torch.equal(probs, reference_probs(logits, a.temperature, a.top_p))
                              and torch.equal(probs, aten_probs(logits, a.temperature, a.top_p)))
                ms = median_ms({
                    "reference probs": lambda: reference_probs(logits, a.temperature, a.top_p),
                    "ATen probs": lambda: aten_probs(logits, a.temperature, a.top_p),
                    "probs": lambda: probs_from_logits(logits, a.temperature, a.top_p),
                    "reference": lambda: reference_sample(logits, a.temperature, a.top_p, seeded(0)),
                    "sample": lambda: sample(logits, a.temperature, a.top_p, seeded(0)),
                    "multinomial": lambda: torch.multinomial(probs, 1),
                    "draw": lambda: draw(probs),
                }, a.repeats)
                print(f"{vocab:>6} {rows:>4} {kind:>7}   {ms['reference']:>12.3f} {ms['sample']:>9.3f} "
                      f"{ms['reference'] / ms['sample']:>5.1f}x {'yes' if same else 'NO':>5}   "
                      f"{ms['reference probs']:>13.3f} {ms['ATen probs']:>13.3f} {ms['probs']:>8.3f} "
                      f"{ms['reference probs'] / ms['probs']:>5.1f}x "
                      f"{'yes' if same_probs else 'NO':>5}   "
                      f"{ms['multinomial']:>14.3f} {ms['draw']:>7.3f} {ms['multinomial'] / ms['draw']:>5.1f}x")


if __name__ == "__main__":
    main()
