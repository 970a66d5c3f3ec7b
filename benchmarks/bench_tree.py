"""Chain vs tree drafting at batch 1, greedy, over several prompts, modes interleaved per prompt.

    python benchmarks/bench_tree.py --ckpt-dir CKPT [--tokenizer-path FILE] [--prompts 4] [--trees 8 12 16]
        [--prompt-len 64] [--new-tokens 64] [--headroom N] [--threads 1] [--compile] [--compare-kernels]

`multitoken bench --tree N` compares one tree with the chain at several batch sizes; this compares
several tree budgets at batch 1, summing tokens, forwards and seconds over the prompts (the openings
of held-out standard library modules), and sets each tree's tokens/s and tau beside the chain's. tau is
exact; tokens/s is one timed pass per prompt after a warm-up, so noisy on a shared machine. Greedy
output is checked against plain decoding. The cache holds --headroom slots past the last new token, as
a server's cache has room past one request: a step whose tree (or chain) would pass the end of the
cache runs eagerly, and without headroom the last steps of every prompt would (a tree of 8 needs 9
free slots, the chain 4). With
--compile every mode decodes with compiled steps (the chain's fused step, the tree's
`greedy_tree_step`), each compiled in a warm-up before timing. --compare-kernels runs every mode on
two copies of the model, ATen's bf16 products and attention against `multitoken.kernels`' (which make
bf16 verify steps compute each token as a 1-token step does), and says for each whether the chain and
the trees gave plain decoding's tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from multitoken import kernels
from multitoken.checkpoint import load_model
from multitoken.eval.bench import IgnoreEOS, cache_room, code_prompts
from multitoken.generation import Llama, parse_dtype
from multitoken.steps import DecodeSteps
from multitoken.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--tokenizer-path", type=Path, help="default: CKPT/tokenizer.model")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--trees", type=int, nargs="+", default=[8, 12, 16], help="dynamic tree node budgets")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--headroom", type=int, default=None,
                   help="cache slots past prompt + new tokens (default: eval.bench.cache_room of the largest tree; "
                        "0: the last steps of each prompt run eagerly)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="compiled fixed-shape steps for every mode")
    p.add_argument("--compare-kernels", action="store_true",
                   help="every mode twice, with ATen's bf16 products and attention and with multitoken.kernels'")
    a = p.parse_args()
    if a.headroom is None:
        a.headroom = cache_room(max(a.trees))
    if a.compare_kernels and not kernels.available():
        p.error("--compare-kernels needs multitoken.kernels, which do not run on this host (x86-64 Linux with "
                "avx512_bf16 and a C++ compiler)")

    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = code_prompts(load_tokenizer(a.tokenizer_path or a.ckpt_dir / "tokenizer.model"), a.prompts,
                           a.prompt_len)
    # --compare-kernels: the same modes on two copies of the model, ATen's products and attention in one,
    # multitoken.kernels' in the other (DecodeSteps(cpu_kernels=...)); otherwise one copy, as defaults have it.
    variants = {"aten": False, "kernels": True} if a.compare_kernels else {"": None}
    llamas = {}
    for variant, cpu_kernels in variants.items():
        model = load_model(a.ckpt_dir, device=a.device, dtype=parse_dtype(a.dtype),
                           max_seq_len=a.prompt_len + a.new_tokens + a.headroom, max_batch_size=1)
        llama = llamas[variant] = Llama(model, IgnoreEOS())
        llama.steps = DecodeSteps(model, compile=a.compile, cpu_kernels=cpu_kernels)
    modes = {"plain": {}, "chain": {"speculative": True}, **{f"tree {n}": {"tree": n} for n in a.trees}}
    runs = [(variant, mode) for variant in llamas for mode in modes]
    if a.compile:
        for variant, mode in runs:  # compile every mode's graphs before timing
            llamas[variant].generate([prompts[0]], a.new_tokens, temperature=0, **modes[mode])
    seconds, tokens, forwards = ({run: 0.0 for run in runs} for _ in range(3))
    identical = dict.fromkeys(llamas, True)
    for prompt in prompts:
        for variant, llama in llamas.items():
            llama.generate([prompt], 8, temperature=0, tree=max(a.trees))  # warm-up
            expected = None
            for mode, kwargs in modes.items():
                start = time.perf_counter()
                out, _ = llama.generate([prompt], a.new_tokens, temperature=0, **kwargs)
                seconds[variant, mode] += time.perf_counter() - start
                expected = expected or out
                identical[variant] &= out == expected
                tokens[variant, mode] += len(out[0])
                forwards[variant, mode] += llama.last_stats.forwards if kwargs else len(out[0])

    print(f"{a.ckpt_dir}: batch 1, greedy, {len(prompts)} prompts of {a.prompt_len} tokens, {a.new_tokens} new "
          f"tokens each, {a.headroom} slots of headroom, {a.device} {a.dtype}, threads {torch.get_num_threads()}"
          f"{', compiled' if a.compile else ''}, CPU kernels: "
          + ", ".join(f"{v or 'this run'} {'yes' if llama.steps.cpu_kernels else 'no'}" for v, llama in llamas.items()))
    tps = {run: tokens[run] / seconds[run] for run in runs}
    tau = {run: tokens[run] / forwards[run] for run in runs}
    width = max(len(f"{mode} ({variant})" if variant else mode) for variant, mode in runs)
    # Speedups against the first plain row; each tree also against its own chain (issue 9's bar: tau 15%
    # above the chain's at more tokens/s).
    print(f"{'mode':<{width}} {'tok/s':>7} {'speedup':>8} {'vs chain':>9} {'tau':>6} {'tau vs chain':>13}")
    for run in runs:
        variant, mode = run
        chain, tree = (variant, "chain"), mode.startswith("tree")
        vs_chain = f"{tps[run] / tps[chain]:.3f}x" if tree else ""
        tau_vs_chain = f"{tau[run] / tau[chain] - 1:+.1%}" if tree else ""
        name = f"{mode} ({variant})" if variant else mode
        print(f"{name:<{width}} {tps[run]:>7.1f} {tps[run] / tps[runs[0]]:>7.2f}x {vs_chain:>9} {tau[run]:>6.3f} "
              f"{tau_vs_chain:>13}")
    for variant, same in identical.items():
        print(f"greedy identical{f' ({variant})' if variant else ''}: {'yes' if same else 'NO'}")

if __name__ == "__main__":
    main()
