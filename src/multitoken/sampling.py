"""Turning logits into tokens: temperature and top-p (nucleus) processing.

Plain and speculative decoding share these functions, because lossless speculative sampling needs
the draft and target distributions processed exactly as plain sampling processes them.
"""

from __future__ import annotations

import torch


def check_sampling_args(temperature: float, top_p: float) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _top_p_sorted(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted in descending order with the tail beyond top_p zeroed and renormalised,
    and the vocabulary ids of that order. A token is kept while the mass before it is <= top_p, so the
    most likely token always survives."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(mass_before > top_p, 0.0)
    return probs_sort / probs_sort.sum(dim=-1, keepdim=True), probs_idx


def probs_from_logits(
    logits: torch.Tensor, temperature: float | torch.Tensor, top_p: float | torch.Tensor
) -> torch.Tensor:
    """The distribution plain sampling draws from, over the vocabulary in its own order (temperature > 0).
    Either setting may be a tensor broadcastable to logits[..., :1]: a value per row of a batch."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return probs
    probs_sort, probs_idx = _top_p_sorted(probs, top_p)
    return torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (...,) from logits (..., vocab): argmax at temperature 0, else top-p sampling.

    The draw follows the Llama reference step for step (multinomial over the sorted, truncated
    distribution), so a given seed and logits give the reference's tokens.
    """
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs_sort, probs_idx = _top_p_sorted(probs, top_p)
    flat = probs_sort.reshape(-1, probs_sort.shape[-1])
    choice = torch.multinomial(flat, num_samples=1, generator=generator).view(*probs_sort.shape[:-1], 1)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)
