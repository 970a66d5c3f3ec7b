"""Plain (next-token) decoding speed: multitoken's `Llama.generate` beside transformers' `generate`
on the same weights, in the same run, greedy, tokens/s summed over the batch.

    python benchmarks/bench_decode.py --ckpt-dir CKPT [--batch-sizes 1 8] [--prompt-len 128]
        [--new-tokens 128] [--dtype float32] [--threads 2] [--compile]

The checkpoint's trunk and next-token head are exported to a transformers `LlamaForCausalLM`
(rotary rows permuted), so both sides compute the same function. Prompts are random token ids and
EOS is disabled on both sides, so every run generates exactly --new-tokens tokens. Each figure is the
median of --repeats timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.convert.hf import head_to_hf_state_dict, hf_llama_config
from multitoken.eval.bench import IgnoreEOS
from multitoken.generation import Llama, parse_dtype


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation, if any)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """The machine's memory read bandwidth in bytes/s: summing a buffer far larger than any cache."""
    buf = torch.ones(nbytes // 4, device=device)
    seconds = _median_seconds(lambda: (buf.sum(), torch.cuda.synchronize() if device == "cuda" else None), 5)
    return nbytes / seconds


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
    p.add_argument("--compile", action="store_true", help="also time transformers with static cache + torch.compile")
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

    # Batch-1 decoding streams every weight but the embedding table once per token.
    step_bytes = sum(t.numel() * t.element_size() for n, t in model.named_parameters()
                     if n != "tok_embeddings.weight" and not n.startswith("extra_heads."))
    bandwidth = read_bandwidth(a.device)
    ceiling = bandwidth / step_bytes
    print(f"weights read per step {step_bytes / 1e6:.0f} MB; memory read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"batch-1 ceiling {ceiling:.1f} tok/s")

    rows = []
    for bs in a.batch_sizes:
        prompts = prompt.repeat(bs, 1)
        ours_out = []

        def ours():
            ours_out[:] = llama.generate(prompts.tolist(), a.new_tokens, temperature=0)[0]

        def theirs(**kw):
            with torch.inference_mode():
                return hf.generate(prompts.to(a.device), max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                   do_sample=False, **kw)

        t_ours = _median_seconds(ours, a.repeats)
        t_hf = _median_seconds(theirs, a.repeats)
        hf_tokens = theirs()[:, a.prompt_len:].tolist()
        agree = sum(x == y for r1, r2 in zip(ours_out, hf_tokens) for x, y in zip(r1, r2)) / (bs * a.new_tokens)
        row = {"batch": bs, "ours": bs * a.new_tokens / t_ours, "hf": bs * a.new_tokens / t_hf, "agree": agree}
        if a.compile:
            t_hfc = _median_seconds(lambda: theirs(cache_implementation="static"), a.repeats)
            row["hf_compiled"] = bs * a.new_tokens / t_hfc
        rows.append(row)

    print()
    header = f"{'batch':>5} {'multitoken tok/s':>17} {'transformers tok/s':>19} {'ratio':>6} {'same tokens':>12}"
    if a.compile:
        header += f" {'hf static+compile':>18} {'ratio':>6}"
    print(header)
    for r in rows:
        line = f"{r['batch']:>5} {r['ours']:>17.1f} {r['hf']:>19.1f} {r['ours'] / r['hf']:>5.2f}x {r['agree']:>11.1%}"
        if a.compile:
            line += f" {r['hf_compiled']:>18.1f} {r['ours'] / r['hf_compiled']:>5.2f}x"
        print(line)
    for r in rows:
        if r["batch"] == 1:
            print(f"batch 1: multitoken at {r['ours'] / ceiling:.0%} of the weight-streaming ceiling, "
                  f"transformers at {r['hf'] / ceiling:.0%}")


if __name__ == "__main__":
    main()
