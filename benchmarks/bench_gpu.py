"""The GPU check, in one call: greedy exactness of self-speculation (chain, "auto" draft count and tree)
on a small model, then decode speed of the released 7B n=4 layout (28 trunk blocks + 4 head blocks,
dim 4096, bf16) plain, self-speculative and with a 64-node draft tree at batch 1 and 8, and of a
Llama-2-7B-shaped n=1 model at batch 8. One table last.

    python benchmarks/bench_gpu.py [--new-tokens 128] [--repeats 3] [--skip-7b] [--compile reduce-overhead]
        [--tree 64] [--tiny --device cpu]

--tiny swaps the 7B shapes for small ones, so the script itself can be tried on a CPU (the tests do).

--compile MODE decodes with compiled fixed-shape steps (`Llama.compile(mode=MODE)`; "reduce-overhead"
replays them as CUDA graphs), and checks their greedy exactness too.

Weights are random (no checkpoint can travel to the device machine), so drafts are almost never
accepted: the speculative rows measure the cost of one self-speculative step (k + 1 tokens through
the trunk and the next-token head, the extra heads at the accepted position) relative to a plain
step, which is what the issue's targets bound (<= 1.15x); tokens/s at a given tau follow from it.
Likewise the tree rows measure one tree step (a dynamic tree of --tree draft nodes verified in one
forward, the accepted path compacted) relative to a plain step; tree drafting runs eagerly.
The weight-streaming ceiling uses the GPU's measured copy bandwidth, taken in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch

from multitoken.eval.bench import IgnoreEOS, copy_bandwidth
from multitoken.generation import Llama
from multitoken.model import ModelArgs, Transformer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _sync_time(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def random_model(args: ModelArgs, batch: int, seq: int, dtype: torch.dtype, device: str) -> Transformer:
    with torch.device(device):
        model = Transformer(args)
    model.init_weights(std=0.02)
    model.to(dtype)
    model.setup_caches(batch, seq)
    return model.eval()


def check_exactness(compile_mode: str | None, device: str) -> bool:
    """Greedy self-speculative == plain greedy on a small float32 model: eagerly at batch 1 and 4 for
    every k, "auto" and a 16-node tree; given a mode, compiled at batch 4 (ragged prompts) too."""
    args = ModelArgs(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=512, n_future_tokens=4,
                     multiple_of=64, max_seq_len=128)
    torch.manual_seed(0)
    model = random_model(args, 4, 128, torch.float32, device)
    llama = Llama(model, IgnoreEOS())
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 17, 9, 30)]
    ok = True
    for batch in (prompts[:1], prompts):
        plain, _ = llama.generate(batch, 40, temperature=0)
        for k in (1, 2, 3, "auto"):
            spec, _ = llama.generate(batch, 40, temperature=0, speculative=True, draft_heads=k)
            ok &= spec == plain
        ok &= llama.generate(batch, 40, temperature=0, tree=16)[0] == plain
    if compile_mode is not None:
        # Batch 4 alone: each compiled shape costs a compilation, and the ragged batch is the harder case.
        plain, _ = llama.generate(prompts, 40, temperature=0)
        compiled = Llama(model, IgnoreEOS()).compile(mode=compile_mode)
        ok &= compiled.generate(prompts, 40, temperature=0)[0] == plain
        ok &= compiled.generate(prompts, 40, temperature=0, speculative=True)[0] == plain
        ok &= compiled.generate(prompts, 40, temperature=0, speculative=True, draft_heads="auto")[0] == plain
    return ok


def time_decode(model: Transformer, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                compile_mode: str | None, **mode) -> tuple[float, float]:
    """(tokens/s summed over the batch, seconds per forward step), median over repeats; `mode` is
    generate's speculative=True or tree=N, or nothing for plain decoding."""
    llama = Llama(model, IgnoreEOS())
    if compile_mode is not None:
        llama.compile(mode=compile_mode)
    prompts = torch.randint(0, model.args.vocab_size, (batch, prompt_len)).tolist()
    run = lambda: llama.generate(prompts, new_tokens, temperature=0, **mode)  # noqa: E731
    run()  # warm-up
    times = [_sync_time(run) for _ in range(repeats)]
    seconds = statistics.median(times)
    steps = llama.last_stats.forwards / batch if mode else new_tokens
    return batch * new_tokens / seconds, seconds / steps


