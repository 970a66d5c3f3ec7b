import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_args
from multitoken.train.loss import IGNORE, forward_backward, head_targets, soft_head_targets


def _batch(seed: int, bsz: int = 2, seq: int = 12, extra: int = 1, vocab: int = 300):
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, vocab, (bsz, seq + extra), generator=g)
    return window[:, :seq], window[:, 1:]


def _reference_loss(model, inputs, labels, weights=None):
    """The definition, written independently: every head's logits from model.forward, head i at t vs
    labels[t + i], positions past the end dropped, mean per head, weighted sum."""
    logits = model(inputs, return_all_heads=True)  # (B, S, n, V)
    seq, n = inputs.shape[1], model.n_future_tokens
    total, per_head, acc = 0.0, [], []
    for i in range(n):
        m = min(seq, labels.shape[1] - i)
        lg, tg = logits[:, :m, i], labels[:, i : i + m]
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1))
        per_head.append(ce)
        acc.append((lg.argmax(-1) == tg).double().mean().item())
        total = total + (1.0 if weights is None else weights[i]) * ce
    return total, per_head, acc


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict, b: dict, rtol: float = 1e-6, atol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def test_head_targets_shift_and_ignore_past_the_end():
    labels = torch.arange(10, 16)[None]  # labels of 6 positions
    assert head_targets(labels, 0, 6).tolist() == [[10, 11, 12, 13, 14, 15]]
    assert head_targets(labels, 2, 6).tolist() == [[12, 13, 14, 15, IGNORE, IGNORE]]


@pytest.mark.parametrize("extra", [1, 3])  # windows of S + 1 (tail ignored) and S + n (none ignored)
def test_loss_and_accuracy_match_the_definition(extra):
    model = random_model(tiny_args(), dtype=torch.float64)
    inputs, labels = _batch(0, extra=extra)
    loss, stats = forward_backward(model, inputs, labels, backward=False)
    ref, ref_heads, ref_acc = _reference_loss(model, inputs, labels)
    assert stats.count.tolist() == [2 * min(12, 12 + extra - 1 - i) for i in range(3)]
    torch.testing.assert_close(torch.tensor(stats.losses, dtype=torch.float64), torch.stack(ref_heads).detach().double(), rtol=1e-6, atol=0)
    assert stats.accuracies == pytest.approx(ref_acc)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("chunk", [None, 5])
def test_per_head_backward_gives_the_plain_gradients_in_float64(chunk):
    model = random_model(tiny_args(), dtype=torch.float64)
    inputs, labels = _batch(1)
    weights = [1.0, 0.5, 0.25]
    ref, _, _ = _reference_loss(model, inputs, labels, weights)
    ref.backward()
    expected = _grads(model)
    assert len(expected) == len(list(model.parameters()))  # every parameter gets a gradient
    for per_head in (True, False):
        model.zero_grad(set_to_none=True)
        loss, _ = forward_backward(model, inputs, labels, weights=weights, per_head_backward=per_head, chunk=chunk)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        _assert_same_grads(_grads(model), expected)


def _reference_soft_loss(model, inputs, labels):
    """Soft targets by the definition: head i >= 1 at t against the next-token head's distribution at
    t + i (a constant), for every t with a target whose t + i is an input position; head 0 as before."""
    logits = model(inputs, return_all_heads=True)  # (B, S, n, V)
    teacher = logits[:, :, 0].detach().softmax(-1)
    seq = inputs.shape[1]
    total, per_head, hits = _reference_loss(model, inputs, labels)[1][0], [], []
    per_head.append(total)
    for i in range(1, model.n_future_tokens):
        m = min(seq - i, labels.shape[1] - i)
        lp = logits[:, :m, i].log_softmax(-1)
        ce = -(teacher[:, i : i + m] * lp).sum(-1).mean()
        per_head.append(ce)
        hits.append((lp.argmax(-1) == teacher[:, i : i + m].argmax(-1)).double().mean().item())
        total = total + ce
    return total, per_head, hits


