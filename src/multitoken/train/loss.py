"""The n-token loss and its memory-efficient backward (Gloeckle et al. 2024, section 2).

Head i (0-based) at position t predicts token t + 1 + i. `labels` are next-token labels
(labels[:, t] is the token after inputs[:, t]), so head i's target at t is labels[:, t + i]; positions
whose target lies past the end of `labels` are ignored. Passing windows of S + 1 tokens gives every head
the same inputs and drops the last i positions of head i; passing S + n gives every head all S targets.

The loss is sum_i w_i * mean_t CE(head i at t, token t + 1 + i) (w_i = 1 by default). With
`soft_targets` = s > 0 the extra heads (i >= 1) learn a distribution instead of a token: s times the
next-token head's distribution at t + i, which predicts the same token t + 1 + i from the text up to
it (self-distillation), plus 1 - s times the text's token. A temperature rescales the logits of both
heads alike, so heads that match the next-token head's logits draft well for self-speculative sampling
at any temperature; the token's share keeps their top choice sharp for greedy drafting.

`ntoken_loss` runs it the paper's way: the trunk once, then each head forward -> loss -> gradient into a
detached copy of the trunk output (so only one head's logits are alive at a time); the loss it returns
carries the accumulated gradients, so its one backward call runs the trunk's backward (and lets DDP see
one backward per forward). `per_head_backward=False` is the plain path (every head's logits alive);
both give the same gradients.
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


def soft_head_targets(teacher: torch.Tensor, hard: torch.Tensor, i: int, share: float = 1.0) -> torch.Tensor:
    """Head i's soft targets (batch, seq, vocab): `share` times the teacher's probabilities (batch, seq,
    vocab) at t + i plus the rest on head i's token target (`hard`); a row of zeros where `hard` is
    IGNORE (no target)."""
    t = teacher[:, i:]
    t = F.pad(t, (0, 0, 0, hard.shape[1] - t.shape[1]))
    if share < 1:  # the token's share added in place: no (batch, seq, vocab) one-hot
        t = (share * t).scatter_add_(-1, hard.clamp(min=0)[..., None], t.new_full((*hard.shape, 1), 1 - share))
    return t * (hard != IGNORE)[..., None]


def _ce_sums(model: Transformer, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and top-1 hits of one head's block output (batch, seq, dim) against token
    targets (batch, seq), or against soft targets (batch, seq, vocab) (hits: the target's top token)."""
    logits = model.logits(out)
    if target.is_floating_point():
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(0, 1), reduction="sum")
        hits = (logits.detach().argmax(-1) == target.argmax(-1)) & (target.sum(-1) > 0)
        return loss, hits.sum()
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
    correct = ((logits.detach().argmax(-1) == target) & (target != IGNORE)).sum()
    return loss, correct


