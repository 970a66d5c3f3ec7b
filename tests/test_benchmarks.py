import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_decode_runs_and_both_sides_generate_the_same_tokens(tiny_ckpt):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--ckpt-dir", str(tiny_ckpt),
           "--batch-sizes", "1", "2", "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(r[-1] == "100.0%" for r in rows), result.stdout


def test_bench_agreement_finds_float32_speculation_exact():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_agreement.py"), "--prompts", "2", "--prompt-len", "16",
           "--new-tokens", "12"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    f32 = [line for line in result.stdout.splitlines() if line.strip().startswith("float32")]
    assert len(f32) == 2 and all("100.0% of positions equal, 2/2 rows identical" in line for line in f32), result.stdout


def test_bench_gpu_runs_on_a_cpu_with_tiny_shapes_and_finds_every_mode_exact():
    """The GPU script is run whole on a CPU first, so a GPU session's minutes are not lost to a typo."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu", "--prompt-len", "8",
           "--new-tokens", "8", "--repeats", "1", "--tree", "8", "--verify-tokens", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tree 16; EOS; compiled: None): True" in result.stdout, result.stdout
    table = result.stdout.split("step by tokens per row, 7B n=4 batch 1, eager:")[1]
    assert [line.split()[0] for line in table.splitlines()[2:5]] == ["1", "2", "4"], result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("7B", "Llama"))]
    assert [(r[0], r[2]) for r in rows] == [("7B", "1"), ("7B", "8"), ("Llama-2-7B", "8")], result.stdout
    assert "exactness ok" in result.stdout


def test_bench_sampling_draws_the_reference_tokens():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_sampling.py"), "--vocab", "512", "4096", "--rows", "2",
           "--repeats", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    # Peaked, flat and bf16 logits at each vocabulary: reference tokens, and the reference's distribution
    # from both top-p paths (kernel and ATen).
    assert len(rows) == 6 and all(r[6] == "yes" and r[11] == "yes" for r in rows), result.stdout


@pytest.mark.slow
def test_bench_steps_times_two_ways_of_compiling_alike(tiny_ckpt):
    # --compare fuse only: --compare freeze runs the same code with other options, and autotuning
    # its frozen graphs would add minutes to the suite; --tree N too (its step is tests/test_tree's).
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_steps.py"), "--ckpt-dir", str(tiny_ckpt),
           "--compare", "fuse", "--rounds", "1", "--calls", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "fused and separate greedy steps give the same tokens, accepted counts and drafts: yes" in result.stdout, \
        result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("1-token", "3-token", "greedy"))]
    assert len(rows) == 3 and all(float(r.split()[-1]) > 0 for r in rows), result.stdout


@pytest.mark.slow
def test_bench_gpu_compiled_rows_run_on_a_cpu_with_tiny_shapes():
    """The compiled rows of the next GPU session's command (fused and separate projections, tree,
    profile), so that a slip in them costs a CPU test, not device minutes."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu", "--prompt-len", "8",
           "--new-tokens", "8", "--repeats", "1", "--tree", "8", "--compile", "--no-eager", "--eager-check",
           "--batches", "1", "--no-llama2", "--unfused", "--profile"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("7B")]
    assert [r[4] for r in rows] == ["unfused", "(reduce-overhead)"], result.stdout
    assert "greedy self-speculative step, 3 drafts x 10:" in result.stdout and "exactness ok" in result.stdout


