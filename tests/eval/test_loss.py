import torch
import torch.nn.functional as F

from conftest import random_model, stdlib_sources, tiny_args
from multitoken.cli import main
from multitoken.eval.loss import corpus_windows, head_metrics
from multitoken.tokenizer import load_tokenizer


def test_head_metrics_match_a_direct_computation():
    model = random_model(tiny_args(), dtype=torch.float64).eval()
    windows = torch.randint(0, 300, (5, 20 + 3))
    metrics = head_metrics(model, windows, batch_size=2)
    with torch.no_grad():
        logits = model(windows[:, :20], return_all_heads=True)
    for i, m in enumerate(metrics):
        pred = logits[:, :, i]
        target = windows[:, 1 + i : 21 + i]  # head i at t predicts t + 1 + i: every position has a target
        assert m.positions == 5 * 20
        assert abs(m.loss - F.cross_entropy(pred.flatten(0, 1), target.flatten()).item()) < 1e-6
        assert m.top1 == (pred.argmax(-1) == target).double().mean().item()
        assert m.top5 == (pred.topk(5, -1).indices == target[..., None]).any(-1).double().mean().item()
        assert m.top1 <= m.top5


def test_eval_loss_command_prints_every_head(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "corpus"
    data.mkdir()
    for f in stdlib_sources(40_000):
        (data / f.name).write_text(f.read_text())
    main(["eval", "loss", "--ckpt-dir", str(tiny_ckpt), "--data", str(data), "--seq-len", "32", "--max-windows", "6"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["head", "predicts", "loss"]
    assert [line.split()[1] for line in out[1:]] == ["t+1", "t+2", "t+3"]
    windows = corpus_windows([data], load_tokenizer(tiny_ckpt / "tokenizer.model"), 35, max_windows=6)
    assert windows.shape == (6, 35)
