import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multitoken.checkpoint import load_model, save_model
from multitoken import steps as steps_mod
from multitoken.cli import main
from multitoken.generation import Llama
from multitoken.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_init_writes_a_trainable_checkpoint(tmp_path, capsys):
    main(["init", "--dim", "64", "--n-layers", "4", "--n-heads", "4", "--n-kv-heads", "2", "--vocab-size", "100",
          "--n-future-tokens", "2", "--multiple-of", "32", "--out", str(tmp_path / "m")])
    assert "n_future_tokens=2" in capsys.readouterr().out
    model = load_model(tmp_path / "m")
    assert len(model.layers) == 3 and len(model.extra_heads) == 1
    wo, wq = model.layers[0].attention.wo.weight, model.layers[0].attention.wq.weight
    assert 0.015 < wq.std() < 0.025  # scaled normal, not nn.Linear's uniform default
    assert wo.std() < wq.std() / 2  # residual projections scaled by 1/sqrt(2 n_layers)


def test_init_rejects_bad_shapes(tmp_path):
    with pytest.raises(SystemExit, match="n_future_tokens=5"):
        main(["init", "--dim", "64", "--n-layers", "4", "--n-heads", "4", "--vocab-size", "100",
              "--n-future-tokens", "5", "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


def test_generate_streams_the_same_text_as_the_api(tiny_ckpt, capsys):
    main(["generate", "--ckpt-dir", str(tiny_ckpt), "--temperature", "0", "--max-gen-len", "12",
          "--max-seq-len", "64", "def main():"])
    out = capsys.readouterr().out
    llama = Llama.build(tiny_ckpt, tiny_ckpt / "tokenizer.model", max_seq_len=64, max_batch_size=1)
    expected = llama.text_completion(["def main():"], temperature=0, max_gen_len=12)[0]["generation"]
    assert out == "def main():" + expected + "\n"


def test_generate_says_when_it_builds_the_bf16_kernels(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from multitoken import kernels

    bf16 = tmp_path / "bf16"
    save_model(load_model(tiny_ckpt, dtype=torch.bfloat16), bf16)
    (bf16 / "tokenizer.model").write_bytes((tiny_ckpt / "tokenizer.model").read_bytes())
    # A host that can run the kernels and has not built them; the build itself is left out (float32).
    monkeypatch.setattr(kernels, "supported", lambda: True)
    monkeypatch.setattr(kernels, "built", lambda: False)
    monkeypatch.setattr(kernels, "available", lambda: False)
    argv = ["--temperature", "0", "--max-gen-len", "4", "--max-seq-len", "32", "--device", "cpu", "x"]
    main(["generate", "--ckpt-dir", str(bf16), *argv])
    assert "[building multitoken's bf16 CPU kernels" in capsys.readouterr().err
    for other in (["--ckpt-dir", str(bf16), "--dtype", "float32"], ["--ckpt-dir", str(tiny_ckpt)]):
        main(["generate", *other, *argv])  # not asked for bf16, or float32 weights: nothing to build
        assert "building" not in capsys.readouterr().err
    main(["generate", "--ckpt-dir", str(tiny_ckpt), "--tree", "4", *argv])  # a tree's bookkeeping runs in them
    assert "[building multitoken's bf16 CPU kernels" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_compiled_compiles_first_and_streams_the_same_text(tiny_ckpt, capsys, monkeypatch):
    argv = ["generate", "--ckpt-dir", str(tiny_ckpt), "--temperature", "0", "--max-gen-len", "12", "--max-seq-len",
            "64", "def main():"]
    main(argv)
    eager = capsys.readouterr()
    # Compiled first: the graph of every span short of the cache, and the whole cache's if the prompt, its
    # 12 tokens and 16 of room reach it.
    reach = len(load_tokenizer(tiny_ckpt / "tokenizer.model").encode("def main():", bos=True, eos=False)) + 12 + 16
    warmed = []
    spanning = steps_mod.DecodeSteps.spanning
    monkeypatch.setattr(steps_mod.DecodeSteps, "spanning", lambda self, span: warmed.append(span) or spanning(self, span))
    main([*argv, "--compile"])
    compiled = capsys.readouterr()
    assert compiled.out == eager.out
    assert "[compiled in" in compiled.err and compiled.err.index("[compiled in") < compiled.err.index("tokens/s")
    assert warmed == ([16] if reach <= 48 else [16, 64])


@pytest.mark.parametrize("tree", ["5", "[[0],[1],[0,0]]"])
def test_generate_with_a_tree_streams_the_plain_greedy_text(tiny_ckpt, capsys, tree):
    main(["generate", "--ckpt-dir", str(tiny_ckpt), "--temperature", "0", "--max-gen-len", "12",
          "--max-seq-len", "64", "--tree", tree, "def main():"])
    captured = capsys.readouterr()
    llama = Llama.build(tiny_ckpt, tiny_ckpt / "tokenizer.model", max_seq_len=64, max_batch_size=1)
    expected = llama.text_completion(["def main():"], temperature=0, max_gen_len=12)[0]["generation"]
    assert captured.out == "def main():" + expected + "\n"
    assert "tokens per forward" in captured.err


def test_tree_option_rejects_what_is_neither_a_budget_nor_paths(tiny_ckpt, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt-dir", str(tiny_ckpt), "--tree", "[1, 2]", "x"])
    assert "expected a node budget" in capsys.readouterr().err


def test_generate_errors_are_messages_not_tracebacks(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="no prompt given"):
        main(["generate", "--ckpt-dir", str(tiny_ckpt)])
    with pytest.raises(SystemExit, match="temperature must be >= 0"):
        main(["generate", "--ckpt-dir", str(tiny_ckpt), "--temperature", "-1", "x"])
    with pytest.raises(SystemExit, match="checkpoint folder not found"):
        main(["generate", "--ckpt-dir", str(tmp_path / "nope"), "--tokenizer-path", str(tiny_ckpt / "tokenizer.model"), "x"])


def test_tokenizer_train_command(tmp_path, capsys):
    from conftest import stdlib_sources
    from multitoken.tokenizer import load_tokenizer

    main(["tokenizer", "train", "--input", *map(str, stdlib_sources(100_000)), "--vocab-size", "600",
          "--out", str(tmp_path / "tok")])
    assert load_tokenizer(tmp_path / "tok.model").n_words == 600


def _quickstart_env():
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def test_quickstart_runs_with_plain_python(tiny_ckpt):
    cmd = [sys.executable, str(ROOT / "example_completion.py"), "--ckpt_dir", f"{tiny_ckpt}/",
           "--tokenizer_path", str(tiny_ckpt / "tokenizer.model"), "--max_seq_len", "128", "--max_batch_size", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_quickstart_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("==================================") == 2
    assert "def fibonacci(n):" in result.stdout


def test_quickstart_runs_under_torchrun_as_the_model_card_says(tiny_ckpt):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "1", str(ROOT / "example_completion.py"), "--ckpt_dir", f"{tiny_ckpt}/",
           "--tokenizer_path", str(tiny_ckpt / "tokenizer.model"), "--max_seq_len", "128", "--max_batch_size", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_quickstart_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("==================================") == 2


def test_generate_speculative_prints_the_same_text_and_its_statistics(tiny_ckpt, capsys):
    args = ["generate", "--ckpt-dir", str(tiny_ckpt), "--temperature", "0", "--max-gen-len", "12",
            "--max-seq-len", "64", "def main():"]
    main([*args, "--no-speculative"])
    captured = capsys.readouterr()
    plain = captured.out
    assert "tokens per forward" not in captured.err
    main(args)  # a model with extra heads decodes self-speculatively by default
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "tokens per forward" in captured.err and "acceptance by draft position [" in captured.err
    main([*args, "--speculative", "--draft-heads", "2"])
    assert capsys.readouterr().out == plain
    main([*args, "--speculative", "--draft-heads", "auto"])
    assert capsys.readouterr().out == plain
    with pytest.raises(SystemExit):
        main([*args, "--draft-heads", "most"])
    assert "expected a number of heads such as 2, or auto, got 'most'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="draft_heads must be between 1 and 2"):
        main([*args, "--speculative", "--draft-heads", "3"])


def test_speculative_on_a_model_without_heads_is_a_clear_error(tmp_path, sp_model_path):
    import shutil

    from conftest import random_model, tiny_args
    from multitoken.checkpoint import save_model

    save_model(random_model(tiny_args(vocab_size=512, n_future_tokens=1)), tmp_path / "n1")
    shutil.copy(sp_model_path, tmp_path / "n1" / "tokenizer.model")
    args = ["generate", "--ckpt-dir", str(tmp_path / "n1"), "--max-gen-len", "4", "--max-seq-len", "32", "x"]
    main(args)  # no heads: plain decoding by default
    with pytest.raises(SystemExit, match="--speculative needs extra prediction heads.*n_future_tokens=1"):
        main([*args, "--speculative"])


def test_convert_from_meta_casts_the_weights_and_carries_the_tokenizer(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "bf16"
    main(["convert", "--from-meta", str(tiny_ckpt), "--dtype", "bfloat16", "--out", str(out)])
    a, b = load_model(tiny_ckpt), load_model(out)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert y.dtype == torch.bfloat16 and torch.equal(x.to(torch.bfloat16), y), name
    assert (out / "tokenizer.model").read_bytes() == (tiny_ckpt / "tokenizer.model").read_bytes()
    with pytest.raises(SystemExit, match="--dtype applies to --from-meta"):
        main(["convert", "--from-hf", str(tmp_path), "--dtype", "bfloat16", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="is the checkpoint being read"):
        main(["convert", "--from-meta", str(out), "--out", str(out)])