def _head_grads(model: Transformer, i: int, h_in: torch.Tensor, target: torch.Tensor, scale: float,
                chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Head i's summed loss and hits, and the gradients of scale * loss keyed by id() of each tensor
    on its path that needs one: the trunk output h_in, head i's block, the shared norm and output.

    Only this head's activations are alive, and with `chunk` only that many positions' logits: each
    chunk's loss is differentiated into the head's output before the next chunk's logits are made.
    """
    out = model.forward_head(i, h_in)
    shared = [p for p in (model.norm.weight, model.output.weight) if p.requires_grad]
    out_d = out.detach()
    g_out, g_shared = torch.zeros_like(out_d), [torch.zeros_like(p) for p in shared]
    loss_sum, correct = out_d.new_zeros((), dtype=torch.float32), out_d.new_zeros((), dtype=torch.long)
    chunk = chunk or out.shape[1]
    for s in range(0, out.shape[1], chunk):
        x = out_d[:, s : s + chunk].requires_grad_()
        loss, hits = _ce_sums(model, x, target[:, s : s + chunk])
        g_x, *g = torch.autograd.grad(loss * scale, [x, *shared])
        g_out[:, s : s + chunk] = g_x
        g_shared = [a + b for a, b in zip(g_shared, g)]
        loss_sum, correct = loss_sum + loss.detach(), correct + hits
    # The rest of the head's path: its block (and the trunk output, when the trunk trains).
    rest = [t for t in (h_in, *model.heads[i].parameters()) if t.requires_grad]
    g_rest = torch.autograd.grad(out, rest, g_out) if rest else ()
    return loss_sum, correct, {id(t): g for t, g in zip([*shared, *rest], [*g_shared, *g_rest])}


class _Precomputed(torch.autograd.Function):
    """An autograd node whose value and gradients were computed already: the per-head backward runs
    during the forward, and one ordinary backward later hands its gradients to the trunk and to the
    heads' parameters. So a step is one backward call, as DDP and FSDP expect."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: tuple, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # Scaled in place and handed over (the node keeps no reference), so .grad can take these
        # tensors as they are instead of holding a second copy of the heads' gradients.
        grads, ctx.grads = ctx.grads, None
        return None, None, *(None if x is None else x.mul_(g.to(x.dtype)) for x in grads)


def ntoken_loss(
    model: Transformer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: list[float] | None = None,
    per_head_backward: bool = True,
    chunk: int | None = None,
    soft_targets: float = 0.0,
) -> tuple[torch.Tensor, HeadStats]:
    """The weighted n-token loss of one micro-batch (float32, differentiable) and its per-head sums.

    With `per_head_backward` (when gradients are enabled) each head runs forward -> loss -> gradient
    into a detached copy of the trunk output before the next head, so only one head's logits are ever
    alive; the returned loss carries those gradients, and its backward continues into the trunk.
    Otherwise every head's logits stay alive until the backward (the plain path); both give the same
    gradients. `soft_targets` in (0, 1]: the next-token head's share in the extra heads' targets (module
    docstring); their sums are then soft cross-entropies, and their hits agreements with the targets'
    top tokens.
    """
    if not 0 <= soft_targets <= 1:
        raise ValueError(f"soft_targets must be in [0, 1] (the next-token head's share), got {soft_targets}")
    weights = _check(model, inputs, labels, weights)
    n, seq = model.n_future_tokens, inputs.shape[1]
    targets = [head_targets(labels, i, seq) for i in range(n)]
    if soft_targets:  # head i's last i positions have no teacher: it would need tokens past the inputs
        targets[1:] = [F.pad(t[:, : seq - i], (0, i), value=IGNORE) for i, t in enumerate(targets[1:], 1)]
    counts = torch.stack([(t != IGNORE).sum() for t in targets])
    scales = [w / max(int(c), 1) for w, c in zip(weights, counts)]
    h = model.forward_trunk(inputs)
    if soft_targets and n > 1:
        with torch.no_grad():  # the teacher: a constant, whether or not the next-token head trains
            teacher = model.logits(model.forward_head(0, h)).float().softmax(-1)
        targets = targets[:1] + [soft_head_targets(teacher, targets[i], i, soft_targets) for i in range(1, n)]
        del teacher
    losses, corrects = [], []
    if per_head_backward and torch.is_grad_enabled():
        h_in = h.detach().requires_grad_(h.requires_grad)
        grads: dict[int, torch.Tensor] = {}  # by id() of the tensor: summed over the heads
        for i in range(n):
            loss_i, correct_i, g = _head_grads(model, i, h_in, targets[i], scales[i], chunk)
            for key, grad in g.items():
                grads[key] = grads[key] + grad if key in grads else grad
            losses.append(loss_i.double())
            corrects.append(correct_i)
        value = sum(s * l.float() for s, l in zip(scales, losses))
        params = [model.norm.weight, model.output.weight, *(p for i in range(n) for p in model.heads[i].parameters())]
        loss = _Precomputed.apply(value, tuple(grads.get(id(t)) for t in [h_in, *params]), h, *params)
    else:
        terms = []
        for i in range(n):
            loss_i, correct_i = _ce_sums(model, model.forward_head(i, h), targets[i])
            terms.append(loss_i * scales[i])
            losses.append(loss_i.detach().double())
            corrects.append(correct_i)
        loss = torch.stack(terms).sum()
    return loss, HeadStats(torch.stack(losses), torch.stack(corrects), counts)


def forward_backward(
    model: Transformer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: list[float] | None = None,
    loss_scale: float = 1.0,
    per_head_backward: bool = True,
    chunk: int | None = None,
    soft_targets: float = 0.0,
    backward: bool = True,
) -> tuple[torch.Tensor, HeadStats]:
    """n-token loss of one micro-batch, and (with `backward`) the gradient of loss_scale * loss added
    to every .grad (loss_scale = 1 / grad_accum for gradient accumulation). Returns the detached
    weighted loss and the per-head sums."""
    with torch.set_grad_enabled(backward and torch.is_grad_enabled()):
        loss, stats = ntoken_loss(model, inputs, labels, weights=weights, per_head_backward=per_head_backward,
                                  chunk=chunk, soft_targets=soft_targets)
        if backward and loss.requires_grad:  # False when nothing trains
            (loss * loss_scale).backward()
    return loss.detach(), stats


class NTokenLoss(torch.nn.Module):
    """The model and its n-token loss as one module, so DDP (or FSDP) can wrap a forward that the
    single backward of the step follows."""

    def __init__(self, model: Transformer, weights: list[float] | None = None, per_head_backward: bool = True,
                 chunk: int | None = None, soft_targets: float = 0.0):
        super().__init__()
        self.model, self.weights, self.per_head_backward, self.chunk = model, weights, per_head_backward, chunk
        self.soft_targets = soft_targets

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss, s = ntoken_loss(self.model, inputs, labels, weights=self.weights,
                              per_head_backward=self.per_head_backward, chunk=self.chunk,
                              soft_targets=self.soft_targets)
        return loss, s.loss_sum, s.correct, s.count


@torch.no_grad()
def evaluate_batch(model: Transformer, inputs: torch.Tensor, labels: torch.Tensor,
                   chunk: int | None = None) -> HeadStats:
    """Per-head loss sums and top-1 hits, no gradients."""
    return forward_backward(model, inputs, labels, chunk=chunk, backward=False)[1]
