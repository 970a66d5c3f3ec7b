"""`multitoken` command line: one typed function per subcommand; argparse turns options into arguments."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def generate(
    prompts: list[str],
    ckpt_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    prompts_file: Path | None = None,
    max_gen_len: int = 256,
    temperature: float = 0.6,
    top_p: float = 0.9,
    seed: int = 1,
    max_seq_len: int = 2048,
    device: str | None = None,
    dtype: str = "auto",
    speculative: bool | None = None,
    draft_heads: int | str | None = None,
    tree: int | list[list[int]] | None = None,
    compile: bool = False,
) -> None:
    """Complete each prompt, streaming the text as it is produced (default model: the shipped one)."""
    from multitoken.checkpoint import default_ckpt_dir
    from multitoken.generation import Llama
    from multitoken.sampling import check_sampling_args
    from multitoken.tokenizer import StreamDecoder

    check_sampling_args(temperature, top_p)  # before loading a model that may take minutes
    if prompts_file is not None:
        prompts = [*prompts, *_read_prompts(prompts_file)]
    if not prompts:
        raise SystemExit("error: no prompt given: pass PROMPT arguments or --prompts-file FILE")
    ckpt_dir = ckpt_dir or default_ckpt_dir()
    tokenizer_path = tokenizer_path or _find_tokenizer(ckpt_dir)
    _say_if_building_kernels(ckpt_dir, device, dtype, tree)
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=1, seed=seed,
                        device=device, dtype=dtype, compile=compile)
    if speculative is None:  # on whenever the model has heads to draft with
        speculative = llama.model.n_future_tokens > 1
    elif speculative and llama.model.n_future_tokens == 1:
        raise SystemExit(f"error: --speculative needs extra prediction heads, but {ckpt_dir} has "
                         f"n_future_tokens=1: drop --speculative, or add heads (multitoken train --add-heads K)")
    encoded = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    if compile:  # compile before the first prompt, so its tokens/s is the decoding's, not the compiler's
        print("[compiling the decode steps: once per process, a minute or more on a CPU]", file=sys.stderr, flush=True)
        start = time.perf_counter()
        # "auto" times every draft count first: a longer warm-up compiles them all.
        warmup = 32 if draft_heads == "auto" else 8
        # Steps attend a span of the cache that grows with the text: compile every graph of the spans the
        # prompts can reach now, not in the middle of a completion.
        for span in llama.steps.spans(max(map(len, encoded)) + max_gen_len + 16):
            with llama.steps.spanning(span):
                llama.generate([encoded[0]], warmup, temperature=temperature, top_p=top_p, speculative=speculative,
                               draft_heads=draft_heads, tree=tree)
        torch.manual_seed(seed)  # the warm-up drew samples: start the prompts where a plain run starts
        print(f"[compiled in {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    for prompt, prompt_tokens in zip(prompts, encoded):
        stream = StreamDecoder(llama.tokenizer)
        print(prompt, end="", flush=True)
        start, n = time.perf_counter(), 0

        def on_token(row: int, token: int) -> None:
            nonlocal n
            n += 1
            print(stream.push(token), end="", flush=True)

        llama.generate([prompt_tokens], max_gen_len, temperature=temperature, top_p=top_p, on_token=on_token,
                       speculative=speculative, draft_heads=draft_heads, tree=tree)
        print(stream.flush(), flush=True)
        elapsed = time.perf_counter() - start
        report = f"{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s"
        if speculative or tree is not None:
            report += f"; {llama.last_stats.summary()}"
        print(f"[{report}]", file=sys.stderr)


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


def tokenizer_train(vocab_size: int, out: Path, inputs: list[Path] | None = None) -> None:
    """Train a SentencePiece BPE tokenizer for code (byte fallback, digits split, whitespace kept)."""
    from multitoken.tokenizer import train_sentencepiece
    from multitoken.train.data import default_corpus

    path = train_sentencepiece(inputs or default_corpus(), vocab_size, out)
    print(f"wrote {path}")


def train(
    out: Path,
    tokenizer_path: Path | None = None,
    data: list[Path] | None = None,
    glob: str = "*.py",
    text_field: str = "text",
    val_fraction: float = 0.01,
    val_data: list[Path] | None = None,
    cache_dir: Path | None = None,
    config: Path | None = None,
    dim: int | None = None,
    n_layers: int | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    n_future_tokens: int | None = None,
    multiple_of: int | None = None,
    init_from: Path | None = None,
    add_heads: int = 0,
    freeze_trunk: bool = False,
    soft_targets: float = 0.0,
    steps: int = 1000,
    batch_size: int = 8,
    seq_len: int = 256,
    grad_accum: int = 1,
    lr: float = 3e-4,
    warmup: int = 100,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    head_weights: list[float] | None = None,
    loss_chunk: int | None = None,
    all_logits: bool = False,
    bf16: bool = False,
    compile: bool = False,
    save_every: int = 100,
    keep: int = 2,
    eval_every: int = 100,
    eval_batches: int = 8,
    max_bad_steps: int = 5,
    resume: bool = False,
    seed: int = 0,
    no_progress: bool = False,
) -> None:
    """Train a multi-token prediction model (from scratch, from a checkpoint, or its heads only)."""
    from multitoken.train.trainer import NonFiniteError, TrainConfig, run

    if not 0 <= soft_targets <= 1:
        raise SystemExit(f"error: --soft-targets is the next-token head's share of the targets, in [0, 1]: "
                         f"got {soft_targets}")
    shape = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
             "n_future_tokens": n_future_tokens, "multiple_of": multiple_of}
    if init_from is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is not None] + (["--config"] if config else [])
        if given:
            raise SystemExit(f"error: --from takes the model's shape from the checkpoint: drop {' '.join(given)}")
        tokenizer_path = tokenizer_path or _find_tokenizer(init_from)
    else:
        if config is None:  # a small default model that trains on a CPU
            defaults = {"dim": 256, "n_layers": 8, "n_heads": 8, "n_future_tokens": 2}
            shape = {k: defaults.get(k) if v is None else v for k, v in shape.items()}
        shape["config"] = config
    if freeze_trunk and init_from is None:
        raise SystemExit("error: --freeze-trunk trains the heads of an existing model: pass --from CKPT")
    if tokenizer_path is None:
        raise SystemExit("error: pass --tokenizer-path FILE (a SentencePiece .model, or 'byte' for bytes)")
    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--seq-len", seq_len),
                        ("--grad-accum", grad_accum), ("--save-every", save_every), ("--eval-every", eval_every)):
        if value < 1:
            raise SystemExit(f"error: {name} must be at least 1, got {value}")
    cfg = TrainConfig(out=out, steps=steps, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr,
                      warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip, head_weights=head_weights,
                      loss_chunk=loss_chunk, per_head_backward=not all_logits, freeze_trunk=freeze_trunk,
                      soft_targets=soft_targets, bf16=bf16, compile=compile, save_every=save_every, keep=keep,
                      eval_every=eval_every, eval_batches=eval_batches, seed=seed, max_bad_steps=max_bad_steps,
                      progress=not no_progress,
                      # Recorded for resume checks (soft targets only when on: older runs lack the key).
                      extra={"head_weights": head_weights, **({"soft_targets": soft_targets} if soft_targets else {})})
    try:
        trainer = run(cfg, tokenizer_path=tokenizer_path, data_paths=data, glob=glob, text_field=text_field,
            val_fraction=val_fraction, cache_dir=cache_dir, val_data=val_data, shape=shape, init_from=init_from,
            add_heads_k=add_heads,
            resume=resume)
    except NonFiniteError as e:
        raise SystemExit(f"error: {e}") from None
    if trainer.rank == 0:
        print(f"done: checkpoints in {out}, metrics in {out / 'metrics.jsonl'}")


def plot(run_dirs: list[Path], out: Path | None = None) -> None:
    """Plot loss and top-1 accuracy per head of a training run (RUN/metrics.jsonl) to a PNG; with several
    runs, their validation curves on shared axes."""
    from multitoken.train.plot import plot_metrics, plot_runs

    if len(run_dirs) == 1:
        print(f"wrote {plot_metrics(run_dirs[0], out)}")
    elif out is None:
        raise SystemExit("error: comparing several runs needs --out PNG")
    else:
        print(f"wrote {plot_runs(run_dirs, out)}")


def eval_humaneval(
    out: Path,
    ckpt_dir: Path | None = None,
    samples: Path | None = None,
    tokenizer_path: Path | None = None,
    n_samples: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    speculative: bool = False,
    limit: int | None = None,
    max_gen_len: int = 512,
    batch_size: int = 8,
    timeout: float = 10.0,
    workers: int | None = None,
    seed: int = 1,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """HumanEval pass@k: generate completions with a checkpoint (--ckpt-dir) or take them from a samples
    file (--samples), run each against the problem's tests in a sandbox, append results to --out."""
    from multitoken.eval.humaneval import run_humaneval

    run_humaneval(out, ckpt_dir=ckpt_dir, samples=samples, tokenizer_path=tokenizer_path, n_samples=n_samples,
                  temperature=temperature, top_p=top_p, speculative=speculative, limit=limit,
                  max_gen_len=max_gen_len, batch_size=batch_size, timeout=timeout, workers=workers, seed=seed,
                  device=device, dtype=dtype, find_tokenizer=_find_tokenizer)


