"""`multitoken` command line: one typed function per subcommand; argparse turns options into arguments."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def generate(
    prompts: list[str],
    ckpt_dir: Path,
    tokenizer_path: Path | None = None,
    prompts_file: Path | None = None,
    max_gen_len: int = 256,
    temperature: float = 0.6,
    top_p: float = 0.9,
    seed: int = 1,
    max_seq_len: int = 2048,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Complete each prompt, streaming the text as it is produced."""
    from multitoken.generation import Llama
    from multitoken.sampling import check_sampling_args
    from multitoken.tokenizer import StreamDecoder

    check_sampling_args(temperature, top_p)  # before loading a model that may take minutes
    if prompts_file is not None:
        prompts = [*prompts, *_read_prompts(prompts_file)]
    if not prompts:
        raise SystemExit("error: no prompt given: pass PROMPT arguments or --prompts-file FILE")
    tokenizer_path = tokenizer_path or _find_tokenizer(ckpt_dir)
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=1, seed=seed,
                        device=device, dtype=dtype)
    for prompt in prompts:
        prompt_tokens = llama.tokenizer.encode(prompt, bos=True, eos=False)
        stream = StreamDecoder(llama.tokenizer)
        print(prompt, end="", flush=True)
        start, n = time.perf_counter(), 0

        def on_token(row: int, token: int) -> None:
            nonlocal n
            n += 1
            print(stream.push(token), end="", flush=True)

        llama.generate([prompt_tokens], max_gen_len, temperature=temperature, top_p=top_p, on_token=on_token)
        print(stream.flush(), flush=True)
        elapsed = time.perf_counter() - start
        print(f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s]", file=sys.stderr)


def init(
    out: Path,
    dim: int,
    n_layers: int,
    n_heads: int,
    vocab_size: int,
    n_kv_heads: int | None = None,
    n_future_tokens: int = 1,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
    norm_eps: float = 1e-5,
    rope_theta: float = 10000.0,
    seed: int = 0,
    dtype: str = "float32",
) -> None:
    """Write a randomly initialised checkpoint (scaled normal init, ready for training)."""
    from multitoken.checkpoint import save_model
    from multitoken.generation import parse_dtype
    from multitoken.model import ModelArgs, Transformer

    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                     n_future_tokens=n_future_tokens, multiple_of=multiple_of,
                     ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=norm_eps, rope_theta=rope_theta)
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    save_model(model.to(parse_dtype(dtype)), out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n_params / 1e6:.1f}M parameters, n_future_tokens={n_future_tokens})")


def tokenizer_train(inputs: list[Path], vocab_size: int, out: Path) -> None:
    """Train a SentencePiece BPE tokenizer for code (byte fallback, digits split, whitespace kept)."""
    from multitoken.tokenizer import train_sentencepiece

    path = train_sentencepiece(inputs, vocab_size, out)
    print(f"wrote {path}")


def _read_prompts(path: Path) -> list[str]:
    """One prompt per line; a literal \\n inside a line stands for a newline, so code prompts fit."""
    if not path.is_file():
        raise SystemExit(f"error: prompts file not found: {path}")
    return [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]


def _find_tokenizer(ckpt_dir: Path) -> Path:
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"error: no tokenizer.model in {ckpt_dir} or its parent: pass --tokenizer-path FILE")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitoken", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help=generate.__doc__, description=generate.__doc__)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text to complete")
    p.add_argument("--ckpt-dir", type=Path, required=True, help="checkpoint folder (params.json + *.pth)")
    p.add_argument("--tokenizer-path", type=Path, help="tokenizer.model (default: in the checkpoint folder or its parent)")
    p.add_argument("--prompts-file", type=Path, help="file with one prompt per line (\\n stands for a newline)")
    p.add_argument("--max-gen-len", type=int, default=256, help="most tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=1, help="random seed for sampling")
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV cache length: prompt + generation")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    p.set_defaults(func=generate)

    p = sub.add_parser("init", help=init.__doc__, description=init.__doc__)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--dim", type=int, required=True, help="model width")
    p.add_argument("--n-layers", type=int, required=True, help="number of blocks, prediction heads included")
    p.add_argument("--n-heads", type=int, required=True, help="attention heads")
    p.add_argument("--n-kv-heads", type=int, help="key/value heads for grouped-query attention (default: n-heads)")
    p.add_argument("--vocab-size", type=int, required=True, help="must equal the tokenizer's size")
    p.add_argument("--n-future-tokens", type=int, default=1, help="prediction heads (1 = plain next-token model)")
    p.add_argument("--multiple-of", type=int, default=256, help="round the feed-forward width up to this")
    p.add_argument("--ffn-dim-multiplier", type=_optional_float, default=None, help="scale the feed-forward width")
    p.add_argument("--norm-eps", type=float, default=1e-5, help="RMSNorm epsilon")
    p.add_argument("--rope-theta", type=float, default=10000.0, help="rotary embedding base")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--dtype", default="float32", help="dtype of the saved weights")
    p.set_defaults(func=init)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tsub.add_parser("train", help=tokenizer_train.__doc__, description=tokenizer_train.__doc__)
    p.add_argument("--input", dest="inputs", type=Path, nargs="+", required=True, help="text files or folders of *.py")
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.set_defaults(func=tokenizer_train)
    return parser


def main(argv: list[str] | None = None) -> None:
    ns = vars(build_parser().parse_args(argv))
    func = ns.pop("func")
    ns.pop("command")
    ns.pop("tokenizer_command", None)
    try:
        func(**ns)
    except (ValueError, FileNotFoundError) as e:
        # Bad input gets its message, not a traceback; bugs (other exceptions) still show one.
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
