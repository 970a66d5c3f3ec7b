"""Compiled decoding in a long cache: steps that attend a span of it against steps that attend all of it.

    python benchmarks/bench_span.py --ckpt-dir CKPT [--max-seq-len 2048] [--prompts 4] [--prompt-len 64]
        [--new-tokens 128] [--rounds 3] [--dtype bfloat16] [--threads 2] [--tree 8]

Compiled steps cannot attend exactly the filled part of the KV cache: they attend a span of it that
grows with the text (`DecodeSteps.span`). Three ways, each a compiled copy of the model (the warm-up
compiles): "whole cache", every step attends max_seq_len slots (2048 is `multitoken generate`'s
default); "powers of two", the least power of two from `steps.MIN_SPAN` that holds the positions, a
graph per span (GPU steps); "windows", the written slots rounded up to `steps.WINDOW`, one graph for
every span (`dynamic_span`, CPU steps). All decode the same prompts greedily, plain and
self-speculatively (and with `--tree N`, tree drafting), interleaved per prompt; prints tokens/s of
each and the ratios, and checks that all give the same tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.eval.bench import IgnoreEOS, code_prompts
from multitoken.generation import Llama, parse_dtype
from multitoken.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--tokenizer-path", type=Path, help="default: CKPT/tokenizer.model")
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV cache length of both copies")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="passes over the prompts")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tree", type=int, default=None, help="also decode with a dynamic draft tree of this many nodes")
    a = p.parse_args()
    if a.prompt_len + a.new_tokens > a.max_seq_len:
        raise SystemExit(f"error: --prompt-len + --new-tokens ({a.prompt_len + a.new_tokens}) exceeds --max-seq-len")
    if a.threads:
        torch.set_num_threads(a.threads)

    prompts = code_prompts(load_tokenizer(a.tokenizer_path or a.ckpt_dir / "tokenizer.model"), a.prompts, a.prompt_len)
    llamas = {}
    for way in ("whole cache", "powers of two", "windows"):
        model = load_model(a.ckpt_dir, device=a.device, dtype=parse_dtype(a.dtype), max_seq_len=a.max_seq_len,
                           max_batch_size=1)
        llamas[way] = Llama(model, IgnoreEOS()).compile()
        llamas[way].steps.dynamic_span = way == "windows"
    llamas["whole cache"].steps.span = lambda end: a.max_seq_len  # every compiled step attends every slot
    modes = {"plain": {}, "speculative": {"speculative": True}}
    if a.tree:
        modes[f"tree {a.tree}"] = {"tree": a.tree}
    print(f"{a.ckpt_dir}: max_seq_len {a.max_seq_len}, batch 1, greedy, {len(prompts)} prompts of {a.prompt_len} "
          f"tokens, {a.new_tokens} new, {a.device} {a.dtype}, threads {torch.get_num_threads()}; compiling...",
          flush=True)
    for llama in llamas.values():
        for kwargs in modes.values():
            llama.generate([prompts[0]], a.new_tokens, temperature=0, **kwargs)

    seconds = {(way, mode): 0.0 for way in llamas for mode in modes}
    same = True
    for _ in range(a.rounds):
        for prompt in prompts:
            for mode, kwargs in modes.items():
                outs = []
                for way, llama in llamas.items():
                    start = time.perf_counter()
                    outs.append(llama.generate([prompt], a.new_tokens, temperature=0, **kwargs)[0])
                    seconds[way, mode] += time.perf_counter() - start
                same &= all(out == outs[0] for out in outs)
    n = a.rounds * len(prompts) * a.new_tokens
    print(f"{'mode':<12} {'whole cache':>11} {'powers of two':>13} {'windows':>8}  "
          f"{'pow2/whole':>10} {'windows/pow2':>12}  (tok/s)")
    for mode in modes:
        whole, pow2, windows = (n / seconds[way, mode] for way in llamas)
        print(f"{mode:<12} {whole:>11.1f} {pow2:>13.1f} {windows:>8.1f}  "
              f"{pow2 / whole:>9.2f}x {windows / pow2:>11.2f}x")
    print(f"same tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
