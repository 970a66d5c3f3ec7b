"""Chain vs tree drafting at batch 1, greedy, over several prompts, modes interleaved per prompt.

    python benchmarks/bench_tree.py --ckpt-dir CKPT [--tokenizer-path FILE] [--prompts 4] [--trees 4 8 16]
        [--prompt-len 64] [--new-tokens 64] [--headroom N] [--threads 1] [--compile]

`multitoken bench --tree N` compares one tree with the chain at several batch sizes; this compares
several tree budgets at batch 1, summing tokens, forwards and seconds over the prompts (the openings
of held-out standard library modules). tau is exact; tokens/s is one timed pass per prompt after a
warm-up, so noisy on a shared machine. Greedy output is checked against plain decoding. The cache
holds --headroom slots past the last new token, as a server's cache has room past one request: a step
whose tree (or chain) would pass the end of the cache runs eagerly, and without headroom the last
steps of every prompt would (a tree of 8 needs 9 free slots, the chain 4). With
--compile every mode decodes with compiled steps (the chain's fused step, the tree's
`greedy_tree_step`), each compiled in a warm-up before timing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.eval.bench import IgnoreEOS, cache_room, code_prompts
from multitoken.generation import Llama, parse_dtype
from multitoken.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--tokenizer-path", type=Path, help="default: CKPT/tokenizer.model")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--trees", type=int, nargs="+", default=[4, 8, 16], help="dynamic tree node budgets")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--headroom", type=int, default=None,
                   help="cache slots past prompt + new tokens (default: eval.bench.cache_room of the largest tree; "
                        "0: the last steps of each prompt run eagerly)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="compiled fixed-shape steps for every mode")
    a = p.parse_args()
    if a.headroom is None:
        a.headroom = cache_room(max(a.trees))

    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.ckpt_dir, device=a.device, dtype=parse_dtype(a.dtype),
                       max_seq_len=a.prompt_len + a.new_tokens + a.headroom, max_batch_size=1)
    prompts = code_prompts(load_tokenizer(a.tokenizer_path or a.ckpt_dir / "tokenizer.model"), a.prompts,
                           a.prompt_len)
    llama = Llama(model, IgnoreEOS())
    modes = {"plain": {}, "chain": {"speculative": True}, **{f"tree {n}": {"tree": n} for n in a.trees}}
    if a.compile:
        llama.compile()
        for kwargs in modes.values():  # compile every mode's graphs before timing
            llama.generate([prompts[0]], a.new_tokens, temperature=0, **kwargs)
    seconds, tokens, forwards = ({m: 0.0 for m in modes} for _ in range(3))
    identical = True
    for prompt in prompts:
        llama.generate([prompt], 8, temperature=0, tree=max(a.trees))  # warm-up
        expected = None
        for mode, kwargs in modes.items():
            start = time.perf_counter()
            out, _ = llama.generate([prompt], a.new_tokens, temperature=0, **kwargs)
            seconds[mode] += time.perf_counter() - start
            expected = expected or out
            identical &= out == expected
            tokens[mode] += len(out[0])
            forwards[mode] += llama.last_stats.forwards if kwargs else len(out[0])

    print(f"{a.ckpt_dir}: batch 1, greedy, {len(prompts)} prompts of {a.prompt_len} tokens, {a.new_tokens} new "
          f"tokens each, {a.headroom} slots of headroom, {a.device} {a.dtype}, threads {torch.get_num_threads()}{', compiled' if a.compile else ''}")
    plain_tps = tokens["plain"] / seconds["plain"]
    print(f"{'mode':<8} {'tok/s':>7} {'speedup':>8} {'tau':>5}")
    for mode in modes:
        tps = tokens[mode] / seconds[mode]
        print(f"{mode:<8} {tps:>7.1f} {tps / plain_tps:>7.2f}x {tokens[mode] / forwards[mode]:>5.2f}")
    print(f"greedy identical: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
