"""The GPU check, in one call: greedy exactness of self-speculation (chain, "auto" draft count and tree)
on a small model, then decode speed of the released 7B n=4 layout (28 trunk blocks + 4 head blocks,
dim 4096, bf16) plain, self-speculative and with a 64-node draft tree at batch 1 and 8, and of a
Llama-2-7B-shaped n=1 model at batch 8. One table last.

    python benchmarks/bench_gpu.py [--new-tokens 128] [--repeats 3] [--skip-7b] [--compile reduce-overhead] [--eager-check]
        [--tree 64] [--batches 1 8] [--no-eager] [--no-llama2] [--matvec] [--rowwise] [--unfused]
        [--profile] [--inductor KEY=VALUE ...] [--verify-tokens 1 4 8 16 32 64]
        [--attention sdpa|flex|efficient|math ...]
        [--tiny --device cpu]

--tiny swaps the 7B shapes for small ones, so the script itself can be tried on a CPU (the tests do).

--compile MODE decodes with compiled fixed-shape steps (`Llama.compile(mode=MODE)`; "reduce-overhead"
replays them as CUDA graphs), and checks their greedy exactness too.

Weights are random (no checkpoint can travel to the device machine), so drafts are almost never
accepted: the speculative rows measure the cost of one self-speculative step (k + 1 tokens through
the trunk and the next-token head, the extra heads at the accepted position) relative to a plain
step, which is what the issue's targets bound (<= 1.15x); tokens/s at a given tau follow from it.
Likewise the tree rows measure one tree step (a dynamic tree of --tree draft nodes verified in one
forward, the accepted path compacted, the next tree drafted) relative to a plain step, eager and
compiled (`tree.greedy_tree_step`).
The weight-streaming ceiling uses the GPU's measured copy bandwidth, taken in the same run.

Compiled rows also give the time of the plain step function alone, replayed back to back ("graph
step"): what the decoding loop adds to it is the host's share. --matvec times single-row bf16
products of the 7B shapes (cuBLAS against compiled fused reductions); --rowwise adds compiled batch-1
rows with those reductions (`Llama.compile(rowwise=True)`, coordinate-descent tuned). Compiled steps
compute each block's q/k/v and w1/w3 products as one (`fuse_projections`); --unfused adds a batch-1
row without, first. --profile prints the kernels of the compiled plain and self-speculative steps by
device time. --attention picks how the compiled steps attend, a row each: "sdpa" (SDPA's own choice of
kernel: cuDNN's on an H100/H200), "flex" (FlexAttention, `DecodeSteps(flex=True)`), "efficient" or
"math" (SDPA held to that backend, `torch.nn.attention.sdpa_kernel`); with more than one it also
times one block's attention alone each way and checks compiled exactness each way.
--verify-tokens times the compiled (or eager) 7B n=4 step feeding M tokens per row at batch 1 for each M,
against one token (`eval.bench.verify_costs`): the verify cost of a chain or of a tree of M - 1 nodes,
and what a tree must gain in tokens per forward over the chain to pay for it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import statistics
import time
import traceback

import torch
import torch._inductor.config as inductor_config

from multitoken.eval.bench import IgnoreEOS, copy_bandwidth, format_verify_costs, verify_costs
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


class FixedEOS:
    """A tokenizer stand-in whose EOS is a given token id."""

    def __init__(self, eos_id: int):
        self.eos_id = eos_id


def attending(attention: str):
    """The context the compiled steps of `attention` (an --attention choice) are compiled and run in."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}.get(attention)
    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])


