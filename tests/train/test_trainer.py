import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import random_model, stdlib_sources, tiny_args
from multitoken.checkpoint import load_model, save_model
from multitoken.cli import main
from multitoken.tokenizer import ByteTokenizer
from multitoken.train import trainer as trainer_mod
from multitoken.train.data import load_data
from multitoken.train.trainer import (NonFiniteError, Trainer, TrainConfig, add_heads, complete_checkpoints,
                                      load_train_state, lr_at, make_optimizer, read_metrics)

TINY = ["--dim", "32", "--n-layers", "3", "--n-heads", "2", "--multiple-of", "32", "--n-future-tokens", "2"]


def _train_argv(out: Path, cache: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["train", "--out", str(out), "--tokenizer-path", "byte", "--data", *map(str, stdlib_sources(60_000)),
            "--cache-dir", str(cache), *TINY, "--steps", str(steps), "--batch-size", "2", "--seq-len", "16",
            "--warmup", "2", "--lr", "3e-3", "--save-every", "2", "--eval-every", "3", "--eval-batches", "2",
            "--no-progress", *extra]


def _train_losses(out: Path) -> list[tuple[int, list[float]]]:
    return [(r["step"], r["head_losses"]) for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


def test_lr_schedule_warms_up_then_decays_to_three_percent():
    cfg = TrainConfig(out=Path("."), steps=100, warmup=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(55, cfg) == pytest.approx(0.515)
    assert lr_at(100, cfg) == pytest.approx(0.03) and lr_at(500, cfg) == pytest.approx(0.03)


def test_weight_decay_spares_norms_and_embeddings():
    model = random_model(tiny_args())
    opt = make_optimizer(model, TrainConfig(out=Path(".")))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert "tok_embeddings.weight" in no_decay and "norm.weight" in no_decay and "output.weight" in decay
    assert all(n.endswith("norm.weight") or n == "tok_embeddings.weight" for n in no_decay)
    assert decay | no_decay == set(names.values())


def test_train_writes_metrics_and_checkpoints_that_generate_and_plot_read(tmp_path, sp_model_path, capsys):
    out = tmp_path / "run"
    argv = _train_argv(out, tmp_path / "cache", steps=6)
    argv[argv.index("byte")] = str(sp_model_path)
    main(argv)
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(len(r["head_losses"]) == 2 and r["loss"] == pytest.approx(sum(r["head_losses"])) for r in train)
    assert {"lr", "tokens_per_s", "head_acc"} <= train[0].keys()
    assert [r["step"] for r in rows if r["split"] == "val"] == [3, 6]
    assert [p.name for p in complete_checkpoints(out)] == ["step-000004", "step-000006"]  # keep 2
    ckpt = out / "step-000006"
    assert (ckpt / "tokenizer.model").read_bytes() == sp_model_path.read_bytes()
    assert load_train_state(ckpt)["step"] == 6
    capsys.readouterr()
    main(["generate", "--ckpt-dir", str(ckpt), "--temperature", "0", "--max-gen-len", "4", "def"])
    assert capsys.readouterr().out.startswith("def")
    main(["plot", str(out)])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["plot", str(out), str(out), "--out", str(tmp_path / "both.png")])  # runs compared on shared axes
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="needs --out PNG"):
        main(["plot", str(out), str(out)])


_DRIVER = r"""
import os, signal, sys
from pathlib import Path
from multitoken.train import trainer as t

kind, nth = os.environ.get("KILL_AT", "none:0").split(":")
calls = {"n": 0}

def hit():
    calls["n"] += 1
    if calls["n"] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)

if kind == "model":  # weights written into the temporary folder, no train state, no COMPLETE
    real_save_model = t.save_model
    def save_model(model, d):
        real_save_model(model, d); hit()
    t.save_model = save_model
elif kind == "complete":  # everything written, COMPLETE included, not yet renamed
    real_fsync_dir = t._fsync_dir
    def _fsync_dir(d):
        real_fsync_dir(d)
        if Path(d).name.startswith(".tmp-"): hit()
    t._fsync_dir = _fsync_dir
elif kind == "prune":  # an old checkpoint renamed away, half deleted
    def _remove_dir(d):
        trash = d.with_name(".trash-" + d.name)
        os.rename(d, trash); (trash / "params.json").unlink(); hit()
    t._remove_dir = _remove_dir

from multitoken.cli import main
main(sys.argv[1:])
"""


def _assert_resumable(out: Path) -> None:
    """Whatever resume would pick loads: every complete folder, model and state."""
    for ckpt in complete_checkpoints(out):
        load_model(ckpt, max_seq_len=16)
        assert load_train_state(ckpt)["step"] == int(ckpt.name[5:])


def test_sigkill_anywhere_then_resume_gives_the_same_losses(tmp_path):
    steps = 8
    cache = tmp_path / "cache"
    base = tmp_path / "base"
    main(_train_argv(base, cache, steps=steps))
    expected = _train_losses(base)
    assert [s for s, _ in expected] == list(range(1, steps + 1))

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    rng = random.Random(0)
    # (kill point, complete checkpoints after it, a leftover temporary/trash folder expected)
    kills = [("model:2", [2], ".tmp-step-000004"), ("complete:1", [2], ".tmp-step-000004"),
             ("prune:1", [4, 6], ".trash-step-000002"), ("random", None, None),
             (None, None, None)]
    for kill, complete, leftover in kills:
        argv = [sys.executable, "-c", _DRIVER, *_train_argv(out, cache, "--resume", steps=steps)]
        proc = subprocess.Popen(argv, env={**env, "KILL_AT": kill or "none:0"} if kill != "random" else env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if kill == "random":
            time.sleep(rng.uniform(1.5, 4.0))  # somewhere in start-up, a step, a save or a prune
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        if kill is None or kill == "random":
            assert proc.returncode in ((0,) if kill is None else (0, -signal.SIGKILL)), err.decode()[-3000:]
        else:  # killed exactly where asked, leaving the half-written or half-deleted folder behind
            assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
            assert [int(p.name[5:]) for p in complete_checkpoints(out)] == complete
            assert any(p.name.startswith(leftover) for p in out.iterdir())
        _assert_resumable(out)
    assert _train_losses(out) == expected  # exactly: same bits after every resume
    assert [p.name for p in complete_checkpoints(out)] == ["step-000006", "step-000008"]
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_add_heads_copies_the_next_token_head_and_keeps_its_predictions():
    model = random_model(tiny_args(n_future_tokens=1, n_layers=3))
    tokens = torch.randint(0, 300, (2, 10))
    grown = add_heads(model, 2)
    assert grown.n_future_tokens == 3 and grown.args.n_layers == 5 and len(grown.extra_heads) == 2
    for head in grown.extra_heads:
        for (k, a), b in zip(head.state_dict().items(), model.layers[-1].state_dict().values()):
            assert torch.equal(a, b), k
    logits = grown(tokens, return_all_heads=True)
    assert torch.equal(logits[:, :, 0], model(tokens)[:, :, 0])
    assert torch.equal(logits[:, :, 1], logits[:, :, 2])


@pytest.mark.parametrize("soft", [[], ["--soft-targets", "0.5"]])
def test_freeze_trunk_trains_only_the_added_heads(tmp_path, soft):
    src = tmp_path / "n1"
    save_model(random_model(tiny_args(n_future_tokens=1, n_layers=3, vocab_size=259)), src)
    before = load_model(src).state_dict()
    out = tmp_path / "heads"
    argv = _train_argv(out, tmp_path / "cache", "--from", str(src), "--add-heads", "1", "--freeze-trunk", *soft,
                       steps=2)
    for flag in TINY[::2]:
        i = argv.index(flag)
        del argv[i : i + 2]
    main(argv)
    after = load_model(out / "step-000002").state_dict()
    assert json.loads((out / "step-000002" / "params.json").read_text())["n_future_tokens"] == 2
    head0 = "layers.2."  # n_layers=3, n=1: layers 0-1 are the trunk, layer 2 the next-token head
    for k, v in before.items():  # the original model, next-token head included, stays exactly as it was
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(after["extra_heads.0." + k[len(head0):]], v) for k, v in before.items()
               if k.startswith(head0))
    if soft:  # a run with soft targets resumes only with them
        with pytest.raises(SystemExit, match="soft_targets"):
            main(argv[: argv.index("--soft-targets")] + argv[argv.index("--soft-targets") + 2 :] + ["--resume", "--steps", "3"])


def _tiny_trainer(tmp_path, seq_len: int = 16, **cfg) -> Trainer:
    (tmp_path / "d.py").write_text("def f(x):\n    return x * 2\n" * 40)
    data = load_data([tmp_path / "d.py"], ByteTokenizer(), seq_len, cache_dir=tmp_path / "c", progress=False,
                     val_fraction=0)
    model = random_model(tiny_args(vocab_size=259, n_future_tokens=2, n_layers=3, max_seq_len=16), std=0.02)
    return Trainer(model, data, TrainConfig(out=tmp_path, batch_size=2, seq_len=seq_len, warmup=1, progress=False,
                                            **cfg))


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch, capsys):
    poisoned = {2, 3, 6, 7, 8}  # micro-batches whose backward gives one weight a NaN gradient

    class PoisonedLoss(trainer_mod.NTokenLoss):
        calls = 0

        def forward(self, *a):
            out = super().forward(*a)
            PoisonedLoss.calls += 1
            if PoisonedLoss.calls in poisoned:
                def nan_once(g):
                    handle.remove()
                    g = g.clone()
                    g[0, 0] = float("nan")
                    return g

                handle = self.model.extra_heads[0].attention.wq.weight.register_hook(nan_once)
            return out

    monkeypatch.setattr(trainer_mod, "NTokenLoss", PoisonedLoss)
    tr = _tiny_trainer(tmp_path, steps=20, save_every=100, eval_every=100, max_bad_steps=3)
    weights = [p.detach().clone() for p in tr.model.parameters()]
    tr.train_step()
    assert tr.skipped == 0
    weights = [p.detach().clone() for p in tr.model.parameters()]
    row = tr.train_step()
    assert row["skipped"] and tr.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, tr.model.parameters()))  # no update on a bad step
    with pytest.raises(NonFiniteError, match="3 steps in a row .* stopping"):
        tr.fit()
    assert tr.skipped == 5 and tr.step == 8
    assert "warning: step 3: non-finite" in capsys.readouterr().err
    assert complete_checkpoints(tmp_path) == []
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        with torch.no_grad():
            tr.model.output.weight[0, 0] = float("inf")
        tr._save()