@pytest.mark.parametrize("extra", [1, 3])
def test_soft_targets_match_the_definition_and_the_per_head_gradients(extra):
    model = random_model(tiny_args(), dtype=torch.float64)
    inputs, labels = _batch(6, extra=extra)
    ref, ref_heads, ref_hits = _reference_soft_loss(model, inputs, labels)
    ref.backward()
    expected = _grads(model)
    for per_head, chunk in ((True, None), (True, 5), (False, None)):
        model.zero_grad(set_to_none=True)
        loss, stats = forward_backward(model, inputs, labels, per_head_backward=per_head, chunk=chunk,
                                       soft_targets=1.0)
        assert stats.count.tolist() == [2 * min(12, 12 + extra - 1)] + [2 * (12 - i) for i in (1, 2)]
        torch.testing.assert_close(torch.tensor(stats.losses, dtype=torch.float64),
                                   torch.stack(ref_heads).detach().double(), rtol=1e-6, atol=0)
        assert stats.accuracies[1:] == pytest.approx(ref_hits)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        # The logits are float32 (Transformer.logits); summed in another order than the reference's.
        _assert_same_grads(_grads(model), expected, rtol=1e-4, atol=1e-6)


def test_a_share_of_soft_targets_mixes_the_two_losses():
    model = random_model(tiny_args(), dtype=torch.float64)
    inputs, labels = _batch(7)  # S + 1 windows: soft and token targets cover the same positions
    _, hard = forward_backward(model, inputs, labels, backward=False)
    _, soft = forward_backward(model, inputs, labels, backward=False, soft_targets=1.0)
    _, mixed = forward_backward(model, inputs, labels, backward=False, soft_targets=0.25)
    assert soft.losses[0] == hard.losses[0] == mixed.losses[0]  # the next-token head keeps its tokens
    assert soft.losses[1] != pytest.approx(hard.losses[1], rel=1e-3)
    for i in (1, 2):  # cross-entropy is linear in the target
        assert mixed.losses[i] == pytest.approx(0.25 * soft.losses[i] + 0.75 * hard.losses[i], rel=1e-6)
    with pytest.raises(ValueError, match="soft_targets must be in"):
        forward_backward(model, inputs, labels, backward=False, soft_targets=1.5)


def test_soft_head_targets_are_the_teacher_shifted_and_mixed_with_the_token():
    teacher = torch.rand(1, 4, 3)
    hard = torch.tensor([[1, 2, IGNORE, IGNORE]])
    got = soft_head_targets(teacher, hard, 1)
    assert torch.equal(got[0, :2], teacher[0, 1:3]) and not got[0, 2:].any()
    half = soft_head_targets(teacher, hard, 1, 0.5)
    torch.testing.assert_close(half[0, :2], 0.5 * teacher[0, 1:3] + 0.5 * torch.eye(3)[[1, 2]])
    assert not half[0, 2:].any()


def test_gradient_accumulation_over_two_micro_batches_matches_the_plain_path():
    model = random_model(tiny_args(), dtype=torch.float64)
    batches = [_batch(2), _batch(3)]
    for inputs, labels in batches:
        (_reference_loss(model, inputs, labels)[0] / 2).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    for inputs, labels in batches:
        forward_backward(model, inputs, labels, loss_scale=0.5, chunk=4)
    _assert_same_grads(_grads(model), expected)


def test_frozen_trunk_trains_only_heads_with_the_same_head_gradients():
    model = random_model(tiny_args(), dtype=torch.float64)
    inputs, labels = _batch(4)
    _reference_loss(model, inputs, labels)[0].backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    head_params = {id(p) for h in model.heads for p in h.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    forward_backward(model, inputs, labels)
    got = _grads(model)
    assert got.keys() == {k for k, p in model.named_parameters() if id(p) in head_params}
    _assert_same_grads(got, {k: expected[k] for k in got})


def test_bf16_autocast_runs_and_stays_close_to_float32():
    model = random_model(tiny_args(), std=0.02)
    inputs, labels = _batch(5, seq=16)
    loss32, _ = forward_backward(model, inputs, labels)
    g32 = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, stats = forward_backward(model, inputs, labels, chunk=8)
    g16 = _grads(model)
    assert torch.isfinite(loss16) and all(torch.isfinite(g).all() for g in g16.values())
    assert all(g.dtype == torch.float32 for g in g16.values())  # master weights and grads stay float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.02)
    flat32, flat16 = torch.cat([g.flatten() for g in g32.values()]), torch.cat([g.flatten() for g in g16.values()])
    assert F.cosine_similarity(flat32, flat16, dim=0) > 0.98


def test_bad_shapes_and_weights_are_value_errors():
    model = random_model(tiny_args())
    inputs, labels = _batch(6)
    with pytest.raises(ValueError, match="3 heads"):
        forward_backward(model, inputs, labels, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="must cover every input"):
        forward_backward(model, inputs, labels[:, :5])