def check_exactness(compile_mode: str | None, device: str, attentions: tuple[str, ...] = ("sdpa",)) -> bool:
    """Greedy self-speculative == plain greedy on a small float32 model: eagerly at batch 1 and 4 for
    every k, "auto" and a 16-node tree, and with an EOS that stops rows early; given a mode, compiled
    at batch 4 (ragged prompts) too, once for each way of attending (`attentions`: --attention's)."""
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
    # An EOS that some rows produce: each row stops there (the GPU loop reads "all done" a step late).
    eos = plain[0][len(plain[0]) // 2]
    cut = [row[: row.index(eos)] if eos in row else row for row in plain]
    stopping = Llama(model, FixedEOS(eos))
    ok &= stopping.generate(prompts, 40, temperature=0)[0] == cut
    ok &= stopping.generate(prompts, 40, temperature=0, speculative=True)[0] == cut
    for attention in attentions if compile_mode is not None else ():
        # Batch 4 alone: each compiled shape costs a compilation, and the ragged batch is the harder case.
        with attending(attention):
            compiled = Llama(model, IgnoreEOS()).compile(mode=compile_mode, flex=attention == "flex")
            ok &= compiled.generate(prompts, 40, temperature=0)[0] == plain
            ok &= compiled.generate(prompts, 40, temperature=0, speculative=True)[0] == plain
            ok &= compiled.generate(prompts, 40, temperature=0, speculative=True, draft_heads="auto")[0] == plain
            ok &= compiled.generate(prompts, 40, temperature=0, tree=16)[0] == plain
            compiled.tokenizer = FixedEOS(eos)
            ok &= compiled.generate(prompts, 40, temperature=0)[0] == cut
    return ok


def time_decode(llama: Llama, batch: int, prompt_len: int, new_tokens: int, repeats: int, **mode
                ) -> tuple[float, float]:
    """(tokens/s summed over the batch, seconds per forward step), median over repeats; `mode` is
    generate's speculative=True or tree=N, or nothing for plain decoding."""
    prompts = torch.randint(0, llama.model.args.vocab_size, (batch, prompt_len)).tolist()
    run = lambda: llama.generate(prompts, new_tokens, temperature=0, **mode)  # noqa: E731
    run()  # warm-up
    times = [_sync_time(run) for _ in range(repeats)]
    seconds = statistics.median(times)
    steps = llama.last_stats.forwards / batch if mode else new_tokens
    return batch * new_tokens / seconds, seconds / steps


@torch.inference_mode()  # as generate runs: another grad mode would compile the step again
def time_graph_step(llama: Llama, batch: int, at: int, drafts: int = 0, steps: int = 64) -> float:
    """Seconds per step of `llama`'s (compiled, warmed-up) step function called back to back with no
    decoding loop around it: the plain step, or with `drafts` the fused greedy self-speculative one."""
    device = llama.model.tok_embeddings.weight.device
    tokens = torch.zeros(batch, 1 + drafts, dtype=torch.long, device=device)  # contiguous, as generate's
    start = torch.full((batch,), at, device=device)
    step = (lambda: llama.steps.greedy(tokens, start, drafts)) if drafts else (  # noqa: E731
        lambda: llama.steps.step(tokens, start))
    step()
    return _sync_time(lambda: [step() for _ in range(steps)]) / steps


@torch.inference_mode()
def profile_steps(llama: Llama, batch: int, at: int, drafts: int, rows: int = 15) -> str:
    """The kernels of `llama`'s compiled plain step and fused greedy self-speculative step (with
    `drafts` drafts), 10 calls each, as the profiler's table sorted by device time: where a step's
    time goes beyond streaming its weights."""
    from torch.profiler import ProfilerActivity, profile

    device = llama.model.tok_embeddings.weight.device
    cuda = device.type == "cuda"
    tables = []
    for name, k in (("plain step", 0), (f"greedy self-speculative step, {drafts} drafts", drafts)):
        tokens = torch.zeros(batch, 1 + k, dtype=torch.long, device=device)
        start = torch.full((batch,), at, device=device)
        step = (lambda: llama.steps.greedy(tokens, start, k)) if k else (lambda: llama.steps.step(tokens, start))  # noqa: E731
        step(), _sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(10):
                step()
            _sync()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        tables.append(f"{name} x 10:\n" + prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60))
    return "\n".join(tables)


