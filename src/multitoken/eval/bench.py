"""The speed report: plain vs self-speculative decoding on the same model, prompts and settings.

For each temperature and batch size the two modes alternate (plain, speculative, plain, ...) so drift
in machine speed hits both alike; each figure is the median over the timed rounds, after one warm-up
round. EOS is ignored, so every row generates exactly `new_tokens` tokens in both modes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from multitoken.generation import Llama
from multitoken.speculative import SpeculativeStats
from multitoken.train.data import HELD_OUT_MODULES

# Prompts: the openings of standard library modules, code a code model should continue well.
PROMPT_MODULES = HELD_OUT_MODULES  # never trained on by models trained on the default corpus


def code_prompts(tokenizer, n: int, prompt_len: int) -> list[list[int]]:
    root = Path(os.__file__).parent
    names = [PROMPT_MODULES[i % len(PROMPT_MODULES)] for i in range(n)]
    return [tokenizer.encode((root / f"{m}.py").read_text(), bos=True, eos=False)[:prompt_len] for m in names]


@dataclass
class SpeedRow:
    temperature: float
    batch: int
    plain_tps: float  # tokens/s summed over the batch
    spec_tps: float
    stats: SpeculativeStats
    greedy_identical: bool | None  # None when sampling

    @property
    def speedup(self) -> float:
        return self.spec_tps / self.plain_tps


class IgnoreEOS:
    """A tokenizer stand-in whose EOS never occurs: every row runs to the full length (for timing)."""

    eos_id = -1


def speed_report(llama: Llama, prompts: list[list[int]], batch_sizes: Sequence[int], temperatures: Sequence[float], *,
                 new_tokens: int = 128, repeats: int = 3, top_p: float = 0.95, draft_heads: int | None = None,
                 log=print) -> list[SpeedRow]:
    bench = Llama(llama.model, IgnoreEOS())
    k = draft_heads or llama.model.n_future_tokens - 1
    rows = []
    for temperature in temperatures:
        for bs in batch_sizes:
            batch = prompts[:bs]
            times: dict[bool, list[float]] = {False: [], True: []}
            total = SpeculativeStats(proposed=[0] * k, accepted=[0] * k)
            identical = True
            for rnd in range(repeats + 1):  # round 0 warms up
                outs = {}
                for spec in (False, True):
                    torch.manual_seed(rnd)
                    start = time.perf_counter()
                    outs[spec], _ = bench.generate(batch, new_tokens, temperature=temperature, top_p=top_p,
                                                   speculative=spec, draft_heads=draft_heads)
                    if rnd:
                        times[spec].append(time.perf_counter() - start)
                if rnd:
                    s = bench.last_stats
                    total.forwards += s.forwards
                    total.tokens += s.tokens
                    total.proposed = [x + y for x, y in zip(total.proposed, s.proposed)]
                    total.accepted = [x + y for x, y in zip(total.accepted, s.accepted)]
                    identical &= outs[False] == outs[True]
            row = SpeedRow(temperature, bs, bs * new_tokens / statistics.median(times[False]),
                           bs * new_tokens / statistics.median(times[True]), total,
                           identical if temperature == 0 else None)
            rows.append(row)
            log(f"  T={temperature} batch {bs}: plain {row.plain_tps:.1f} tok/s, speculative {row.spec_tps:.1f} "
                f"tok/s, tau {total.tokens_per_forward:.2f}")
    return rows


def format_report(rows: list[SpeedRow]) -> str:
    lines = [f"{'temp':>4} {'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'tau':>5}  "
             f"{'acceptance by draft position':<30} greedy identical"]
    for r in rows:
        acc = " ".join(f"{a:4.0%}" for a in r.stats.acceptance)
        same = "n/a" if r.greedy_identical is None else ("yes" if r.greedy_identical else "NO")
        lines.append(f"{r.temperature:>4} {r.batch:>5} {r.plain_tps:>12.1f} {r.spec_tps:>11.1f} {r.speedup:>7.2f}x "
                     f"{r.stats.tokens_per_forward:>5.2f}  {acc:<30} {same}")
    for t in dict.fromkeys(r.temperature for r in rows):
        by_bs = {r.batch: r.speedup for r in rows if r.temperature == t}
        smallest, largest = min(by_bs), max(by_bs)
        if smallest != largest:
            lines.append(f"T={t}: batch-{largest} speedup / batch-{smallest} speedup = "
                         f"{by_bs[largest] / by_bs[smallest]:.2f}")
    return "\n".join(lines)


def plot_report(rows: list[SpeedRow], png: Path) -> Path:
    """Tokens/s of both modes by batch size (one panel per temperature), speedups annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = list(dict.fromkeys(r.temperature for r in rows))
    fig, axes = plt.subplots(1, len(temps), figsize=(5 * len(temps), 4), squeeze=False)
    for ax, t in zip(axes[0], temps):
        sel = [r for r in rows if r.temperature == t]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r.plain_tps for r in sel], width=0.4, label="plain")
        ax.bar([i + 0.2 for i in x], [r.spec_tps for r in sel], width=0.4, label="self-speculative")
        for i, r in zip(x, sel):
            ax.annotate(f"{r.speedup:.2f}x\ntau {r.stats.tokens_per_forward:.2f}", (i + 0.2, r.spec_tps),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [f"batch {r.batch}" for r in sel])
        ax.set_ylabel("tokens/s")
        ax.set_title(f"temperature {t}")
        ax.legend(loc="upper left")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png)
    return png
