"""The n-token loss and its memory-efficient backward (Gloeckle et al. 2024, section 2).

Head i (0-based) at position t predicts token t + 1 + i. `labels` are next-token labels
(labels[:, t] is the token after inputs[:, t]), so head i's target at t is labels[:, t + i]; positions
whose target lies past the end of `labels` are ignored. Passing windows of S + 1 tokens gives every head
the same inputs and drops the last i positions of head i; passing S + n gives every head all S targets.

The loss is sum_i w_i * mean_t CE(head i at t, token t + 1 + i) (w_i = 1 by default).

`forward_backward` runs it the paper's way: the trunk once, then each head forward -> loss -> backward
into a detached copy of the trunk output (so only one head's logits are alive at a time), then one
trunk backward with the accumulated gradient. `per_head_backward=False` is the plain path (every head's
logits alive, one backward); both give the same gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from multitoken.model import Transformer

IGNORE = -100  # F.cross_entropy's default ignore_index


@dataclass
class HeadStats:
    """Per-head sums over one or more micro-batches; `loss`/`accuracy` divide by the count."""

    loss_sum: torch.Tensor  # (n,) float64: sum of per-position cross-entropies
    correct: torch.Tensor  # (n,) int64: top-1 hits
    count: torch.Tensor  # (n,) int64: positions with a target

    @property
    def losses(self) -> list[float]:
        return (self.loss_sum / self.count.clamp(min=1)).tolist()

    @property
    def accuracies(self) -> list[float]:
        return (self.correct.double() / self.count.clamp(min=1)).tolist()

    def __add__(self, other: HeadStats) -> HeadStats:
        return HeadStats(self.loss_sum + other.loss_sum, self.correct + other.correct, self.count + other.count)


def head_targets(labels: torch.Tensor, i: int, seq_len: int) -> torch.Tensor:
    """Head i's targets for `seq_len` positions: labels shifted left by i, IGNORE past the end."""
    t = labels[:, i : i + seq_len]
    if t.shape[1] < seq_len:
        t = F.pad(t, (0, seq_len - t.shape[1]), value=IGNORE)
    return t


def _check(model: Transformer, inputs: torch.Tensor, labels: torch.Tensor, weights) -> list[float]:
    if inputs.dim() != 2 or labels.dim() != 2 or inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"inputs and labels must be (batch, seq) with the same batch: got {tuple(inputs.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.shape[1] < inputs.shape[1]:
        raise ValueError(f"labels ({labels.shape[1]} positions) must cover every input ({inputs.shape[1]})")
    n = model.n_future_tokens
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} head weights given for a model with {n} heads")
    return weights


def _ce_sums(model: Transformer, h: torch.Tensor, target: torch.Tensor, scale: float | None,
             chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and top-1 hits of one head's output `h` (batch, seq, dim).

    With `scale` set, also runs the backward of scale * summed CE (into h and the shared norm/output).
    With `chunk` set, logits exist for `chunk` positions at a time: each chunk's loss is backpropagated
    into a detached h before the next chunk's logits are made, then h gets one backward.
    """
    if chunk is None or chunk >= h.shape[1]:
        logits = model.logits(h)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
        correct = ((logits.detach().argmax(-1) == target) & (target != IGNORE)).sum()
        if scale is not None and loss.requires_grad:  # False when nothing on this path trains
            (loss * scale).backward()
        return loss, correct, loss  # third: what the plain path sums into the graph
    h_in = h.detach().requires_grad_(h.requires_grad) if scale is not None else h
    loss_sum, correct, parts = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.long), []
    for s in range(0, h.shape[1], chunk):
        part_loss, part_correct, part = _ce_sums(model, h_in[:, s : s + chunk], target[:, s : s + chunk], scale, None)
        loss_sum, correct = loss_sum + part_loss.detach(), correct + part_correct
        parts.append(part)
    if scale is not None and h.requires_grad and h_in.grad is not None:
        h.backward(h_in.grad)
    return loss_sum, correct, sum(parts) if scale is None else loss_sum


def forward_backward(
    model: Transformer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: list[float] | None = None,
    loss_scale: float = 1.0,
    per_head_backward: bool = True,
    chunk: int | None = None,
    backward: bool = True,
) -> tuple[torch.Tensor, HeadStats]:
    """n-token loss of one micro-batch, and (with `backward`) its gradient added to every .grad.

    The gradient is that of loss_scale * loss (use 1 / grad_accum for gradient accumulation).
    Returns the detached weighted loss (float32) and the per-head sums. A frozen trunk (no parameter
    needing a gradient) runs under no_grad and gets no backward.
    """
    weights = _check(model, inputs, labels, weights)
    n, seq = model.n_future_tokens, inputs.shape[1]
    targets = [head_targets(labels, i, seq) for i in range(n)]
    counts = torch.stack([(t != IGNORE).sum() for t in targets])

    trunk_trains = backward and torch.is_grad_enabled() and any(
        p.requires_grad for p in [*model.tok_embeddings.parameters(), *model.layers[:-1].parameters()])
    with torch.set_grad_enabled(trunk_trains):
        h = model.forward_trunk(inputs)
    per_head = backward and per_head_backward
    # The heads' gradients land in h_in.grad; h itself is backpropagated once at the end.
    h_in = h.detach().requires_grad_(trunk_trains) if per_head else h

    losses, corrects, graph_terms = [], [], []
    for i in range(n):
        scale = loss_scale * weights[i] / max(int(counts[i]), 1)
        out = model.forward_head(i, h_in)
        loss_i, correct_i, term = _ce_sums(model, out, targets[i], scale if per_head else None, chunk)
        losses.append(loss_i.detach().double())
        corrects.append(correct_i)
        if not per_head:
            graph_terms.append(term * scale)
        del out, term  # frees this head's activations/logits before the next head
    if backward:
        if per_head:
            if trunk_trains and h_in.grad is not None:
                h.backward(h_in.grad)
        else:
            torch.stack(graph_terms).sum().backward()
    stats = HeadStats(torch.stack(losses), torch.stack(corrects), counts)
    w = torch.tensor(weights, dtype=torch.float64)
    loss = (w * stats.loss_sum / stats.count.clamp(min=1)).sum().float()
    return loss, stats


@torch.no_grad()
def evaluate_batch(model: Transformer, inputs: torch.Tensor, labels: torch.Tensor,
                   chunk: int | None = None) -> HeadStats:
    """Per-head loss sums and top-1 hits, no gradients."""
    return forward_backward(model, inputs, labels, chunk=chunk, backward=False)[1]
