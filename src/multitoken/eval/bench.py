"""The speed report: plain vs self-speculative decoding (the chain and, given a tree, tree drafting)
on the same model, prompts and settings.

Every batch size decodes the same prompts (batch 1 one at a time, batch 16 sixteen at once), so the
rows compare batching and nothing else. For each temperature and batch size the modes alternate
(plain, chain, tree, plain, ...) so drift in machine speed hits all alike; each figure is the median
over the timed rounds, after one warm-up round. EOS is ignored, so every row generates exactly
`new_tokens` tokens in every mode.
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
from multitoken.steps import DecodeSteps
from multitoken.tree import TreeSpec, close_paths
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
    spec_tps: float  # the chain's
    stats: SpeculativeStats
    greedy_identical: bool | None  # every mode's output equals plain decoding's; None when sampling
    tree_tps: float | None = None  # with a tree only
    tree_stats: SpeculativeStats | None = None

    @property
    def speedup(self) -> float:
        return self.spec_tps / self.plain_tps

    @property
    def tree_speedup(self) -> float | None:
        return None if self.tree_tps is None else self.tree_tps / self.plain_tps


class IgnoreEOS:
    """A tokenizer stand-in whose EOS never occurs: every row runs to the full length (for timing)."""

    eos_id = -1


def _add(total: SpeculativeStats, s: SpeculativeStats) -> None:
    total.forwards += s.forwards
    total.tokens += s.tokens
    total.proposed = [x + y for x, y in zip(total.proposed, s.proposed)]
    total.accepted = [x + y for x, y in zip(total.accepted, s.accepted)]


def cache_room(tree: TreeSpec | None = None) -> int:
    """Cache slots a benchmark leaves past its last new token, as a server's cache has room past one
    request: a step whose chain or tree (a node budget or rank paths) would pass the end of the cache
    runs eagerly, and without the room the last steps of every prompt would."""
    nodes = (tree if isinstance(tree, int) else len(close_paths(tree, max(map(len, tree))))) if tree else 0
    return max(16, nodes + 1)


def speed_report(llama: Llama, prompts: list[list[int]], batch_sizes: Sequence[int], temperatures: Sequence[float], *,
                 new_tokens: int = 128, repeats: int = 3, top_p: float = 0.95, draft_heads: int | str | None = None,
                 tree: TreeSpec | None = None, log=print) -> list[SpeedRow]:
    bench = Llama(llama.model, IgnoreEOS())
    bench.steps = llama.steps  # compiled or eager, as the caller chose
    modes = {"plain": {}, "chain": {"speculative": True, "draft_heads": draft_heads}}
    if tree is not None:  # a tree's depth is fixed: "auto" is the chain's
        modes["tree"] = {"tree": tree, "draft_heads": None if draft_heads == "auto" else draft_heads}
    rows = []
    for temperature in temperatures:
        for bs in batch_sizes:
            # Every batch size decodes the same prompts, bs at a time, so the rows differ in batching only.
            batches = [prompts[i:i + bs] for i in range(0, len(prompts) - bs + 1, bs)]
            if not batches:
                raise ValueError(f"batch size {bs} needs at least {bs} prompts, got {len(prompts)}")
            times: dict[str, list[float]] = {m: [] for m in modes}
            totals: dict[str, SpeculativeStats] = {}
            identical = True
            for rnd in range(repeats + 1):  # round 0 warms up (compiles), on the first batch alone
                outs: dict[str, list] = {m: [] for m in modes}
                for mode, kwargs in modes.items():
                    torch.manual_seed(rnd)
                    start = time.perf_counter()
                    for batch in batches[:1] if rnd == 0 else batches:
                        out, _ = bench.generate(batch, new_tokens, temperature=temperature, top_p=top_p, **kwargs)
                        outs[mode] += out
                        if rnd and mode != "plain":
                            s = bench.last_stats
                            _add(totals.setdefault(mode, SpeculativeStats(proposed=[0] * len(s.proposed),
                                                                          accepted=[0] * len(s.accepted))), s)
                    if rnd:
                        times[mode].append(time.perf_counter() - start)
                if rnd:
                    identical &= all(o == outs["plain"] for o in outs.values())
            n_tokens = len(batches) * bs * new_tokens
            tps = {m: n_tokens / statistics.median(t) for m, t in times.items()}
            row = SpeedRow(temperature, bs, tps["plain"], tps["chain"], totals["chain"],
                           identical if temperature == 0 else None, tps.get("tree"), totals.get("tree"))
            rows.append(row)
            line = (f"  T={temperature} batch {bs}: plain {row.plain_tps:.1f} tok/s, chain {row.spec_tps:.1f} "
                    f"tok/s (tau {row.stats.tokens_per_forward:.2f})")
            if row.tree_stats is not None:
                line += f", tree {row.tree_tps:.1f} tok/s (tau {row.tree_stats.tokens_per_forward:.2f})"
            log(line)
    return rows


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn, after one warm-up call (which compiles, if anything
    does). fn must wait for its own results (decoding does: it reads its tokens back)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """The machine's memory copy bandwidth in bytes/s, counted as STREAM does (bytes read + bytes
    written), copying a buffer far larger than any cache; the median of `repeats` copies."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        if src.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[1:])


