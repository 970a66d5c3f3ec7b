"""What verifying m tokens costs against decoding one: the step behind every draft chain and tree.

    python benchmarks/bench_verify.py --ckpt-dir CKPT [--tokens 1 2 4 8 9 16] [--batch 1] [--position 128]
        [--dtype bfloat16] [--eager] [--threads 2] [--rounds 8] [--calls 10]

Times one step (the trunk and the next-token head) feeding m tokens per row at --position, for each m
of --tokens, in rounds of --calls steps in a row per count (the fastest round counts), with compiled
fixed-shape steps (`Llama.compile`, a graph per m) or, with --eager, eager ones. Self-speculation
pays where a step of k + 1 tokens costs little more than a step of one, which holds where decoding
is bound by streaming the weights from memory. "tau needed vs chain" is how many more tokens per
forward a tree of m - 1 nodes must accept than the chain of k drafts (the model's extra heads) to
pay for its larger verify step. The weights' size is printed beside the CPU's last-level cache: a
model that fits there is not streamed from memory, and its steps grow with their tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.eval.bench import format_verify_costs, verify_costs
from multitoken.generation import Llama, parse_dtype


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache of cpu0 as Linux reports it (None where it does not)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 9, 16],
                   help="tokens per row of each timed step (1 and the chain's k + 1 are always timed)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--position", type=int, default=128, help="cache position the steps write at")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eager", action="store_true", help="eager steps instead of compiled ones")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds; the fastest counts")
    p.add_argument("--calls", type=int, default=10, help="steps in a row per count and round")
    a = p.parse_args()
    if min(a.tokens) < 1:
        p.error(f"--tokens must be at least 1 per row, got {min(a.tokens)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.ckpt_dir, device=a.device, dtype=parse_dtype(a.dtype),
                       max_seq_len=a.position + max(a.tokens) + 16, max_batch_size=a.batch)
    k = model.n_future_tokens - 1
    counts = sorted({1, k + 1, *a.tokens})
    llama = Llama(model, None) if a.eager else Llama(model, None).compile()
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    cache = last_level_cache_bytes() if a.device == "cpu" else None
    print(f"{a.ckpt_dir}: {weights / 1e6:.1f} MB of {a.dtype} weights"
          + (f" (last-level CPU cache {cache / 1e6:.0f} MB)" if cache else "")
          + f", batch {a.batch}, position {a.position}, k = {k}, {'eager' if a.eager else 'compiled'} steps, "
          f"{a.device}, threads {torch.get_num_threads()}, torch {torch.__version__}", flush=True)
    costs = verify_costs(llama.steps, a.batch, a.position, counts, a.rounds, a.calls)
    print(format_verify_costs(costs, k + 1))


if __name__ == "__main__":
    main()
