"""`multitoken plot OUT`: loss and top-1 accuracy per head from OUT/metrics.jsonl, as one PNG."""

from __future__ import annotations

import os
from pathlib import Path

from multitoken.train.trainer import read_metrics


def plot_metrics(run_dir: Path, png: Path | None = None) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'multitoken[plot]'") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

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
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = png or run_dir / "curves.png"
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)  # never a half-written PNG under the final name
    return png