def guarded(what: str, fn, failed: list[str]):
    """fn(), or None after printing why it failed: one broken row must not cost the rest of the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported, and the run goes on
        print(f"FAILED {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        traceback.print_exc()
        failed.append(what)
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-7b", action="store_true", help="exactness check and bandwidth only")
    p.add_argument("--compile", metavar="MODE", nargs="?", const="reduce-overhead", default=None,
                   help="after the eager rows, compiled rows with this torch.compile mode (default if given: "
                        "reduce-overhead, i.e. CUDA graphs)")
    p.add_argument("--tree", type=int, default=64, help="draft nodes of the timed tree (0: no tree rows)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes instead of 7B: to try the script on a CPU")
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: this script is for the GPU machine (CPU: bench_decode.py, "
                         "or --tiny --device cpu to try this script)")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name() if cuda else a.device}, torch {torch.__version__}", flush=True)
    failed: list[str] = []
    exact = guarded("exactness check", lambda: check_exactness(a.compile, a.device), failed)
    print(f"greedy self-speculative == plain (batch 1 and 4; k = 1, 2, 3, auto; tree 16; compiled: {a.compile}): "
          f"{exact}", flush=True)
    bw = copy_bandwidth(a.device, (64 << 20) if a.tiny else (4 << 30))
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows = []

    def row(*values) -> None:
        rows.append(values)
        name, batch, path, tps, ratio, tree_ratio, ceiling = values
        print(f"  {name} b{batch} {path}: {tps:.1f} tok/s plain, spec step {ratio:.2f}x, tree step "
              f"{tree_ratio:.2f}x (ceiling {ceiling:.0f} tok/s)", flush=True)

    if not a.skip_7b:
        seq = a.prompt_len + a.new_tokens + max(8, a.tree + 1)
        dim, layers, vocab = (128, 8, 512) if a.tiny else (4096, 32, 32000)
        shape = dict(dim=dim, n_layers=layers, n_heads=dim // 128, vocab_size=vocab, multiple_of=256, max_seq_len=seq)
        dtype = torch.float32 if a.tiny else torch.bfloat16
        model = random_model(ModelArgs(**shape, n_future_tokens=4), 8, seq, dtype, a.device)
        head = 2 * ((layers - 3) * sum(t.numel() for t in model.layers[0].parameters()) + 2 * vocab * dim)
        ceiling = bw / head  # bytes of the next-token path per token (embedding row ignored)
        # Eager first (tree steps are eager in both), then compiled: a failed compilation still leaves rows.
        for compile_mode in (None, a.compile) if a.compile else (None,):
            path = "eager" if compile_mode is None else f"compiled ({compile_mode})"
            for batch in (1, 8):
                timed = lambda **mode: time_decode(model, batch, a.prompt_len, a.new_tokens,  # noqa: E731
                                                   a.repeats, compile_mode, **mode)
                plain = guarded(f"7B n=4 b{batch} {path} plain", timed, failed)
                spec = guarded(f"7B n=4 b{batch} {path} speculative", lambda: timed(speculative=True), failed)
                tree = (guarded(f"7B n=4 b{batch} tree {a.tree}", lambda: timed(tree=a.tree), failed)
                        if a.tree and compile_mode is None else None)
                if plain is not None:
                    nan = float("nan")
                    row("7B n=4", batch, path, plain[0], spec[1] / plain[1] if spec else nan,
                        tree[1] / plain[1] if tree else nan, ceiling)
        del model
        if cuda:
            torch.cuda.empty_cache()
        model = random_model(ModelArgs(**shape, n_future_tokens=1), 8, seq, dtype, a.device)
        for compile_mode in (None, a.compile) if a.compile else (None,):
            path = "eager" if compile_mode is None else f"compiled ({compile_mode})"
            plain = guarded(f"Llama-2-7B b8 {path}", lambda: time_decode(model, 8, a.prompt_len, a.new_tokens,
                                                                          a.repeats, compile_mode), failed)
            if plain is not None:
                row("Llama-2-7B n=1", 8, path, plain[0], float("nan"), float("nan"), float("nan"))
    print()
    print(f"{'model':<16} {'batch':>5} {'path':<26} {'plain tok/s':>11} {'spec step / plain':>17} "
          f"{f'tree {a.tree} step / plain':>20} {'ceiling tok/s (b1)':>18}")
    for name, batch, path, tps, ratio, tree_ratio, ceiling in rows:
        print(f"{name:<16} {batch:>5} {path:<26} {tps:>11.1f} {ratio:>17.2f} {tree_ratio:>20.2f} {ceiling:>18.0f}")
    print("targets: 7B n=4 b1 plain >= 185 tok/s, spec step <= 1.15x plain; Llama-2-7B b8 >= 1100 tok/s; "
          f"exactness {'ok' if exact else 'FAILED'}" + ("  (--tiny: shapes are not 7B)" if a.tiny else ""))
    if failed:
        print("failed: " + "; ".join(failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
