import math

import pytest
import torch

from multitoken import kernels
from multitoken.sampling import greedy, probs_from_logits, sample


def test_greedy_is_argmax():
    logits = torch.randn(4, 7, 50)
    assert torch.equal(sample(logits, 0.0, 0.9), logits.argmax(-1))


def test_greedy_takes_argmax_first_index_among_ties_and_nans():
    """`greedy` is torch.max's indices (faster than argmax on a CPU): the same first index among equal
    logits (bf16-rounded logits tie often), a NaN's where a row holds one, for any vocabulary length."""
    g = torch.Generator().manual_seed(0)
    for vocab in (2, 17, 4096, 5003):
        ties = torch.randint(-2, 3, (6, 3, vocab), generator=g).float()
        rounded = torch.randn(6, 3, vocab, generator=g).to(torch.bfloat16).float()
        nan = rounded.clone()
        nan[0, 1, vocab // 2] = float("nan")
        for logits in (ties, rounded, nan, ties[:, 0]):
            assert torch.equal(greedy(logits), logits.argmax(-1))
    assert greedy(ties)[0, 0] == (ties[0, 0] == ties[0, 0].max()).int().argmax()  # the first maximum


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


def _reference_sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """The Llama reference's step: softmax, full sort, nucleus cut, multinomial, gather."""
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > top_p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, torch.multinomial(probs_sort, num_samples=1, generator=generator))[..., 0]


@pytest.mark.parametrize("vocab", [300, 4096, 49152])
def test_sample_draws_the_reference_tokens_with_or_without_the_full_sort(vocab):
    torch.manual_seed(0)
    fast = 0
    for i in range(40):
        logits = torch.randn(3, vocab) * (1, 3, 8, 12)[i % 4]
        if i % 5 == 0:
            logits = logits.round()  # ties, which topk and sort may order differently
        top_p = (0.5, 0.9, 0.95)[i % 3]
        expected = _reference_sample(logits, 0.8, top_p, torch.Generator().manual_seed(i))
        assert torch.equal(sample(logits, 0.8, top_p, generator=torch.Generator().manual_seed(i)), expected)
        probs = probs_from_logits(logits, 0.8, top_p)
        assert torch.equal(probs > 0, _reference_support(logits, 0.8, top_p))
        fast += int((probs > 0).sum(-1).max() < 64)
    assert vocab == 300 or fast > 5  # the top-k path was taken


def test_sorting_some_rows_orders_each_as_sorting_them_all():
    torch.manual_seed(0)
    probs = (torch.rand(5, 4096) * 30).round() / 30  # ~30 distinct values: long runs of ties
    values, ids = torch.sort(probs, dim=-1, descending=True)
    some = torch.tensor([False, True, False, True, True])
    assert all(torch.equal(a, b[some]) for a, b in zip(torch.sort(probs[some], dim=-1, descending=True), (values, ids)))


def test_bf16_logits_give_the_full_sorts_distribution(monkeypatch):
    # bf16 logits tie often, at the top-p cut too (where only a full sort says which tokens stay):
    # rows that need the sort and rows that do not, in one batch.
    # ATen's path (the CPU kernel, where it runs, gives the same numbers: tests/test_kernels.py).
    monkeypatch.setattr(kernels, "top_p_runs", lambda probs: False)
    sorted_rows, sort = [], torch.sort
    monkeypatch.setattr(torch, "sort", lambda p, **kw: sorted_rows.append(p.shape[0]) or sort(p, **kw))
    torch.manual_seed(0)
    total = 0
    for i in range(20):
        logits = (torch.randn(4, 4096) * torch.tensor([0.5, 3, 8, 12])[:, None]).bfloat16().float()
        probs = torch.softmax(logits / 0.6, dim=-1)
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
        probs_sort[probs_sort.cumsum(-1) - probs_sort > 0.9] = 0.0
        expected = torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort / probs_sort.sum(-1, keepdim=True))
        sorted_rows.clear()
        assert torch.equal(probs_from_logits(logits, 0.6, 0.9), expected)
        total += sum(sorted_rows)
    assert 20 <= total < 60  # the flat rows and some others were sorted, the rest were not


def _reference_support(logits, temperature, top_p) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    keep = torch.cumsum(probs_sort, dim=-1) - probs_sort <= top_p
    return torch.zeros_like(keep).scatter_(-1, probs_idx, keep)


def test_draw_follows_the_distribution_and_never_draws_zeros():
    from multitoken.sampling import draw

    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    counts = torch.bincount(draw(probs.expand(40_000, 6)), minlength=6).double()
    assert counts[probs == 0].sum() == 0
    expected = probs.double() * 40_000
    chi2 = float(((counts - expected)[probs > 0] ** 2 / expected[probs > 0]).sum())
    assert chi2 < 20, chi2
    # A uniform that rounds the cumulative mass up to the total still lands on a token of mass > 0.
    import unittest.mock

    with unittest.mock.patch("torch.rand", lambda *shape, **kw: torch.ones(*shape, **kw)):
        assert draw(probs[None]).tolist() == [4]
