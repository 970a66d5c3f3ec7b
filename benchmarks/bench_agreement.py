"""Greedy agreement across dtypes and decoding modes, on the same model and prompts, in one run:
bf16 plain against float32 plain, and, within bf16, self-speculative and batch-1 plain decoding against
batch-16 plain decoding (exact in float32; in bf16 a verify step's products of another shape round
differently and can flip near-ties).

    python benchmarks/bench_agreement.py [--ckpt-dir CKPT] [--prompts 16] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from multitoken.checkpoint import default_ckpt_dir
from multitoken.eval.bench import code_prompts
from multitoken.generation import Llama


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for r1, r2 in zip(a, b) for x, y in zip(r1, r2)) / sum(len(r) for r in a)
    return f"{same:6.1%} of positions equal, {sum(r1 == r2 for r1, r2 in zip(a, b))}/{len(a)} rows identical"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, help="default: the shipped model")
    p.add_argument("--prompts", type=int, default=16, help="held-out stdlib openings, decoded as one batch")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = a.ckpt_dir or default_ckpt_dir()
    out = {}
    for dtype in ("float32", "bfloat16"):
        llama = Llama.build(ckpt, ckpt / "tokenizer.model", max_seq_len=a.prompt_len + a.new_tokens + 8,
                            max_batch_size=a.prompts, dtype=dtype, device="cpu")
        prompts = code_prompts(llama.tokenizer, a.prompts, a.prompt_len)
        out[dtype, "plain"] = llama.generate(prompts, a.new_tokens, temperature=0)[0]
        out[dtype, "spec"] = llama.generate(prompts, a.new_tokens, temperature=0, speculative=True)[0]
        out[dtype, "plain b1"] = [llama.generate([q], a.new_tokens, temperature=0)[0][0] for q in prompts]
    print(f"{ckpt}: {a.prompts} prompts x {a.new_tokens} greedy tokens, batch {a.prompts} unless noted")
    for dtype in ("float32", "bfloat16"):
        print(f"{dtype:>9} self-speculative vs plain:       {agreement(out[dtype, 'plain'], out[dtype, 'spec'])}")
        print(f"{dtype:>9} plain batch 1 vs batch {a.prompts}:         {agreement(out[dtype, 'plain'], out[dtype, 'plain b1'])}")
    print(f" bfloat16 plain vs float32 plain:         {agreement(out['float32', 'plain'], out['bfloat16', 'plain'])}")


if __name__ == "__main__":
    main()