def step_bytes(model, batch: int, tokens_cached: int, all_heads: bool) -> int:
    """Bytes a decode step reads: the weights it uses (trunk, next-token head, final norm and output;
    the extra heads too with `all_heads`; one embedding row per token is negligible) and every used
    block's cached keys and values for `tokens_cached` positions of each of `batch` rows."""
    used = [*model.layers, *(model.extra_heads if all_heads else []), model.norm, model.output]
    weights = sum(p.numel() * p.element_size() for m in used for p in m.parameters())
    a = model.args
    blocks = len(model.layers) + (len(model.extra_heads) if all_heads else 0)
    kv = 2 * blocks * batch * tokens_cached * a.n_kv_heads * a.head_dim * model.output.weight.element_size()
    return weights + kv


@dataclass
class StepCost:
    batch: int
    plain_ms: float  # one token per row through the trunk and the next-token head
    verify_ms: float  # 1 + k tokens per row through the trunk and the next-token head
    spec_ms: float  # a whole greedy self-speculative step: verify, accept, draft with the extra heads
    plain_bytes: int
    spec_bytes: int


def fastest_runs_ms(fns: dict, device: torch.device, rounds: int = 8, calls: int = 10) -> dict:
    """Milliseconds per call of each of `fns` (name -> step), after one warm-up call each (which
    compiles): each round times `calls` calls in a row of each in turn, as a decoding loop repeats one
    step (compiled, each step is a graph with its own weights, and alternating them call by call would
    time the CPU's caches: a 1-token step of the shipped model measured 1.86 ms that way against 1.17
    in a row); the fastest round counts, since noise only adds time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {name: float("inf") for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                sync()
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                best[name] = min(best[name], (time.perf_counter() - t) / calls)
    return {name: 1e3 * seconds for name, seconds in best.items()}


def step_costs(llama: Llama, batch_sizes: Sequence[int], position: int, k: int, rounds: int = 8,
               calls: int = 10) -> list[StepCost]:
    """Times of the decode step, the verify step and the whole greedy self-speculative step (with
    llama's steps: eager or compiled), each row at `position` of the cache (`fastest_runs_ms`)."""
    model, steps = llama.model, llama.steps
    device = model.tok_embeddings.weight.device
    # Bytes read: compiled steps attend a span of the cache (as decoding would there), eager ones the filled part.
    span = steps.span(position + 1 + k)
    cached = span or position + 1
    out = []
    for bs in batch_sizes:
        start = torch.full((bs,), position, device=device)
        one = torch.zeros(bs, 1, dtype=torch.long, device=device)
        many = torch.zeros(bs, 1 + k, dtype=torch.long, device=device)
        fns = {"plain": lambda: steps.step(one, start, span=span),
               "verify": lambda: steps.step(many, start, span=span),
               "spec": lambda: steps.greedy(many, start, k, span=span)}
        ms = fastest_runs_ms(fns, device, rounds, calls)
        out.append(StepCost(bs, ms["plain"], ms["verify"], ms["spec"], step_bytes(model, bs, cached, False),
                            step_bytes(model, bs, cached, True)))
    return out


def verify_costs(steps: DecodeSteps, batch: int, position: int, token_counts: Sequence[int], rounds: int = 8,
                 calls: int = 10) -> dict[int, float]:
    """Milliseconds of a step feeding m tokens per row through the trunk and the next-token head at
    `position`, for each m of `token_counts` (`fastest_runs_ms`): what verifying a chain of m - 1
    drafts, or a tree of m - 1 nodes, costs against decoding one token. `steps` are eager or compiled
    `DecodeSteps`."""
    device = steps.model.tok_embeddings.weight.device
    start = torch.full((batch,), position, device=device)
    fns = {}
    for m in token_counts:
        tokens, span = torch.zeros(batch, m, dtype=torch.long, device=device), steps.span(position + m)
        fns[m] = lambda tokens=tokens, span=span: steps.step(tokens, start, span=span)
    return fastest_runs_ms(fns, device, rounds, calls)


def format_verify_costs(costs: dict[int, float], chain_tokens: int) -> str:
    """The step time of each token count, its ratio to a 1-token step, and what a tree of m - 1 nodes
    must gain in tokens per forward over the chain (`chain_tokens` = its drafts + 1) to pay for its
    larger verify step (the extra heads' share, alike for both, left out)."""
    one, chain = costs[1], costs[chain_tokens]
    lines = [f"{'tokens/row':>10} {'step ms':>8} {'x 1 token':>9} {'ms/extra token':>14} {'tau needed vs chain':>19}"]
    for m, ms in sorted(costs.items()):
        extra = f"{(ms - one) / (m - 1):>14.3f}" if m > 1 else f"{'':>14}"
        lines.append(f"{m:>10} {ms:>8.2f} {ms / one:>8.2f}x {extra} {ms / chain - 1:>+18.0%}")
    return "\n".join(lines)


def format_step_costs(costs: list[StepCost], bandwidth: float) -> str:
    """Step times, their ratio to the decode step, and the memory bandwidth each achieves."""
    lines = [f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write, measured in this run)",
             f"{'batch':>5} {'step ms':>8} {'MB read':>8} {'GB/s':>6} {'of copy':>7}   {'verify ms':>9} {'ratio':>6}"
             f"   {'spec step ms':>12} {'ratio':>6} {'MB read':>8} {'GB/s':>6}"]
    for c in costs:
        plain_bw, spec_bw = c.plain_bytes / c.plain_ms * 1e3, c.spec_bytes / c.spec_ms * 1e3
        lines.append(f"{c.batch:>5} {c.plain_ms:>8.2f} {c.plain_bytes / 1e6:>8.1f} {plain_bw / 1e9:>6.1f} "
                     f"{plain_bw / bandwidth:>7.0%}   {c.verify_ms:>9.2f} {c.verify_ms / c.plain_ms:>5.2f}x"
                     f"   {c.spec_ms:>12.2f} {c.spec_ms / c.plain_ms:>5.2f}x {c.spec_bytes / 1e6:>8.1f} "
                     f"{spec_bw / 1e9:>6.1f}")
    return "\n".join(lines)


