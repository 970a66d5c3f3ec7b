"""Plain vs self-speculative decoding on the same model, prompts and settings, interleaved in one run.

    python benchmarks/bench_speculative.py --ckpt-dir CKPT [--tokenizer-path FILE]
        [--batch-sizes 1 4 16] [--temperatures 0 0.8] [--new-tokens 128] [--repeats 3] [--tree N] [--png FILE]
        [--dtype float32] [--compile] [--draft-heads K|auto] [--prompts N]

Prompts are the openings of Python standard library modules (without a tokenizer: random token ids),
--prompts of them (default: the largest batch size), and every batch size decodes all of them.
Prints tokens/s of each mode, the speedup, tokens per forward (tau, counting the verified token) and
the acceptance rate of each draft position, for the chain and, with --tree, for tree drafting;
`multitoken bench` is the same report from the CLI. The cache has room past the last new token
(`eval.bench.cache_room`).

Then the cost of one step at each batch size (rounds of 10 steps in a row of each kind, the fastest
round): a decode step (1 token per row), a verify step (1 + k tokens) and a whole greedy
self-speculative step (verify, accept, draft), with the bytes of weights and KV cache each reads, the
bandwidth that achieves, and its fraction of the machine's copy bandwidth measured in the same run.
With --compile both modes use compiled fixed-shape steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.eval.bench import (
    cache_room,
    code_prompts,
    copy_bandwidth,
    format_report,
    format_step_costs,
    plot_report,
    speed_report,
    step_costs,
)
from multitoken.speculative import check_draft_heads
from multitoken.generation import Llama, parse_dtype
from multitoken.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--tokenizer-path", type=Path, help="default: CKPT/tokenizer.model if present")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--prompts", type=int, default=None,
                   help="prompts every batch size decodes (default: the largest batch size)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--draft-heads", type=lambda v: v if v == "auto" else int(v), default=None,
                   help="drafts verified per step (default: all), or auto (chosen each step)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tree", type=int, default=None, help="also measure a dynamic draft tree of this many nodes")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--png", type=Path, help="also draw the report as a chart")
    p.add_argument("--compile", action="store_true", help="compiled fixed-shape decode steps (warm-up compiles)")
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.ckpt_dir, device=a.device, dtype=parse_dtype(a.dtype),
                       max_seq_len=a.prompt_len + a.new_tokens + cache_room(a.tree or 0),
                       max_batch_size=max(a.batch_sizes))
    n_prompts = a.prompts or max(a.batch_sizes)
    tok_path = a.tokenizer_path or a.ckpt_dir / "tokenizer.model"
    if tok_path.is_file():
        tokenizer = load_tokenizer(tok_path)
        prompts, source = code_prompts(tokenizer, n_prompts, a.prompt_len), f"stdlib openings ({tok_path})"
    else:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.args.vocab_size, (n_prompts, a.prompt_len), generator=g).tolist()
        tokenizer, source = None, "random token ids (no tokenizer found)"
    n_params = sum(t.numel() for t in model.parameters())
    print(f"model {a.ckpt_dir}: {n_params / 1e6:.1f}M parameters, n_future_tokens={model.n_future_tokens}, "
          f"{a.dtype}, {a.device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"prompts: {len(prompts)} {source}, {a.prompt_len} tokens; {a.new_tokens} new tokens; median of {a.repeats}")
    llama = Llama(model, tokenizer)
    if a.compile:
        llama.compile()
    print(f"decode steps: {'compiled' if a.compile else 'eager'}")
    rows = speed_report(llama, prompts, a.batch_sizes, a.temperatures, new_tokens=a.new_tokens,
                        repeats=a.repeats, top_p=a.top_p, draft_heads=a.draft_heads, tree=a.tree)
    print()
    print(format_report(rows))
    if a.png:
        print(f"wrote {plot_report(rows, a.png)}")
    k = check_draft_heads(model, None if a.draft_heads == "auto" else a.draft_heads)
    position = a.prompt_len + a.new_tokens // 2
    costs = step_costs(llama, a.batch_sizes, min(position, model.args.max_seq_len - 1 - k), k)
    print(f"\nstep cost at position {position}, k = {k} drafts, fastest of 8 rounds of 10 steps in a row:")
    print(format_step_costs(costs, copy_bandwidth(a.device)))


if __name__ == "__main__":
    main()
