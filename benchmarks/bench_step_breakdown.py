"""Where a compiled decode step's time goes: every statement of inductor's generated wrapper, timed.

    python benchmarks/bench_step_breakdown.py --ckpt-dir CKPT [--step 1-token|verify|greedy|tree] [--tree 8]
        [--dtype bfloat16] [--batch 1] [--position 128] [--calls 200] [--top 25] [--threads 2]

Compiles one step of `DecodeSteps` (the 1-token plain step, the (k+1)-token verify step, the fused
greedy self-speculative step, or the fused greedy tree step of a --tree node budget), captures the
inputs of its compiled graph, and runs the graph's Python wrapper again with a clock read after each
statement: each kernel call, buffer allocation and view.
Prints the total by kind (the packed products, the attention kernel, inductor's own C++ kernels,
ATen fallbacks, and the wrapper's other Python statements) and the slowest statements, each the
median of --calls calls. The profiler cannot do this on a step of ~500 statements of a few
microseconds each: it adds ~25 us to every operator it records.

This reads inductor internals (`PyCodeCache`, `CompiledFxGraph.current_callable`) that are no stable
API; it says so and stops if they have changed.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.steps import DecodeSteps
from multitoken.tree import TreeDrafter, greedy_tree_step

KINDS = [("packed products", "multitoken.packed_linear"), ("attention kernel", "multitoken.few_query_attention"),
         ("inductor kernels", "cpp_fused"), ("ATen fallbacks", "torch.ops.aten."), ("ATen fallbacks", "extern_kernels.")]


def capture_graph(run) -> tuple[object, list]:
    """The compiled graph that `run()` calls, and its inputs."""
    from torch._inductor.output_code import CompiledFxGraph

    captured = {}
    original = CompiledFxGraph.__call__

    def spy(self, inputs):
        captured["graph"], captured["inputs"] = self, list(inputs)
        return original(self, inputs)

    CompiledFxGraph.__call__ = spy
    try:
        run()
    finally:
        CompiledFxGraph.__call__ = original
    if "graph" not in captured:
        raise SystemExit("error: no compiled graph ran (has torch.compile's inductor output changed?)")
    return captured["graph"], captured["inputs"]


def wrapper_module(graph) -> object:
    """The generated Python module whose `call` runs `graph`."""
    from torch._inductor.codecache import PyCodeCache

    def reachable(fn, depth=0):
        yield fn
        if depth < 4:
            for cell in getattr(fn, "__closure__", None) or []:
                try:
                    if callable(cell.cell_contents):
                        yield from reachable(cell.cell_contents, depth + 1)
                except ValueError:
                    pass
    ids = {id(f) for f in reachable(graph.current_callable)}
    for module in PyCodeCache.modules:
        if id(getattr(module, "call", None)) in ids:
            return module
    raise SystemExit("error: the compiled graph's wrapper module was not found (inductor internals changed?)")


def timed_call(module, clock: list):
    """The module's `call` with `clock.append((line, perf_counter()))` after each of its statements."""
    source = Path(module.__file__).read_text()
    tree = ast.parse(source)

    def instrument(body):
        out = []
        for statement in body:
            if isinstance(statement, ast.With):
                statement.body = instrument(statement.body)
                out.append(statement)
                continue
            out += [statement, ast.parse(f"_clock.append(({statement.lineno}, _now()))").body[0]]
        return out

    for node in ast.walk(tree):  # `call` may be a method (of inductor's Runner)
        if isinstance(node, ast.FunctionDef) and node.name == "call":
            node.body = [ast.parse("_clock.append((0, _now()))").body[0]] + instrument(node.body)
    namespace = dict(module.__dict__)
    exec(compile(ast.fix_missing_locations(tree), module.__file__, "exec"), namespace)
    # The module's top level set its constants (frozen weights) to placeholders again: take the loaded ones.
    namespace.update({k: v for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)})
    namespace["_clock"], namespace["_now"] = clock, time.perf_counter
    return namespace["call"], source.splitlines()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--step", choices=["1-token", "verify", "greedy", "tree"], default="greedy")
    p.add_argument("--tree", type=int, default=8, help="node budget of the tree step (--step tree)")
    p.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--position", type=int, default=128, help="cache position the step writes at")
    p.add_argument("--calls", type=int, default=200, help="timed calls; each statement's figure is their median")
    p.add_argument("--top", type=int, default=25, help="slowest statements to list")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.ckpt_dir, device="cpu", dtype=getattr(torch, a.dtype),
                       max_seq_len=a.position + 64 + (a.tree if a.step == "tree" else 0), max_batch_size=a.batch)
    steps = DecodeSteps(model.eval(), compile=True)
    k = model.n_future_tokens - 1
    if k < 1 and a.step != "1-token":
        raise SystemExit(f"error: {a.ckpt_dir} has no extra heads (n_future_tokens=1): only --step 1-token applies")
    start = torch.full((a.batch,), a.position)
    tokens = torch.zeros(a.batch, 1 if a.step == "1-token" else k + 1, dtype=torch.long)
    if a.step == "tree":
        drafter = TreeDrafter(a.tree, k, model.args.vocab_size)
        with torch.inference_mode():  # equal draft logits: ties, broken the same way every call
            t, _ = drafter(torch.zeros(a.batch, k, drafter.n_ranks), torch.zeros(a.batch, dtype=torch.long), 0.0, 1.0)
        tree_step, span = steps.compile_fn(greedy_tree_step), steps.span(a.position + a.tree + 1)

        def run():
            return tree_step(model, drafter, t.tokens, t.parent, t.depth, t.rank, start, span=span)
    else:
        span = steps.span(a.position + k + 1)

        def run():
            return steps.greedy(tokens, start, k, span=span) if a.step == "greedy" else steps.step(tokens, start, span=span)
    print(f"{a.ckpt_dir}: {a.step} step, {a.dtype}, batch {a.batch}, position {a.position}, threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}; compiling...", flush=True)
    with torch.inference_mode():
        run(), run()
        graph, inputs = capture_graph(run)
        clock: list = []
        call, lines = timed_call(wrapper_module(graph), clock)
        per_line: dict[int, list[float]] = {}
        for _ in range(a.calls):
            clock.clear()
            call(list(inputs))  # the wrapper empties its argument list
            for (_, before), (line, after) in zip(clock, clock[1:]):
                per_line.setdefault(line, []).append(after - before)
    median = {line: statistics.median(t) for line, t in per_line.items()}
    by_kind: dict[str, float] = {}
    for line, seconds in median.items():
        text = lines[line - 1]
        kind = next((name for name, marker in KINDS if marker in text), "other Python")
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    total = sum(median.values())
    print(f"{len(median)} statements, {1e3 * total:.3f} ms in all (sum of medians)")
    for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<18} {1e3 * seconds:8.3f} ms  {seconds / total:5.1%}")
    print(f"slowest {a.top} statements (us, line of the generated wrapper):")
    for line, seconds in sorted(median.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"  {1e6 * seconds:7.1f}  {lines[line - 1].strip()[:120]}")


if __name__ == "__main__":
    main()