def test_clear_errors(tmp_path, sp_model_path):
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit, match="training data not found: .*nope"):
        main(_train_argv(tmp_path / "a", cache, "--data", str(tmp_path / "nope")))
    ckpt = tmp_path / "ckpt"
    save_model(random_model(tiny_args(vocab_size=512)), ckpt)
    with pytest.raises(SystemExit, match="vocabulary \\(512\\) does not match the tokenizer's \\(259"):
        main(["train", "--out", str(tmp_path / "b"), "--from", str(ckpt), "--tokenizer-path", "byte"])
    with pytest.raises(SystemExit, match="--from takes the model's shape .* --dim"):
        main(["train", "--out", str(tmp_path / "b"), "--from", str(ckpt), "--dim", "64"])
    with pytest.raises(SystemExit, match="--soft-targets is the next-token head's share .* in \\[0, 1\\]: got 2"):
        main(["train", "--out", str(tmp_path / "b"), "--from", str(ckpt), "--soft-targets", "2"])
    with pytest.raises(ValueError, match="seq_len=32 exceeds the model's maximum sequence length 16"):
        _tiny_trainer(tmp_path, seq_len=32)
    out = tmp_path / "run"
    main(_train_argv(out, cache, steps=2))
    with pytest.raises(SystemExit, match="already holds checkpoints .* --resume"):
        main(_train_argv(out, cache, steps=4))
    argv = _train_argv(out, cache, "--resume", steps=4)
    argv[argv.index("--dim") + 1] = "16"
    with pytest.raises(SystemExit, match="cannot resume .*\\(dim: checkpoint 32, flags 16"):
        main(argv)
    argv = _train_argv(out, cache, "--resume", steps=4)
    argv[argv.index("--batch-size") + 1] = "3"
    with pytest.raises(SystemExit, match="cannot resume .*batch_size: checkpoint 2, now 3"):
        main(argv)


