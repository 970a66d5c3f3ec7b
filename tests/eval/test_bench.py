from pathlib import Path

from multitoken.cli import main


def test_bench_reports_both_modes_with_identical_greedy_output_and_draws_a_chart(tiny_ckpt, tmp_path, capsys):
    png = tmp_path / "speed.png"
    main(["bench", "--ckpt-dir", str(tiny_ckpt), "--batch-sizes", "1", "2", "--temperatures", "0", "0.8",
          "--prompt-len", "16", "--new-tokens", "8", "--repeats", "1", "--png", str(png)])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().replace(".", "").isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("0.0", "1"), ("0.0", "2"), ("0.8", "1"), ("0.8", "2")]
    assert [r[-1] for r in rows] == ["yes", "yes", "n/a", "n/a"]
    assert len(rows[0]) == 6 + 2 + 1  # temp batch plain spec speedup tau, 2 acceptance rates, identical
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))


def test_bench_reports_chain_and_tree_side_by_side(tiny_ckpt, tmp_path, capsys):
    png = tmp_path / "speed.png"
    main(["bench", "--ckpt-dir", str(tiny_ckpt), "--batch-sizes", "1", "--temperatures", "0", "0.8",
          "--prompt-len", "16", "--new-tokens", "8", "--repeats", "1", "--tree", "6", "--png", str(png)])
    out = capsys.readouterr().out
    assert "tree tok/s" in out and "tree acceptance by depth" in out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().replace(".", "").isdigit()]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("0.0", "1", "yes"), ("0.8", "1", "n/a")]
    # temp batch plain chain speedup tau, 2 acceptance rates, tree speedup tau, 2 acceptance rates, identical
    assert len(rows[0]) == 6 + 2 + 3 + 2 + 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_costs_table_gives_each_count_against_one_token_and_the_chain():
    from multitoken.eval.bench import format_verify_costs

    lines = format_verify_costs({1: 1.0, 3: 1.5, 5: 2.0}, chain_tokens=3).splitlines()
    assert [line.split() for line in lines[1:]] == [
        ["1", "1.00", "1.00x", "-33%"],
        ["3", "1.50", "1.50x", "0.250", "+0%"],
        ["5", "2.00", "2.00x", "0.250", "+33%"],
    ]
