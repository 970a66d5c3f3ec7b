"""Per-head loss, perplexity and top-1/top-5 accuracy of a checkpoint on a corpus.

Head i at position t is scored against token t + 1 + i, over consecutive windows of the tokenised
corpus (the same packed BOS ... EOS stream that training reads), in corpus order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from multitoken.model import Transformer
from multitoken.train.data import default_cache_dir, find_inputs, tokenize_to_cache
from multitoken.train.loss import IGNORE, head_targets


@dataclass
class HeadMetrics:
    loss: float  # mean cross-entropy, nats per token
    top1: float
    top5: float
    positions: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@torch.inference_mode()
def head_metrics(model: Transformer, windows: torch.Tensor, batch_size: int = 8) -> list[HeadMetrics]:
    """Metrics of every head over `windows` (n, seq_len + n_future) of token ids."""
    n = model.n_future_tokens
    seq = windows.shape[1] - n
    loss = torch.zeros(n, dtype=torch.float64)
    top1 = torch.zeros(n, dtype=torch.long)
    top5 = torch.zeros(n, dtype=torch.long)
    count = torch.zeros(n, dtype=torch.long)
    device = model.tok_embeddings.weight.device
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size].to(device)
        inputs, labels = batch[:, :seq], batch[:, 1:]
        h = model.forward_trunk(inputs)
        for i in range(n):
            logits = model.logits(model.forward_head(i, h))
            target = head_targets(labels, i, seq)
            valid = target != IGNORE
            loss[i] += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum").double().cpu()
            best5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            top1[i] += (best5[..., 0] == target)[valid].sum().cpu()
            top5[i] += (best5 == target[..., None]).any(-1)[valid].sum().cpu()
            count[i] += valid.sum().cpu()
    c = count.clamp(min=1)
    c = c.double()
    return [HeadMetrics(float(loss[i] / c[i]), float(top1[i] / c[i]), float(top5[i] / c[i]), int(count[i]))
            for i in range(n)]


def corpus_windows(paths: Sequence[str | os.PathLike], tokenizer, window: int, *, glob: str = "*.py",
                   text_field: str = "text", max_windows: int | None = None,
                   cache_dir: Path | None = None) -> torch.Tensor:
    """Consecutive windows of `window` tokens over the tokenised corpus, in order, (n, window)."""
    files = find_inputs(paths, glob)
    tokens_path, docs_path = tokenize_to_cache(files, tokenizer, cache_dir or default_cache_dir(), text_field,
                                               progress=False)
    tokens = np.load(tokens_path, mmap_mode="r")
    n = len(tokens) // window if max_windows is None else min(len(tokens) // window, max_windows)
    if n == 0:
        raise ValueError(f"the corpus ({len(tokens)} tokens) is shorter than one window of {window} tokens")
    return torch.from_numpy(np.asarray(tokens[: n * window], dtype=np.int64).reshape(n, window))


def format_metrics(metrics: list[HeadMetrics]) -> str:
    lines = [f"{'head':>4} {'predicts':>8} {'loss':>7} {'ppl':>9} {'top-1':>6} {'top-5':>6} {'positions':>10}"]
    for i, m in enumerate(metrics):
        lines.append(f"{i:>4} {f't+{i + 1}':>8} {m.loss:>7.3f} {m.perplexity:>9.2f} {m.top1:>6.1%} {m.top5:>6.1%} "
                     f"{m.positions:>10,}")
    return "\n".join(lines)