def _time_calls(calls: list, device: str) -> float:
    """Seconds per call of `calls` run in sequence; on a GPU captured as one CUDA graph, so launching
    them costs nothing and the kernels alone are timed."""
    for call in calls:
        call()
    if not device.startswith("cuda"):
        return _sync_time(lambda: [call() for call in calls]) / len(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return statistics.median(_sync_time(graph.replay) for _ in range(5)) / len(calls)


def time_matvec(device: str, tiny: bool) -> list[tuple[str, float, float, float]]:
    """(shape, cuBLAS GB/s, compiled reduction GB/s, the same coordinate-descent tuned) for one-row
    bf16 products of the 7B shapes, several weight copies in rotation so none sits in the cache."""
    from multitoken.steps import RowwiseLinear

    shapes = [(128, 128), (128, 512)] if tiny else [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 32000)]
    rows = []
    for d_in, d_out in shapes:
        copies = max(2, (512 << 20) // (2 * d_in * d_out))
        linears = [RowwiseLinear(d_in, d_out, bias=False, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, d_in, device=device, dtype=torch.bfloat16)
        rates = []
        for variant in ("cublas", "reduction", "tuned"):
            inductor_config.coordinate_descent_tuning = variant == "tuned"
            torch._dynamo.reset()
            if variant == "cublas":
                fn = lambda lin: torch.nn.functional.linear(x, lin.weight)  # noqa: E731
            else:
                fn = torch.compile(lambda lin: lin(x), dynamic=False)
            with torch.inference_mode():
                calls = [lambda lin=linears[i % copies]: fn(lin) for i in range(8 * copies)]
                seconds = _time_calls(calls, device)
            rates.append(2 * d_in * d_out / seconds / 1e9)
        inductor_config.coordinate_descent_tuning = False
        rows.append((f"{d_in}x{d_out}", *rates))
    return rows


def time_attention(device: str, tiny: bool, keys: int, attentions: list[str]) -> list[tuple[int, list[float], list[float]]]:
    """(queries per row, us and max abs error against float64 for each of `attentions`) for one block's
    attention at batch 1 over a `keys`-slot cache with a causal mask (the span the 7B rows' steps
    attend), compiled, caches in rotation so none sits in the L2 cache."""
    from multitoken.model import scaled_dot_product
    from multitoken.steps import masked_flex_attention

    heads, head_dim, copies = (4, 32, 2) if tiny else (32, 128, 16)
    dtype = torch.float32 if tiny else torch.bfloat16
    caches = [(torch.randn(1, heads, keys, head_dim, device=device, dtype=dtype),
               torch.randn(1, heads, keys, head_dim, device=device, dtype=dtype)) for _ in range(copies)]
    rows = []
    for n_q in (1, 4, 8, 65):
        q = torch.randn(1, heads, n_q, head_dim, device=device, dtype=dtype)
        # The last key each query sees: the queries are the newest tokens of a cache three quarters full.
        seen = max(n_q, keys * 3 // 4) - n_q + torch.arange(n_q, device=device)
        mask = (torch.arange(keys, device=device) <= seen[:, None])[None, None]
        k0, v0 = caches[0]
        ref = scaled_dot_product(q.double(), k0.double(), v0.double(), mask)
        times, errors = [], []
        for attention in attentions:
            fn = masked_flex_attention if attention == "flex" else scaled_dot_product
            with attending(attention), torch.inference_mode():
                compiled = torch.compile(fn, dynamic=False)
                errors.append((compiled(q, k0, v0, mask).double() - ref).abs().max().item())
                calls = [lambda c=caches[i % copies]: compiled(q, *c, mask) for i in range(4 * copies)]
                times.append(1e6 * _time_calls(calls, device))
        rows.append((n_q, times, errors))
    return rows


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
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes of the 7B n=4 rows")
    p.add_argument("--no-eager", action="store_true", help="compiled rows only (no eager rows)")
    p.add_argument("--no-llama2", action="store_true", help="no Llama-2-7B-shaped n=1 rows")
    p.add_argument("--matvec", action="store_true", help="time single-row bf16 products: cuBLAS vs fused reductions")
    p.add_argument("--rowwise", action="store_true",
                   help="with --compile: also batch-1 rows with single-row products as tuned fused reductions")
    p.add_argument("--unfused", action="store_true",
                   help="with --compile: first a batch-1 row with separate q/k/v and w1/w3 products (fuse=False)")
    p.add_argument("--profile", action="store_true",
                   help="with --compile: print the kernels of the compiled plain and self-speculative steps by device time")
    p.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                   help="torch._inductor.config settings for the compiled rows, e.g. coordinate_descent_tuning=True")
    p.add_argument("--verify-tokens", type=int, nargs="+", default=[], metavar="M",
                   help="also time the 7B n=4 step feeding M tokens per row at batch 1, for each M (1 and 4 added): "
                        "what a chain or a tree of M - 1 nodes costs to verify")
    p.add_argument("--attention", choices=["sdpa", "flex", "efficient", "math"], nargs="+", default=["sdpa"],
                   help="how compiled rows attend, a row each: SDPA's own choice (the default), FlexAttention "
                        "(`DecodeSteps(flex=True)`), SDPA held to its efficient or math backend; with more than one, "
                        "also one block's attention alone each way")
    p.add_argument("--eager-check", action="store_true", help="check exactness eagerly only, even with --compile")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes instead of 7B: to try the script on a CPU")
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    for setting in a.inductor:
        key, _, value = setting.partition("=")
        if not hasattr(inductor_config, key):
            raise SystemExit(f"error: torch._inductor.config has no setting {key!r}")
        setattr(inductor_config, key, ast.literal_eval(value))
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: this script is for the GPU machine (CPU: bench_decode.py, "
                         "or --tiny --device cpu to try this script)")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name() if cuda else a.device}, torch {torch.__version__}", flush=True)
    failed: list[str] = []
    check_mode = None if a.eager_check else a.compile
    exact = guarded("exactness check", lambda: check_exactness(check_mode, a.device, tuple(a.attention)), failed)
    print(f"greedy self-speculative == plain (batch 1 and 4; k = 1, 2, 3, auto; tree 16; EOS; compiled: "
          f"{check_mode}{'' if check_mode is None else ', ' + ' '.join(a.attention)}): {exact}", flush=True)
    bw = copy_bandwidth(a.device, (64 << 20) if a.tiny else (4 << 30))
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    if a.matvec:
        matvec = guarded("matvec", lambda: time_matvec(a.device, a.tiny), failed) or []
        print(f"{'one-row bf16 product':<22} {'cuBLAS GB/s':>11} {'reduction GB/s':>14} {'tuned GB/s':>10}")
        for shape, *rates in matvec:
            print(f"{shape:<22} " + " ".join(f"{r:>{w}.0f}" for r, w in zip(rates, (11, 14, 10))), flush=True)
    seq = a.prompt_len + a.new_tokens + max(8, a.tree + 1)  # the 7B rows' cache
    if len(a.attention) > 1:
        span = min(seq, 512)  # a compiled GPU step's least span (steps.MIN_SPAN), at most the cache
        timed = guarded("attention", lambda: time_attention(a.device, a.tiny, span, a.attention), failed) or []
        print(f"one block's attention, {span} keys: us (max abs error) for " + ", ".join(a.attention))
        for n_q, times, errors in timed:
            print(f"{n_q:>3} queries  " + "  ".join(f"{us:>7.1f} ({err:.1e})" for us, err in zip(times, errors)),
                  flush=True)
    rows = []
    nan = float("nan")
    verify_table = ""

    def row(*values) -> None:
        rows.append(values)
        name, batch, path, tps, graph_step, ratio, graph_ratio, tree_ratio, ceiling = values
        print(f"  {name} b{batch} {path}: {tps:.1f} tok/s plain ({1e3 * batch / tps:.2f} ms/step, graph step "
              f"{1e3 * graph_step:.2f} ms), spec step {ratio:.2f}x (graphs alone {graph_ratio:.2f}x), tree step "
              f"{tree_ratio:.2f}x (ceiling {ceiling:.0f} tok/s)", flush=True)

    def measure(name: str, model: Transformer, batch: int, compile_mode: str | None, rowwise: bool = False,
                speculative: bool = True, tree: int = 0, ceiling: float = nan, fuse: bool = True,
                attention: str = "sdpa") -> None:
        path = "eager" if compile_mode is None else (
            f"compiled{' rowwise' if rowwise else ''}{'' if fuse else ' unfused'}"
            f"{'' if attention == 'sdpa' else ' ' + attention} ({compile_mode})")
        what = f"{name} b{batch} {path}"
        llama = lambda: Llama(model, IgnoreEOS()) if compile_mode is None else (  # noqa: E731
            Llama(model, IgnoreEOS()).compile(mode=compile_mode, rowwise=rowwise or None, fuse=fuse,
                                              flex=attention == "flex"))
        timed = lambda **mode: time_decode(llama(), batch, a.prompt_len, a.new_tokens,  # noqa: E731
                                           a.repeats, **mode)
        plain_llama = guarded(f"{what} steps", llama, failed)
        if plain_llama is None:
            return
        plain = guarded(f"{what} plain", lambda: time_decode(plain_llama, batch, a.prompt_len, a.new_tokens,
                                                             a.repeats), failed)
        graph_step = (guarded(f"{what} graph step", lambda: time_graph_step(plain_llama, batch, a.prompt_len),
                              failed) if compile_mode is not None and plain else None)
        spec_llama = llama()
        spec = guarded(f"{what} speculative", lambda: time_decode(spec_llama, batch, a.prompt_len, a.new_tokens,
                                                                  a.repeats, speculative=True),
                       failed) if speculative else None
        graph_spec = (guarded(f"{what} graph spec step", lambda: time_graph_step(
            spec_llama, batch, a.prompt_len, drafts=model.n_future_tokens - 1), failed)
            if compile_mode is not None and spec else None)
        if a.profile and compile_mode is not None and plain and spec:
            print(guarded(f"{what} profile", lambda: profile_steps(spec_llama, batch, a.prompt_len,
                                                                   model.n_future_tokens - 1), failed), flush=True)
        tree_t = guarded(f"{what} tree {tree}", lambda: timed(tree=tree), failed) if tree else None
        if plain is not None:
            row(name, batch, path, plain[0], graph_step or nan, spec[1] / plain[1] if spec else nan,
                (graph_spec / graph_step) if graph_spec and graph_step else nan,
                tree_t[1] / plain[1] if tree_t else nan, ceiling)

    if not a.skip_7b:
        dim, layers, vocab = (128, 8, 512) if a.tiny else (4096, 32, 32000)
        shape = dict(dim=dim, n_layers=layers, n_heads=dim // 128, vocab_size=vocab, multiple_of=256, max_seq_len=seq)
        dtype = torch.float32 if a.tiny else torch.bfloat16
        model = random_model(ModelArgs(**shape, n_future_tokens=4), 8, seq, dtype, a.device)
        head = 2 * ((layers - 3) * sum(t.numel() for t in model.layers[0].parameters()) + 2 * vocab * dim)
        ceiling = bw / head  # bytes of the next-token path per token (embedding row ignored)
        # Eager first, then compiled, then compiled with fused reductions
        # (which swaps the model's linear layers for good): a failed compilation still leaves rows.
        if not a.no_eager:
            for batch in a.batches:
                measure("7B n=4", model, batch, None, tree=a.tree, ceiling=ceiling)
        if a.compile:
            if a.unfused:
                with attending(a.attention[0]):
                    measure("7B n=4", model, 1, a.compile, ceiling=ceiling, fuse=False, attention=a.attention[0])
            for batch in a.batches:
                for attention in a.attention:
                    with attending(attention):
                        measure("7B n=4", model, batch, a.compile, tree=a.tree, ceiling=ceiling, attention=attention)
            if a.rowwise:
                tuning = inductor_config.coordinate_descent_tuning
                inductor_config.coordinate_descent_tuning = True
                measure("7B n=4", model, 1, a.compile, rowwise=True, speculative=False, ceiling=ceiling)
                inductor_config.coordinate_descent_tuning = tuning
        if a.verify_tokens:
            steps = (Llama(model, IgnoreEOS()).compile(mode=a.compile, flex=a.attention[0] == "flex") if a.compile
                     else Llama(model, IgnoreEOS())).steps
            counts = sorted({1, model.n_future_tokens, *a.verify_tokens})
            with attending(a.attention[0]):
                verify = guarded("verify costs", lambda: verify_costs(steps, 1, a.prompt_len, counts), failed)
            if verify:
                verify_table = format_verify_costs(verify, model.n_future_tokens)
                print(verify_table, flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
        if not a.no_llama2:
            model = random_model(ModelArgs(**shape, n_future_tokens=1), 8, seq, dtype, a.device)
            for compile_mode in ([] if a.no_eager else [None]) + ([a.compile] if a.compile else []):
                measure("Llama-2-7B n=1", model, 8, compile_mode, speculative=False)
    print()
    print(f"{'model':<16} {'batch':>5} {'path':<34} {'plain tok/s':>11} {'graph step ms':>13} "
          f"{'spec step / plain':>17} {'(graphs alone)':>14} {f'tree {a.tree} step / plain':>20} "
          f"{'ceiling tok/s (b1)':>18}")
    for name, batch, path, tps, graph_step, ratio, graph_ratio, tree_ratio, ceiling in rows:
        print(f"{name:<16} {batch:>5} {path:<34} {tps:>11.1f} {1e3 * graph_step:>13.2f} {ratio:>17.2f} "
              f"{graph_ratio:>14.2f} {tree_ratio:>20.2f} {ceiling:>18.0f}")
    if verify_table:
        print(f"step by tokens per row, 7B n=4 batch 1, {'compiled (' + a.compile + ')' if a.compile else 'eager'}:")
        print(verify_table)
    print("targets: 7B n=4 b1 plain >= 185 tok/s, spec step <= 1.15x plain; Llama-2-7B b8 >= 1100 tok/s; "
          f"exactness {'ok' if exact else 'FAILED'}" + ("  (--tiny: shapes are not 7B)" if a.tiny else ""))
    if failed:
        print("failed: " + "; ".join(failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