@pytest.mark.slow
def test_bench_gpu_times_each_way_of_attending_on_a_cpu_with_tiny_shapes():
    """--attention with several ways (here SDPA held to its math backend, and SDPA's own choice: the
    ones a CPU runs): one block's attention alone each way, then a row each, as on the GPU."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu", "--prompt-len", "8",
           "--new-tokens", "8", "--repeats", "1", "--tree", "0", "--compile", "--no-eager", "--eager-check",
           "--batches", "1", "--no-llama2", "--attention", "math", "sdpa"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "one block's attention, 24 keys: us (max abs error) for math, sdpa" in result.stdout, result.stdout
    alone = [line.split() for line in result.stdout.splitlines() if line.endswith(")") and "queries" in line]
    assert [r[0] for r in alone] == ["1", "4", "8", "65"] and all(len(r) == 6 for r in alone), result.stdout
    assert all(float(r[3].strip("()")) < 1e-5 and float(r[5].strip("()")) < 1e-5 for r in alone), result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("7B")]
    assert [r[4] for r in rows] == ["math", "(reduce-overhead)"], result.stdout


def test_bench_verify_times_each_token_count_against_one_and_the_chain(tiny_ckpt):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_verify.py"), "--ckpt-dir", str(tiny_ckpt), "--eager",
           "--tokens", "5", "--rounds", "2", "--calls", "2", "--dtype", "float32"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    # 1 token and the chain's k + 1 = 3 (the tiny model has n_future_tokens = 3) are always timed.
    assert [r[0] for r in rows] == ["1", "3", "5"], result.stdout
    assert rows[0][2] == "1.00x" and rows[1][-1] == "+0%", result.stdout


def test_bench_verify_refuses_an_empty_step(tiny_ckpt):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_verify.py"), "--ckpt-dir", str(tiny_ckpt), "--tokens", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--tokens must be at least 1 per row, got 0" in result.stderr


def test_bench_kernels_times_the_kernels_beside_aten_and_a_baseline_build(tiny_ckpt):
    from multitoken import kernels

    if not kernels.available():
        pytest.skip("multitoken.kernels do not run on this host")
    # The current source as its own baseline: built under other operator names, the same outputs.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--ckpt-dir", str(tiny_ckpt),
           "--rows", "1", "3", "--queries", "1", "2", "--batch", "2", "--rounds", "1", "--baseline-source", str(kernels.SOURCE)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["1"], ["3"], ["2"])]
    assert len(rows) == 4 and all(float(r[1]) > 0 for r in rows), result.stdout
    assert "outputs differ" not in result.stdout, result.stdout


def test_bench_kernels_names_a_missing_baseline_source(tiny_ckpt, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--ckpt-dir", str(tiny_ckpt),
           "--baseline-source", str(tmp_path / "old.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "is not a file" in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("step", ["verify", "tree"])
def test_bench_step_breakdown_times_every_statement_of_the_compiled_step(tiny_ckpt, step):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_step_breakdown.py"), "--ckpt-dir", str(tiny_ckpt),
           "--dtype", "float32", "--step", step, "--tree", "4", "--calls", "5", "--top", "3", "--position", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    statements, total = out[1].split(" statements, ")
    assert int(statements) > 20, result.stdout
    kinds = {line.split("  ")[1].strip(): float(line.split()[-3]) for line in out[2:] if line.endswith("%")}
    # Every statement is counted in one kind; a float32 step's products are ATen's (no packed kernel).
    assert "packed products" not in kinds and "ATen fallbacks" in kinds and "other Python" in kinds, result.stdout
    assert abs(sum(kinds.values()) - float(total.split()[0])) < 0.01, result.stdout
    assert len([line for line in out if line.startswith("  ") and not line.endswith("%")]) == 3, result.stdout


def test_bench_speculative_finds_greedy_speculation_identical_at_every_batch_size(tiny_ckpt):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_speculative.py"), "--ckpt-dir", str(tiny_ckpt),
           "--batch-sizes", "1", "4", "--temperatures", "0", "--prompt-len", "8", "--new-tokens", "12",
           "--repeats", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:2] in (["0.0", "1"], ["0.0", "4"])]
    assert len(rows) == 2 and all(r[-1] == "yes" for r in rows), result.stdout


def test_bench_retire_times_rows_leaving_and_kept_beside_plain(tiny_ckpt):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_retire.py"), "--ckpt-dir", str(tiny_ckpt),
           "--batch-size", "4", "--prompt-len", "8", "--new-tokens", "12", "--repeats", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    modes = [line.rsplit(None, 2)[0] for line in result.stdout.splitlines()[-4:-1]]
    assert modes == ["plain", "rows leave", "rows kept"], result.stdout
    assert result.stdout.splitlines()[-1] == "greedy identical: yes"


def test_bench_tree_sets_each_tree_beside_the_chain_and_finds_greedy_identical(tiny_ckpt):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_tree.py"), "--ckpt-dir", str(tiny_ckpt), "--prompts", "2",
           "--trees", "2", "4", "--prompt-len", "8", "--new-tokens", "10"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()
            if line.startswith(("plain", "chain", "tree"))}
    assert list(rows) == ["plain", "chain", "tree 2", "tree 4"], result.stdout
    assert len(rows["chain"]) == 4 and len(rows["tree 4"]) == 7, result.stdout  # trees: tok/s and tau against the chain
    tau = {mode: float(row[-2] if mode.startswith("tree") else row[-1]) for mode, row in rows.items()}
    assert tau["plain"] == 1.0 and tau["tree 4"] >= 1.0
    assert rows["tree 4"][-1] == f"{tau['tree 4'] / tau['chain'] - 1:+.1%}", result.stdout
    assert "greedy identical: yes" in result.stdout
