"""Plain (next-token) decoding speed: multitoken's `Llama.generate` beside transformers' `generate`
on the same weights, in the same run, greedy, tokens/s summed over the batch.

    python benchmarks/bench_decode.py --ckpt-dir CKPT [--batch-sizes 1 8] [--prompt-len 128]
        [--new-tokens 128] [--dtype float32] [--threads 2] [--compile]

The checkpoint's trunk and next-token head are exported to a transformers `LlamaForCausalLM`
(rotary rows permuted), so both sides compute the same function. Prompts are random token ids and
EOS is disabled on both sides, so every run generates exactly --new-tokens tokens. Each figure is the
median of --repeats timed runs after one warm-up run (which compiles, with --compile).

Besides tokens/s: the bytes a decode step reads (weights and KV cache), the bandwidth that achieves,
and its fraction of the machine's copy bandwidth measured in the same run. With --compile, also
multitoken's compiled fixed-shape steps (`Llama.compile`; bf16 on a CPU uses row-wise products) and
transformers with a static cache + torch.compile.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.convert.hf import head_to_hf_state_dict, hf_llama_config
from multitoken.eval.bench import IgnoreEOS, copy_bandwidth, median_seconds, step_bytes
from multitoken.generation import Llama, parse_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true",
                   help="also time multitoken's compiled fixed-shape steps and transformers' static cache + compile")
    a = p.parse_args()

    import transformers

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = parse_dtype(a.dtype)
    max_bs = max(a.batch_sizes)
    max_seq_len = a.prompt_len + a.new_tokens
    model = load_model(a.ckpt_dir, device=a.device, dtype=dtype, max_seq_len=max_seq_len, max_batch_size=max_bs)
    llama = Llama(model, IgnoreEOS())  # every row runs to max_gen_len, as transformers does below

    hf = transformers.LlamaForCausalLM(hf_llama_config(model.args)).to(dtype)
    hf.load_state_dict(head_to_hf_state_dict(model.state_dict(), model.args, head=0), strict=True)
    hf = hf.to(a.device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (1, a.prompt_len), generator=g)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"model {a.ckpt_dir}: {n_params / 1e6:.1f}M parameters, {a.dtype}, {a.device}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"prompt {a.prompt_len} tokens, {a.new_tokens} new tokens, greedy, median of {a.repeats}")

    bandwidth = copy_bandwidth(a.device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write, measured in this run)")
    compiled = None
    if a.compile:
        compiled = Llama(model, IgnoreEOS()).compile()  # fixed-shape steps; the warm-up run compiles

    rows = []
    for bs in a.batch_sizes:
        prompts = prompt.repeat(bs, 1)
        outs: dict[str, list] = {}

        def ours(name: str, llama: Llama):
            outs[name] = llama.generate(prompts.tolist(), a.new_tokens, temperature=0)[0]

        def theirs(**kw):
            with torch.inference_mode():
                return hf.generate(prompts.to(a.device), max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                   do_sample=False, **kw)

        row = {"batch": bs, "ours": bs * a.new_tokens / median_seconds(lambda: ours("eager", llama), a.repeats)}
        row["hf"] = bs * a.new_tokens / median_seconds(theirs, a.repeats)
        hf_tokens = theirs()[:, a.prompt_len:].tolist()
        row["agree"] = _agreement(outs["eager"], hf_tokens)
        # Eager steps read the filled part of the cache, compiled ones all of it (max_seq_len).
        row["bytes"] = step_bytes(model, bs, a.prompt_len + a.new_tokens // 2, all_heads=False)
        if compiled is not None:
            row["compiled"] = bs * a.new_tokens / median_seconds(lambda: ours("compiled", compiled), a.repeats)
            row["compiled_agree"] = _agreement(outs["compiled"], outs["eager"])
            row["compiled_bytes"] = step_bytes(model, bs, max_seq_len, all_heads=False)
            t_hfc = median_seconds(lambda: theirs(cache_implementation="static"), a.repeats)
            row["hf_compiled"] = bs * a.new_tokens / t_hfc
        rows.append(row)

    print()
    header = (f"{'batch':>5} {'multitoken tok/s':>17} {'GB/s':>5} {'of copy':>7} {'transformers tok/s':>19} "
              f"{'ratio':>6} {'same tokens':>12}")
    if compiled is not None:
        header += (f" {'compiled tok/s':>15} {'GB/s':>5} {'of copy':>7} {'same as eager':>13} "
                   f"{'hf static+compile':>18} {'compiled/hf':>11}")
    print(header)
    for r in rows:
        # Achieved bandwidth: bytes a decode step reads x steps per second (tokens/s over the batch).
        bw = r["bytes"] * r["ours"] / r["batch"]
        line = (f"{r['batch']:>5} {r['ours']:>17.1f} {bw / 1e9:>5.1f} {bw / bandwidth:>7.0%} {r['hf']:>19.1f} "
                f"{r['ours'] / r['hf']:>5.2f}x {r['agree']:>11.1%}")
        if compiled is not None:
            cbw = r["compiled_bytes"] * r["compiled"] / r["batch"]
            line += (f" {r['compiled']:>15.1f} {cbw / 1e9:>5.1f} {cbw / bandwidth:>7.0%} {r['compiled_agree']:>12.1%} "
                     f"{r['hf_compiled']:>18.1f} {r['compiled'] / r['hf_compiled']:>10.2f}x")
        print(line)
    print(f"bytes per decode step at batch 1: {rows[0]['bytes'] / 1e6:.1f} MB (weights but the embedding table, "
          f"and the KV cache); the copy bandwidth allows {bandwidth / rows[0]['bytes']:.1f} steps/s")


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for r1, r2 in zip(a, b) for x, y in zip(r1, r2)) / sum(len(r) for r in a)


if __name__ == "__main__":
    main()