def test_two_process_data_parallel_matches_one_process_and_resumes(tmp_path):
    """torchrun, gloo, 2 processes of batch 2 == 1 process of batch 4; a checkpoint written by the
    pair resumes in a pair and loads in a single process."""
    cache, single, pair = tmp_path / "cache", tmp_path / "single", tmp_path / "pair"
    main(_train_argv(single, cache, steps=4) + ["--batch-size", "4"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "multitoken.cli"]
    for steps, extra in ((2, []), (4, ["--resume"])):
        result = subprocess.run([*torchrun, *_train_argv(pair, cache, *extra, steps=steps)], capture_output=True,
                                text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    got, expected = _train_losses(pair), _train_losses(single)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5)
    assert load_train_state(pair / "step-000004")["run"]["world_size"] == 2
    load_model(pair / "step-000004")  # one process reads what two wrote
    with pytest.raises(SystemExit, match="world_size: checkpoint 2, now 1"):
        main(_train_argv(pair, cache, "--resume", steps=6))


def test_bench_train_runs_and_prints_ratios():
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"
    cmd = [sys.executable, str(bench), "--dim", "32", "--n-layers", "4", "--n-heads", "2", "--vocab-size", "300",
           "--batch-size", "1", "--seq-len", "16", "--steps", "1", "--chunk", "4",
           "--configs", "n=1", "n=4 per-head+chunk"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("n=")]
    assert [r.split()[0] for r in rows] == ["n=1", "n=4"] and rows[0].endswith("1.00x     1.00x")


@pytest.mark.slow  # ~1-2 min: inductor compiles each block's forward and backward on CPU
def test_compiled_blocks_train_like_eager_blocks(tmp_path):
    losses = {}
    for compile in (False, True):
        (tmp_path / str(compile)).mkdir()
        tr = _tiny_trainer(tmp_path / str(compile), compile=compile, steps=2, save_every=100, eval_every=100)
        losses[compile] = [tr.train_step()["loss"] for _ in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
