import math

import pytest
import torch

from multitoken.sampling import probs_from_logits, sample


def test_greedy_is_argmax():
    logits = torch.randn(4, 7, 50)
    assert torch.equal(sample(logits, 0.0, 0.9), logits.argmax(-1))


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_always_the_top_token():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = probs_from_logits(logits, 1.0, 0.7)
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    probs = probs_from_logits(logits, 1.0, 0.01)
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(probs_from_logits(logits, 1.0, 1.0), torch.exp(logits))


def test_samples_follow_the_processed_distribution():
    """Chi-square goodness of fit of 40k draws against probs_from_logits (df ~ 6; 40 is far out)."""
    torch.manual_seed(0)
    logits = torch.randn(12) * 2
    probs = probs_from_logits(logits, 0.8, 0.9)
    draws = sample(logits.expand(40_000, 12), 0.8, 0.9)
    counts = torch.bincount(draws, minlength=12).double()
    expected = probs.double() * 40_000
    support = expected > 0
    assert counts[~support].sum() == 0
    chi2 = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    assert chi2 < 40, chi2


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0])
    hot, cold = probs_from_logits(logits, 2.0, 1.0), probs_from_logits(logits, 0.5, 1.0)
    assert hot[0] == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert cold[0] == pytest.approx(1 / (1 + math.exp(-2.0)))