def convert(out: Path, from_hf: Path | None = None, from_gguf: Path | None = None, to_hf: Path | None = None,
            from_meta: Path | None = None, dtype: str | None = None) -> None:
    """Convert a model: a Hugging Face Llama folder or a GGUF file to our format, ours to Hugging Face, or
    ours to ours in another dtype."""
    from multitoken.generation import parse_dtype

    if dtype is not None and from_meta is None:
        raise SystemExit("error: --dtype applies to --from-meta conversions only")
    if from_meta is not None:
        from multitoken.convert.meta import recast

        recast(from_meta, out, parse_dtype(dtype) if dtype else None)
        print(f"wrote {out}")
        return
    try:
        if from_hf is not None:
            from multitoken.convert.hf import from_hf as run
        elif from_gguf is not None:
            from multitoken.convert.gguf import from_gguf as run
        else:
            from multitoken.convert.hf import to_hf as run
        run(from_hf or from_gguf or to_hf, out)
    except ImportError as e:  # an optional dependency: say which extra installs it
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


def distill(
    ckpt_dir: Path,
    prompts_file: Path,
    out: Path,
    tokenizer_path: Path | None = None,
    samples_per_prompt: int = 1,
    max_gen_len: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 8,
    chat: bool = False,
    seed: int = 1,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Self-distillation data: the model's own completions of the prompts, as JSONL for multitoken train
    (then: train --from CKPT --add-heads K --freeze-trunk --data OUT)."""
    from multitoken.generation import Llama
    from multitoken.sampling import check_sampling_args
    from multitoken.train.distill import self_distill

    check_sampling_args(temperature, top_p)
    prompts = _read_prompts(prompts_file)
    llama = Llama.build(ckpt_dir, tokenizer_path or _find_tokenizer(ckpt_dir), max_seq_len=2048,
                        max_batch_size=batch_size, seed=seed, device=device, dtype=dtype)
    n = self_distill(llama, prompts, out, samples_per_prompt=samples_per_prompt, max_gen_len=max_gen_len,
                     temperature=temperature, top_p=top_p, batch_size=batch_size,
                     chat_template=ckpt_dir / "chat_template.jinja" if chat else None)
    print(f"wrote {out}: {len(prompts) * samples_per_prompt} samples, {n} generated tokens")


def eval_loss(
    ckpt_dir: Path | None = None,
    data: list[Path] | None = None,
    tokenizer_path: Path | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    max_windows: int | None = None,
    glob: str = "*.py",
    text_field: str = "text",
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Per-head loss, perplexity and top-1/top-5 accuracy of a checkpoint on a corpus."""
    from multitoken.checkpoint import default_ckpt_dir, load_model
    from multitoken.eval.loss import corpus_windows, format_metrics, head_metrics
    from multitoken.generation import default_device_and_dtype
    from multitoken.tokenizer import load_tokenizer
    from multitoken.train.data import held_out_corpus

    ckpt_dir = ckpt_dir or default_ckpt_dir()
    tokenizer = load_tokenizer(tokenizer_path or _find_tokenizer(ckpt_dir))
    dev, dt = default_device_and_dtype(device, dtype)
    model = load_model(ckpt_dir, device=dev, dtype=dt, max_seq_len=seq_len, max_batch_size=batch_size)
    model.free_caches()  # whole windows at once: the cache-free causal forward
    windows = corpus_windows(data or held_out_corpus(), tokenizer, seq_len + model.n_future_tokens, glob=glob,
                             text_field=text_field, max_windows=max_windows)
    print(format_metrics(head_metrics(model, windows, batch_size)))


def bench(
    ckpt_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    batch_sizes: tuple[int, ...] = (1, 4, 16),
    temperatures: tuple[float, ...] = (0.0, 0.8),
    prompt_len: int = 64,
    new_tokens: int = 128,
    repeats: int = 3,
    draft_heads: int | str | None = None,
    tree: int | list[list[int]] | None = None,
    png: Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    compile: bool = False,
) -> None:
    """Speed report: plain vs self-speculative decoding, the chain and with --tree tree drafting too (tokens/s,
    speedup, tau, acceptance by draft position), table and chart."""
    from multitoken.checkpoint import default_ckpt_dir
    from multitoken.eval.bench import cache_room, code_prompts, format_report, plot_report, speed_report
    from multitoken.generation import Llama

    png = png or (ckpt_dir / "speed.png" if ckpt_dir else Path("speed.png"))  # not into the installed package
    ckpt_dir = ckpt_dir or default_ckpt_dir()
    _say_if_building_kernels(ckpt_dir, device, dtype, tree)
    llama = Llama.build(ckpt_dir, tokenizer_path or _find_tokenizer(ckpt_dir),
                        max_seq_len=prompt_len + new_tokens + cache_room(tree),
                        max_batch_size=max(batch_sizes), device=device, dtype=dtype, compile=compile)
    prompts = code_prompts(llama.tokenizer, max(batch_sizes), prompt_len)
    rows = speed_report(llama, prompts, batch_sizes, temperatures, new_tokens=new_tokens, repeats=repeats,
                        draft_heads=draft_heads, tree=tree)
    print(format_report(rows))
    print(f"wrote {plot_report(rows, png)}")


def serve(
    ckpt_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_len: int = 2048,
    max_queue: int = 256,
    speculative: bool | None = None,
    draft_heads: int | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    shutdown_timeout: float = 30.0,
    device: str | None = None,
    dtype: str = "auto",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/models, /health, /metrics)."""
    import os

    from multitoken.checkpoint import default_ckpt_dir

    try:
        from multitoken.serve import server
    except ImportError as e:  # the optional serving dependencies
        raise SystemExit(f"error: {e}: install them with pip install 'multitoken[serve]'") from None
    ckpt_dir = ckpt_dir or default_ckpt_dir()
    _say_if_building_kernels(ckpt_dir, device, dtype)
    server.serve(ckpt_dir, tokenizer_path or _find_tokenizer(ckpt_dir), host=host, port=port,
                 max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_queue=max_queue, speculative=speculative,
                 draft_heads=draft_heads, api_key=api_key or os.environ.get("MULTITOKEN_API_KEY"),
                 model_name=model_name, shutdown_timeout=shutdown_timeout, device=device, dtype=dtype)


def _draft_heads_arg(text: str) -> int | str:
    """--draft-heads: a count, or "auto" (chosen each step)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of heads such as 2, or auto, got {text!r}") from None


def _tree_arg(text: str) -> int | list[list[int]]:
    """--tree: a node budget (dynamic tree) or a JSON list of rank paths (static tree)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(p, list) for p in value):
        return value
    raise argparse.ArgumentTypeError(f"expected a node budget such as 32 or rank paths such as '[[0],[1],[0,0]]', "
                                     f"got {text!r}")


def _read_prompts(path: Path) -> list[str]:
    """One prompt per line; a literal \\n inside a line stands for a newline, so code prompts fit."""
    if not path.is_file():
        raise SystemExit(f"error: prompts file not found: {path}")
    return [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]


def _find_tokenizer(ckpt_dir: Path) -> Path:
    for folder in (ckpt_dir, ckpt_dir.parent):
        for name in ("tokenizer.model", "tokenizer.json"):  # SentencePiece, or converted from HF/GGUF
            if (folder / name).is_file():
                return folder / name
    raise SystemExit(
        f"error: no tokenizer.model or tokenizer.json in {ckpt_dir} or its parent: pass --tokenizer-path FILE"
    )


def _say_if_building_kernels(ckpt_dir: Path, device: str | None, dtype: str | None,
                             tree: int | list[list[int]] | None = None) -> None:
    """On a CPU the kernels are built the first time (~10 s) for bf16 weights with --dtype auto, and for
    tree drafting (its bookkeeping runs in them whatever the dtype): say so before the pause."""
    from multitoken import kernels
    from multitoken.checkpoint import stored_dtype
    from multitoken.generation import default_device_and_dtype

    on_cpu = default_device_and_dtype(device, None)[0].type == "cpu"
    if on_cpu and kernels.supported() and not kernels.built() and (
            tree is not None or dtype == "auto" and stored_dtype(ckpt_dir) == torch.bfloat16):
        print("[building multitoken's bf16 CPU kernels: once, ~10 s]", file=sys.stderr, flush=True)


AUTO_DTYPE_HELP = ("float32, bfloat16, float16 or auto: bfloat16 on cuda; on cpu, bfloat16 for bfloat16 weights where "
                   "the CPU has AVX-512 BF16 (about twice float32's speed), else float32")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitoken", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help=generate.__doc__, description=generate.__doc__)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text to complete")
    p.add_argument("--ckpt-dir", type=Path, help="checkpoint folder (params.json + *.pth; default: the shipped model)")
    p.add_argument("--tokenizer-path", type=Path, help="tokenizer.model (default: in the checkpoint folder or its parent)")
    p.add_argument("--prompts-file", type=Path, help="file with one prompt per line (\\n stands for a newline)")
    p.add_argument("--max-gen-len", type=int, default=256, help="most tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=1, help="random seed for sampling")
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV cache length: prompt + generation")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help=AUTO_DTYPE_HELP)
    p.add_argument("--compile", action="store_true",
                   help="decode with torch.compile'd fixed-shape steps: faster after a first call that compiles (minutes on a CPU)")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="self-speculative decoding: the extra heads draft, the next-token head verifies; same "
                        "output in fewer forwards (default: on for models with extra heads)")
    p.add_argument("--draft-heads", type=_draft_heads_arg, metavar="K|auto",
                   help="drafts verified per step, 1 .. n_future_tokens-1 (default: all), or auto: each step as many "
                        "as are expected to decode fastest, from running acceptance rates and measured step times")
    p.add_argument("--tree", type=_tree_arg, metavar="N|PATHS",
                   help="tree drafting: verify a tree of candidates per step, a node budget N (dynamic: the most "
                        "probable paths under the heads) or rank paths as JSON, e.g. '[[0],[1],[0,0]]' (static); "
                        "more tokens per forward than the chain, but on a CPU with the shipped model the chain "
                        "decodes faster (docs/benchmarks.md; `multitoken bench --tree N` measures both)")
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
    p.add_argument("--input", dest="inputs", type=Path, nargs="+",
                   help="text files or folders of *.py (default: the standard library, held-out modules excluded)")
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.set_defaults(func=tokenizer_train)

    p = sub.add_parser("train", help=train.__doc__, description=train.__doc__)
    p.add_argument("--out", type=Path, required=True, help="run folder: metrics.jsonl and step-NNNNNN checkpoints")
    p.add_argument("--tokenizer-path", type=Path, help="SentencePiece .model or 'byte' (default with --from: the checkpoint's)")
    p.add_argument("--data", type=Path, nargs="+", help="files, folders (searched recursively) or .jsonl files "
                   "(default: this Python's standard library sources)")
    p.add_argument("--glob", default="*.py", help="file pattern inside --data folders")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl lines")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of --data documents held out for validation (without --val-data)")
    p.add_argument("--val-data", type=Path, nargs="+", help="validation files or folders, kept apart from --data "
                   "(default without --data: the held-out standard library modules)")
    p.add_argument("--cache-dir", type=Path, help="where tokenised data is cached (default: ~/.cache/multitoken/tokens)")
    p.add_argument("--config", type=Path, help="params.json giving the model shape (flags override it)")
    p.add_argument("--dim", type=int, help="model width (default 256 without --config)")
    p.add_argument("--n-layers", type=int, help="blocks, prediction heads included (default 8)")
    p.add_argument("--n-heads", type=int, help="attention heads (default 8)")
    p.add_argument("--n-kv-heads", type=int, help="key/value heads (default: n-heads)")
    p.add_argument("--n-future-tokens", type=int, help="prediction heads (default 2)")
    p.add_argument("--multiple-of", type=int, help="round the feed-forward width up to this (default 256)")
    p.add_argument("--from", dest="init_from", type=Path, help="start from this checkpoint folder")
    p.add_argument("--add-heads", type=int, default=0, help="with --from: add K heads, copies of the next-token head")
    p.add_argument("--freeze-trunk", action="store_true", help="with --from: train the extra heads only (the model's own output stays exactly as it was)")
    p.add_argument("--soft-targets", type=float, default=0.0, metavar="SHARE",
                   help="extra heads learn the next-token head's distribution over the token they predict, with this "
                        "share (0-1; the rest: the text's token): self-distillation of whole distributions, so that "
                        "drafts suit sampling too; usually with --freeze-trunk (default 0: the text's tokens only)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (a resumed run counts on)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (cosine decay to 0.03x)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of the weight matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--head-weights", type=float, nargs="+", help="loss weight per head (default: all 1)")
    p.add_argument("--loss-chunk", type=int, help="positions per cross-entropy chunk: caps float32 logits memory")
    p.add_argument("--all-logits", action="store_true", help="plain backward with every head's logits alive (for comparison)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (float32 weights and optimizer)")
    p.add_argument("--compile", action="store_true", help="torch.compile every block")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (at least 2)")
    p.add_argument("--eval-every", type=int, default=100, help="validation every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=train)

    p = sub.add_parser("distill", help=distill.__doc__, description=distill.__doc__)
    p.add_argument("--ckpt-dir", type=Path, required=True, help="the model whose own text to generate")
    p.add_argument("--prompts-file", type=Path, required=True, help="one prompt per line (\\n stands for a newline)")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write, one {\"text\": ...} per sample")
    p.add_argument("--tokenizer-path", type=Path, help="default: in the checkpoint folder or its parent")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="completions sampled per prompt")
    p.add_argument("--max-gen-len", type=int, default=256, help="most tokens per completion")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the model's chat template (CKPT/chat_template.jinja), for instruct models")
    p.add_argument("--seed", type=int, default=1, help="random seed for sampling")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16")
    p.set_defaults(func=distill)

    p = sub.add_parser("plot", help=plot.__doc__, description=plot.__doc__)
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN", help="training runs' --out folders")
    p.add_argument("--out", type=Path, help="PNG to write (default with one run: RUN/curves.png)")
    p.set_defaults(func=plot)

    p = sub.add_parser("bench", help=bench.__doc__, description=bench.__doc__)
    p.add_argument("--ckpt-dir", type=Path, help="checkpoint folder with extra heads (default: the shipped model)")
    p.add_argument("--tokenizer-path", type=Path, help="default: in the checkpoint folder or its parent")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], help="batch sizes to measure")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8], help="0 is greedy")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (openings of the held-out stdlib modules)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median), after one warm-up round")
    p.add_argument("--draft-heads", type=_draft_heads_arg, metavar="K|auto",
                   help="drafts verified per step by the chain (default: all), or auto (chosen each step)")
    p.add_argument("--tree", type=_tree_arg, metavar="N|PATHS",
                   help="also measure tree drafting: a node budget N (dynamic tree) or rank paths as JSON (static)")
    p.add_argument("--png", type=Path, help="chart to write (default: CKPT/speed.png, or ./speed.png for the shipped model)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help=AUTO_DTYPE_HELP)
    p.add_argument("--compile", action="store_true", help="decode with torch.compile'd fixed-shape steps (the warm-up compiles)")
    p.set_defaults(func=bench)

    p = sub.add_parser("eval", help="evaluation benchmarks")
    # dest=SUPPRESS: the group's name never reaches the subcommand function's arguments.
    esub = p.add_subparsers(dest=argparse.SUPPRESS, metavar="{humaneval,loss}", required=True)
    p = esub.add_parser("humaneval", help=eval_humaneval.__doc__, description=eval_humaneval.__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt-dir", type=Path, help="checkpoint folder: generate the completions with this model")
    src.add_argument("--samples", type=Path, help="JSONL of {task_id, completion} produced elsewhere: evaluate it")
    p.add_argument("--out", type=Path, required=True,
                   help="results JSONL (appended; a rerun skips the samples it already holds)")
    p.add_argument("--tokenizer-path", type=Path, help="tokenizer.model (default: in the checkpoint folder or its parent)")
    p.add_argument("--n-samples", type=int, default=1, help="completions per problem (pass@k needs n >= k)")
    p.add_argument("--temperature", type=float, default=0.2, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--speculative", action="store_true", help="generate with self-speculative decoding")
    p.add_argument("--limit", type=int, help="evaluate only the first M problems")
    p.add_argument("--max-gen-len", type=int, default=512, help="most tokens to generate per completion")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds each program may run")
    p.add_argument("--workers", type=int, help="programs run in parallel (default: number of CPUs)")
    p.add_argument("--seed", type=int, default=1, help="random seed for sampling")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    p.set_defaults(func=eval_humaneval)
    p = esub.add_parser("loss", help=eval_loss.__doc__, description=eval_loss.__doc__)
    p.add_argument("--ckpt-dir", type=Path, help="checkpoint folder (default: the shipped model)")
    p.add_argument("--data", type=Path, nargs="+",
                   help="files, folders (recursive) or .jsonl files (default: the held-out standard library modules)")
    p.add_argument("--tokenizer-path", type=Path, help="default: in the checkpoint folder or its parent")
    p.add_argument("--seq-len", type=int, default=512, help="positions scored per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--max-windows", type=int, help="score only the first N windows")
    p.add_argument("--glob", default="*.py", help="file pattern inside --data folders")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl lines")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16")
    p.set_defaults(func=eval_loss)

    p = sub.add_parser("convert", help=convert.__doc__, description=convert.__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", type=Path, metavar="DIR",
                     help="Hugging Face Llama folder (config.json + *.safetensors) to convert to our format")
    src.add_argument("--from-gguf", type=Path, metavar="FILE", help="GGUF Llama model to convert to our format")
    src.add_argument("--to-hf", type=Path, metavar="CKPT",
                     help="our checkpoint folder to write as a LlamaForCausalLM folder (extra heads beside it)")
    src.add_argument("--from-meta", type=Path, metavar="CKPT",
                     help="our checkpoint folder to write again: shards merged into one file, --dtype applied")
    p.add_argument("--dtype", help="with --from-meta: float32, bfloat16 or float16 weights (default: as stored)")
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.set_defaults(func=convert)

    p = sub.add_parser("serve", help=serve.__doc__, description=serve.__doc__)
    p.add_argument("--ckpt-dir", type=Path, help="checkpoint folder (default: the model shipped with the package)")
    p.add_argument("--tokenizer-path", type=Path, help="default: in the checkpoint folder or its parent")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch-size", type=int, default=8, help="completions decoded together (KV cache rows)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context: prompt + max_tokens, per completion")
    p.add_argument("--max-queue", type=int, default=256, help="completions that may wait for a row; more get 429")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="self-speculative decoding (default: on when the model has extra heads)")
    p.add_argument("--draft-heads", type=int, help="extra heads that draft, 1 .. n_future_tokens-1 (default: all)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MULTITOKEN_API_KEY, else none)")
    p.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: folder name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before cancelling them")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help=AUTO_DTYPE_HELP)
    p.set_defaults(func=serve)
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
