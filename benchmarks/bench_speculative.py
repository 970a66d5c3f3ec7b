"""Plain vs self-speculative decoding on the same model, prompts and settings, interleaved in one run.

    python benchmarks/bench_speculative.py --ckpt-dir CKPT [--tokenizer-path FILE]
        [--batch-sizes 1 4 16] [--temperatures 0 0.8] [--new-tokens 128] [--repeats 3]

Prompts are the openings of Python standard library modules (code the model should continue well);
without a tokenizer, random token ids. For each batch size and temperature the two modes alternate
(plain, speculative, plain, ...) so drift in machine speed hits both alike; each figure is the median
over --repeats. Prints tokens/s of each, the speedup, tokens per forward (tau, counting the
verified token) and the acceptance rate of each draft position.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.generation import Llama, parse_dtype
from multitoken.speculative import SpeculativeStats
from multitoken.tokenizer import load_tokenizer

# Held-out-style prompts: modules' openings, cut to --prompt-len tokens.
PROMPT_MODULES = ["fractions", "heapq", "bisect", "textwrap", "statistics", "colorsys", "shlex", "pprint",
                  "difflib", "calendar", "fnmatch", "glob", "queue", "sched", "graphlib", "zipapp"]


def code_prompts(tokenizer, n: int, prompt_len: int) -> list[list[int]]:
    root = Path(os.__file__).parent
    prompts = []
    for i in range(n):
        text = (root / f"{PROMPT_MODULES[i % len(PROMPT_MODULES)]}.py").read_text()
        prompts.append(tokenizer.encode(text, bos=True, eos=False)[:prompt_len])
    return prompts


class _NoEOS:
    eos_id = -1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--tokenizer-path", type=Path, help="default: CKPT/tokenizer.model if present")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--draft-heads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    max_bs = max(a.batch_sizes)
    model = load_model(a.ckpt_dir, device=a.device, dtype=parse_dtype(a.dtype),
                       max_seq_len=a.prompt_len + a.new_tokens, max_batch_size=max_bs)
    tok_path = a.tokenizer_path or a.ckpt_dir / "tokenizer.model"
    if tok_path.is_file():
        tokenizer = load_tokenizer(tok_path)
        prompts = code_prompts(tokenizer, max_bs, a.prompt_len)
        source = f"stdlib module openings, tokenizer {tok_path}"
    else:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.args.vocab_size, (max_bs, a.prompt_len), generator=g).tolist()
        source = "random token ids (no tokenizer found)"
    # EOS off: every row generates exactly --new-tokens, so both modes do the same work.
    llama = Llama(model, _NoEOS())

    n_params = sum(t.numel() for t in model.parameters())
    print(f"model {a.ckpt_dir}: {n_params / 1e6:.1f}M parameters, n_future_tokens={model.n_future_tokens}, "
          f"{a.dtype}, {a.device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"prompts: {source}; ~{a.prompt_len} tokens, {a.new_tokens} new tokens, median of {a.repeats}")

    rows = []
    for temperature in a.temperatures:
        for bs in a.batch_sizes:
            batch = prompts[:bs]
            times = {False: [], True: []}
            stats = SpeculativeStats(proposed=[0] * (model.n_future_tokens - 1),
                                     accepted=[0] * (model.n_future_tokens - 1))
            same = True
            for rep in range(a.repeats + 1):  # the first round warms up
                outs = {}
                for spec in (False, True):
                    torch.manual_seed(rep)
                    start = time.perf_counter()
                    outs[spec], _ = llama.generate(batch, a.new_tokens, temperature=temperature, top_p=a.top_p,
                                                   speculative=spec, draft_heads=a.draft_heads)
                    if rep:
                        times[spec].append(time.perf_counter() - start)
                if rep:
                    s = llama.last_stats
                    stats.forwards += s.forwards
                    stats.tokens += s.tokens
                    stats.proposed = [x + y for x, y in zip(stats.proposed, s.proposed)]
                    stats.accepted = [x + y for x, y in zip(stats.accepted, s.accepted)]
                    same &= temperature > 0 or outs[False] == outs[True]
            plain_tps = bs * a.new_tokens / statistics.median(times[False])
            spec_tps = bs * a.new_tokens / statistics.median(times[True])
            rows.append((temperature, bs, plain_tps, spec_tps, stats, same))
            print(f"  T={temperature} batch {bs}: plain {plain_tps:.1f} tok/s, speculative {spec_tps:.1f} tok/s",
                  flush=True)

    print()
    print(f"{'temp':>4} {'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'tau':>5}  "
          f"acceptance by draft position  greedy output identical")
    for temperature, bs, plain_tps, spec_tps, stats, same in rows:
        acc = " ".join(f"{r:4.0%}" for r in stats.acceptance)
        ident = ("yes" if same else "NO") if temperature == 0 else "n/a (sampled)"
        print(f"{temperature:>4} {bs:>5} {plain_tps:>12.1f} {spec_tps:>11.1f} {spec_tps / plain_tps:>7.2f}x "
              f"{stats.tokens_per_forward:>5.2f}  {acc:<28}  {ident}")
    for temperature in a.temperatures:
        by_bs = {bs: s / pl for t, bs, pl, s, _, _ in rows if t == temperature}
        if 1 in by_bs and max_bs != 1:
            print(f"T={temperature}: batch-{max_bs} speedup / batch-1 speedup = {by_bs[max_bs] / by_bs[1]:.2f}")


if __name__ == "__main__":
    main()
