"""`multitoken plot RUN [RUN ...]`: loss and top-1 accuracy per head from RUN/metrics.jsonl, as one PNG;
with several runs, their validation curves side by side (an n=4 model against its n=1 baseline)."""

from __future__ import annotations

import os
from pathlib import Path

from multitoken.train.trainer import read_metrics


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'multitoken[plot]'") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, png: Path) -> Path:
    """Grid and legend on every axis, then the PNG, written under a temporary name and renamed."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)  # never a half-written PNG under the final name
    return png


def plot_runs(run_dirs: list[Path], png: Path) -> Path:
    """Validation loss and accuracy per head of several runs on shared axes: color = head, style = run."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["o-", "s--", "^:", "d-."]
    for r, run_dir in enumerate(run_dirs):
        val = [x for x in read_metrics(run_dir / "metrics.jsonl") if x.get("split") == "val"]
        if not val:
            raise ValueError(f"no validation rows in {run_dir / 'metrics.jsonl'}: train with --eval-every N")
        steps = [x["step"] for x in val]
        for i in range(len(val[0]["head_losses"])):
            kw = dict(color=f"C{i}", label=f"{run_dir.name} head {i} (t+{i + 1})", ms=4)
            ax_loss.plot(steps, [x["head_losses"][i] for x in val], styles[r % len(styles)], **kw)
            ax_acc.plot(steps, [x["head_acc"][i] for x in val], styles[r % len(styles)], **kw)
    ax_loss.set(xlabel="step", ylabel="validation cross-entropy (nats)", title="validation loss per head")
    ax_acc.set(xlabel="step", ylabel="validation top-1 accuracy", title="validation accuracy per head")
    return _finish(plt, fig, png)


def plot_metrics(run_dir: Path, png: Path | None = None) -> Path:
    plt = _pyplot()
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("split") == "train" and not r.get("skipped")]
    val = [r for r in rows if r.get("split") == "val"]
    if not train:
        raise ValueError(f"no training steps logged in {run_dir / 'metrics.jsonl'}: is {run_dir} a training run?")
    n = len(train[0]["head_losses"])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i in range(n):
        color = f"C{i}"
        label = f"head {i} (t+{i + 1})"
        ax_loss.plot([r["step"] for r in train], [r["head_losses"][i] for r in train], color=color, alpha=0.6,
                     lw=1, label=f"{label} train")
        ax_acc.plot([r["step"] for r in train], [r["head_acc"][i] for r in train], color=color, alpha=0.6, lw=1,
                    label=f"{label} train")
        if val:
            ax_loss.plot([r["step"] for r in val], [r["head_losses"][i] for r in val], "o--", color=color,
                         label=f"{label} val")
            ax_acc.plot([r["step"] for r in val], [r["head_acc"][i] for r in val], "o--", color=color,
                        label=f"{label} val")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss per head")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="accuracy per head")
    return _finish(plt, fig, png or run_dir / "curves.png")
