"""Training step cost of multi-token prediction: n=1, n=4 with every head's logits alive (the plain
backward), and n=4 with the per-head backward (optionally with chunked cross-entropy), at the same total
number of blocks, batch and sequence length. Prints tokens/s, peak memory and the ratios to n=1.

    python benchmarks/bench_train.py [--dim 256] [--n-layers 8] [--vocab-size 32000] [--batch-size 4]
        [--seq-len 256] [--steps 3] [--chunk 64] [--bf16] [--threads 2]

Each configuration runs in a fresh process (so peak memory is its own): a warm-up step, then --steps
timed steps (forward, backward, AdamW), median. Peak memory: on CUDA, the allocator's peak; on CPU, the
process' peak resident memory minus its resident memory just before the first step (weights and
tokens are there already; activations, gradients, logits and optimizer state are measured).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = {  # name: (n_future_tokens, per_head_backward, chunked)
    "n=1": (1, False, False),
    "n=1 per-head+chunk": (1, True, True),
    "n=4 all logits": (4, False, False),
    "n=4 per-head": (4, True, False),
    "n=4 per-head+chunk": (4, True, True),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(a: argparse.Namespace) -> dict:
    from multitoken.model import ModelArgs, Transformer
    from multitoken.train.loss import forward_backward

    torch.set_num_threads(a.threads)
    n, per_head, chunked = CONFIGS[a.worker]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=a.vocab_size,
                     n_future_tokens=n, max_seq_len=a.seq_len)
    model = Transformer(args).to(device)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)
    window = torch.randint(0, a.vocab_size, (a.batch_size, a.seq_len + 1), device=device)
    inputs, labels = window[:, :-1], window[:, 1:]
    autocast = torch.autocast(device, torch.bfloat16, enabled=a.bf16)

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            forward_backward(model, inputs, labels, per_head_backward=per_head, chunk=a.chunk if chunked else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    base = torch.cuda.memory_allocated() if device == "cuda" else _rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(a.steps + 1)][1:]  # first: warm-up (and optimizer state allocation)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = statistics.median(times)
    return {"config": a.worker, "step_s": seconds, "tokens_per_s": a.batch_size * a.seq_len / seconds,
            "peak_bytes": peak, "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=8, help="total blocks, heads included (same for every config)")
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--chunk", type=int, default=64, help="positions per cross-entropy chunk")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    passthrough = [x for x in sys.argv[1:] if x != "--configs" and x not in CONFIGS]
    results = []
    for name in a.configs:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--worker", name], capture_output=True,
                             text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{device}, dim {a.dim}, {a.n_layers} blocks, vocab {a.vocab_size}, batch {a.batch_size} x seq "
          f"{a.seq_len}, {'bf16 autocast' if a.bf16 else 'float32'}, median of {a.steps} steps\n")
    base = results[0]
    print(f"{'config':<20} {'params':>8} {'tokens/s':>9} {'step s':>7} {'peak MB':>8} {'time x':>7} {'memory x':>9}")
    for r in results:
        print(f"{r['config']:<20} {r['params'] / 1e6:>7.1f}M {r['tokens_per_s']:>9.0f} {r['step_s']:>7.3f} "
              f"{r['peak_bytes'] / 1e6:>8.0f} {r['step_s'] / base['step_s']:>6.2f}x "
              f"{r['peak_bytes'] / base['peak_bytes']:>8.2f}x")


if __name__ == "__main__":
    main()