def format_report(rows: list[SpeedRow]) -> str:
    """One line per temperature and batch size; with a tree, its columns follow the chain's."""
    with_tree = any(r.tree_stats is not None for r in rows)
    acc_width = max(30, *(6 * len(r.stats.acceptance) for r in rows))
    header = (f"{'temp':>4} {'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'tau':>5}  "
              f"{'acceptance by draft position':<{acc_width}} ")
    if with_tree:
        header += f"{'tree tok/s':>10} {'speedup':>8} {'tau':>5}  {'tree acceptance by depth':<{acc_width}} "
    lines = [header + "greedy identical"]
    for r in rows:
        acc = " ".join(f"{a:4.0%}" for a in r.stats.acceptance)
        same = "n/a" if r.greedy_identical is None else ("yes" if r.greedy_identical else "NO")
        line = (f"{r.temperature:>4} {r.batch:>5} {r.plain_tps:>12.1f} {r.spec_tps:>11.1f} {r.speedup:>7.2f}x "
                f"{r.stats.tokens_per_forward:>5.2f}  {acc:<{acc_width}} ")
        if with_tree:
            tree_acc = " ".join(f"{a:4.0%}" for a in r.tree_stats.acceptance)
            line += (f"{r.tree_tps:>10.1f} {r.tree_speedup:>7.2f}x {r.tree_stats.tokens_per_forward:>5.2f}  "
                     f"{tree_acc:<{acc_width}} ")
        lines.append(line + same)
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
        bars = [("plain", [r.plain_tps for r in sel], [None] * len(sel)),
                ("self-speculative chain", [r.spec_tps for r in sel], [r.stats for r in sel])]
        if all(r.tree_stats is not None for r in sel):
            bars.append(("tree drafting", [r.tree_tps for r in sel], [r.tree_stats for r in sel]))
        width = 0.8 / len(bars)
        for j, (label, tps, stats) in enumerate(bars):
            offset = (j - (len(bars) - 1) / 2) * width
            ax.bar([i + offset for i in x], tps, width=width, label=label)
            for i, r, v, s in zip(x, sel, tps, stats):
                if s is not None:
                    ax.annotate(f"{v / r.plain_tps:.2f}x\ntau {s.tokens_per_forward:.2f}", (i + offset, v),
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
