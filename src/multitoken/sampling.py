"""Turning logits into tokens: temperature and top-p (nucleus) processing.

Plain and speculative decoding share these functions, because lossless speculative sampling needs
the draft and target distributions processed exactly as plain sampling processes them.
"""

from __future__ import annotations

import torch

from multitoken import kernels


def check_sampling_args(temperature: float, top_p: float) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


_TOP_K = 256  # candidates tried before a full sort: most top-p sets of a trained model are smaller


def _top_p_sorted(probs: torch.Tensor, top_p: float, tie_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted in descending order with the tail beyond top_p zeroed and renormalised,
    and the vocabulary ids of that order. A token is kept while the mass before it is <= top_p, so the
    most likely token always survives.

    Sorting the whole vocabulary costs far more than the rest of a sampling step on a CPU (0.2 ms a
    row of 4096 here, 7.5 ms for 4 rows of 49152). Where the best few tokens already hold more than
    top_p, the tail is cut whatever its order: then only they are sorted (topk) and the tail is
    zeros; the other rows alone are sorted in full. The result is bitwise the full sort's on every kept
    entry, ids included, so `sample` draws the reference's tokens (ids past the kept ones differ,
    but they are never drawn). Tied probabilities (frequent with bf16 logits) are ordered by the
    sort its own way, which topk need not share: with `tie_order` no kept token may tie with the next;
    without, only the last kept one, so that the same tokens are kept with the full sort's
    probabilities, equal ones perhaps in another order (all that a distribution in vocabulary
    order, `probs_from_logits`, needs). On a GPU the sort is cheap and the check would make the host
    wait for the device, so it always sorts there."""
    vocab, k = probs.shape[-1], _TOP_K
    if probs.device.type != "cpu" or 4 * k > vocab:  # on a small vocabulary the full sort is as cheap
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
        return _truncated(probs_sort, top_p), probs_idx
    top, top_idx = torch.topk(probs, k, dim=-1)
    kept = top.cumsum(-1) - top <= top_p
    checked = kept[..., :-1] if tie_order else kept[..., :-1] & ~kept[..., 1:]
    # Nothing past the k-th best token is kept, and no checked token ties with the next.
    cut = ~kept[..., -1] & ((top[..., :-1] > top[..., 1:]) | ~checked).all(-1)
    probs_sort = torch.cat([top, top.new_zeros(*top.shape[:-1], vocab - k)], dim=-1)
    probs_idx = torch.cat([top_idx, top_idx.new_zeros(*top.shape[:-1], vocab - k)], dim=-1)
    if not bool(cut.all()):
        # Each row is sorted on its own: a sort of some rows orders each as a sort of all would.
        probs_sort[~cut], probs_idx[~cut] = torch.sort(probs[~cut], dim=-1, descending=True)
    return _truncated(probs_sort, top_p), probs_idx


def _truncated(probs_sort: torch.Tensor, top_p: float) -> torch.Tensor:
    """Sorted probabilities with the tokens past top_p's mass zeroed, renormalised."""
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(mass_before > top_p, 0.0)
    return probs_sort / probs_sort.sum(dim=-1, keepdim=True)


def probs_from_logits(
    logits: torch.Tensor, temperature: float | torch.Tensor, top_p: float | torch.Tensor
) -> torch.Tensor:
    """The distribution plain sampling draws from, over the vocabulary in its own order (temperature > 0).
    Either setting may be a tensor broadcastable to logits[..., :1]: a value per row of a batch. On a
    CPU with the kernels, the top-p step is one call (`kernels.top_p`), the same numbers bit for bit."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return probs
    if kernels.top_p_runs(probs):
        return kernels.top_p(probs, top_p)  # the same numbers in one call instead of ~10 (~0.1 ms a row here)
    probs_sort, probs_idx = _top_p_sorted(probs, top_p, tie_order=False)
    # scatter_add: ids past the kept ones may repeat (with zeros), and adding 0 changes nothing.
    return torch.zeros_like(probs).scatter_add_(-1, probs_idx, probs_sort)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token ids (...,) of logits (..., vocab), the first among equals: argmax's, as
    torch.max's indices, which a CPU computes ~3x faster (8 against 25 us for 4 x 4096 float32 logits:
    three of these a self-speculative step)."""
    return logits.max(-1).indices


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (...,) from logits (..., vocab): argmax at temperature 0, else top-p sampling.

    The draw follows the Llama reference step for step (multinomial over the sorted, truncated
    distribution), so a given seed and logits give the reference's tokens.
    """
    if temperature == 0:
        return greedy(logits)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs_sort, probs_idx = _top_p_sorted(probs, top_p)
    flat = probs_sort.reshape(-1, probs_sort.shape[-1])
    choice = torch.multinomial(flat, num_samples=1, generator=generator).view(*probs_sort.shape[:-1], 1)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def draw(probs: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """One id per row of probs (..., vocab), drawn with its probability: inverse-CDF sampling with one
    uniform per row (`u` (...) in [0, 1); default: fresh float64 draws). torch.multinomial draws an
    exponential per vocabulary entry, which on a CPU costs more than the rest of a sampling step (0.6 ms
    for 4 rows of 4096 here, 8 ms at 49152). Ids of probability zero are never drawn. For the
    self-speculative paths and the server, whose output must follow the distribution, not the
    reference's draws (plain `sample` keeps those). probs need not be normalised: ids are drawn in
    proportion. On a CPU with the kernels, one call (`kernels.draw`), the same ids."""
    if u is None:
        u = torch.rand(*probs.shape[:-1], dtype=torch.float64, device=probs.device)
    if kernels.sampling_runs(probs) and u.shape == probs.shape[:-1]:
        return kernels.draw(probs, u)
    cdf = probs.double().cumsum(-1)
    u = u[..., None] * cdf[..., -1:]
    idx = torch.searchsorted(cdf, u, right=True)[..., 0]
    # u * total can round up to the total: then the last id of positive probability, not one past it.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(idx, last)
