"""Batched self-speculative decoding with finished rows leaving the batch, against the same batches
kept whole to their end, beside plain decoding: the three interleaved in one run.

    python benchmarks/bench_retire.py --ckpt-dir CKPT [--batch-size 16] [--prompts 16] [--new-tokens 128]
        [--repeats 3] [--dtype bfloat16] [--compile] [--draft-heads K] [--threads N]

Rows of a speculative batch accept different numbers of drafts, so they finish at different steps; a
batch kept whole runs until its slowest row ends, every step at full size. Rows that leave it
(`DecodeSteps.batch_size`) make the later steps smaller: eagerly exactly the rows left, compiled on
a CPU the next power of two. Greedy, every row --new-tokens long (EOS ignored): all three modes emit
the same tokens (checked). Prints tokens/s of each, medians of --repeats rounds (the order of the
modes alternates between rounds), and their speedups over plain decoding; the first round compiles.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.eval.bench import IgnoreEOS, cache_room, code_prompts
from multitoken.generation import Llama, parse_dtype
from multitoken.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--tokenizer-path", type=Path, help="default: CKPT/tokenizer.model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompts", type=int, default=None,
                   help="prompts decoded, batch-size at a time (default: one batch)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draft-heads", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="compiled fixed-shape decode steps (the first round compiles)")
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    n_prompts = a.prompts or a.batch_size
    if n_prompts < a.batch_size:
        raise SystemExit(f"error: --prompts {n_prompts} is fewer than one batch of {a.batch_size}")
    tok_path = a.tokenizer_path or a.ckpt_dir / "tokenizer.model"
    if not tok_path.is_file():
        raise SystemExit(f"error: no tokenizer at {tok_path}: give --tokenizer-path")
    model = load_model(a.ckpt_dir, device=a.device, dtype=parse_dtype(a.dtype),
                       max_seq_len=a.prompt_len + a.new_tokens + cache_room(), max_batch_size=a.batch_size)
    prompts = code_prompts(load_tokenizer(tok_path), n_prompts, a.prompt_len)
    batches = [prompts[i:i + a.batch_size] for i in range(0, n_prompts - a.batch_size + 1, a.batch_size)]
    llama = Llama(model, IgnoreEOS())
    if a.compile:
        llama.compile()
    print(f"model {a.ckpt_dir}, {a.dtype}, {a.device}, threads {torch.get_num_threads()}, "
          f"{'compiled' if a.compile else 'eager'}; {len(batches)} batch(es) of {a.batch_size}, "
          f"{a.prompt_len}-token prompts, {a.new_tokens} new tokens, greedy")

    # mode: (speculative, finished rows leave the batch)
    modes = {"plain": (False, True), "rows leave": (True, True), "rows kept": (True, False)}

    def run(mode: str) -> tuple[float, list[list[int]]]:
        speculative, retire = modes[mode]
        llama.steps.retire_rows = retire
        kw = {"speculative": True, "draft_heads": a.draft_heads} if speculative else {}
        start, out = time.perf_counter(), []
        for batch in batches:
            out += llama.generate(batch, a.new_tokens, temperature=0, **kw)[0]
        return time.perf_counter() - start, out

    times: dict[str, list[float]] = {m: [] for m in modes}
    for rnd in range(a.repeats + 1):  # round 0 warms up (compiles)
        order = list(modes) if rnd % 2 == 0 else list(reversed(modes))
        outs = {}
        for mode in order:
            seconds, outs[mode] = run(mode)
            if rnd:
                times[mode].append(seconds)
        if any(o != outs["plain"] for o in outs.values()):
            raise SystemExit("error: speculative decoding's tokens differ from plain decoding's")
    n_tokens = len(batches) * a.batch_size * a.new_tokens
    tps = {m: n_tokens / statistics.median(t) for m, t in times.items()}
    print(f"\n{'mode':<12} {'tok/s':>8} {'speedup':>8}")
    for mode, v in tps.items():
        print(f"{mode:<12} {v:>8.1f} {v / tps['plain']:>7.2f}x")
    print("greedy identical: yes")


if __name__ == "__main__":
    main()
