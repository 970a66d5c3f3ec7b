import pytest
import torch

from conftest import random_model, tiny_args
from multitoken import grouped_heads, kernels
from multitoken.kernels import attention, attention_group, linear_group, pack_weight
from multitoken import steps as steps_module
from multitoken.steps import DecodeSteps, draft_logits

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="the packed kernel needs x86-64 Linux with avx512_bf16")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_a_group_of_products_is_each_product_bit_for_bit(rows):
    torch.manual_seed(0)
    linears = [torch.nn.Linear(96, 200, bias=False).to(torch.bfloat16) for _ in range(3)]
    kernels.use_packed_matmuls(linears)
    x = torch.randn(3, 2, rows, 96).to(torch.bfloat16)
    with torch.inference_mode():
        got = linear_group(x, linears)
        assert got.shape == (3, 2, rows, 200)
        for g, linear in enumerate(linears):
            assert torch.equal(got[g], linear(x[g]))


@needs_kernel
def test_a_group_of_products_refuses_mismatched_weights():
    w = torch.randn(64, 32).to(torch.bfloat16)
    x = torch.randn(2, 1, 32).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="x must be \\(G, ..., k\\) for G = 3"):
        torch.ops.multitoken.packed_linear_group(x, [pack_weight(w)] * 3, 64)
    with pytest.raises(RuntimeError, match="64 outputs do not match 2 packed tiles"):
        torch.ops.multitoken.packed_linear_group(x, [pack_weight(w), pack_weight(torch.randn(200, 32).to(torch.bfloat16))], 64)


@needs_kernel
@pytest.mark.parametrize("n_q", [1, 4])
def test_a_group_of_attentions_is_each_layers_bit_for_bit(n_q):
    torch.manual_seed(0)
    batch, heads, kv_heads, keys, dim = 2, 8, 4, 37, 32
    q = torch.randn(3, batch, n_q, heads, dim).to(torch.bfloat16).transpose(2, 3)
    caches = torch.randn(3, 2, batch, kv_heads, keys + 5, dim).to(torch.bfloat16)
    ks, vs = [c[0, :, :, :keys] for c in caches], [c[1, :, :, :keys] for c in caches]
    mask = torch.rand(batch, 1, n_q, keys) < 0.7
    mask[..., 0] = True
    with torch.inference_mode():
        got = attention_group(q, ks, vs, mask)
        for g in range(3):
            assert torch.equal(got[g], attention(q[g], ks[g], vs[g], mask))
        # The output projection reads it as (G, batch, n_q, heads * dim) without a copy, as for one layer.
        assert got.transpose(2, 3).is_contiguous()


def _drafts(model, grouped: bool, compile: bool, monkeypatch) -> list[torch.Tensor]:
    """Drafts of a batch of 3 at ragged positions, after a prefill and after verify steps, each row's
    drafts at its own token; a greedy step; and the extra heads' caches after them."""
    model.setup_caches(3, 96)
    steps = DecodeSteps(model, compile=compile, group_heads=grouped)
    calls = []
    forward = grouped_heads.forward
    # Grouped: the grouped path runs (traced, when compiled); one by one: nothing runs it behind our back.
    monkeypatch.setattr(grouped_heads, "forward",
                        lambda *args: calls.append(1) or forward(*args) if grouped else pytest.fail("heads grouped"))
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    outs = []
    with torch.inference_mode():
        pos = model.positions(torch.zeros(3, dtype=torch.long), 3, 20)
        h = model.forward_trunk(torch.randint(0, vocab, (3, 20), generator=g), pos)
        outs.append(draft_logits(model, h, pos, torch.tensor([19, 11, 4]), 2, grouped=grouped))
        start = torch.tensor([20, 12, 5])
        for i in range(3):
            span = steps.span(int(start.max()) + 4)
            h, _ = steps.step(torch.randint(0, vocab, (3, 4), generator=g), start, span=span)
            index = torch.tensor([i, 3 - i, 2])
            outs.append(steps.draft(h, start, index, 3, span=span))
            start = start + index + 1
        outs += steps.greedy(torch.randint(0, vocab, (3, 4), generator=g), start, 3, span=steps.span(int(start.max()) + 4))
    monkeypatch.undo()
    assert bool(calls) == grouped
    return outs + [b.attention.cache.k.clone() for b in model.extra_heads] + [b.attention.cache.v.clone() for b in model.extra_heads]


@needs_kernel
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_grouped_heads_draft_what_the_heads_one_by_one_draft(compile, monkeypatch):
    args = tiny_args(n_future_tokens=4, n_layers=6, dim=64, n_heads=4, n_kv_heads=2)
    model = random_model(args, dtype=torch.bfloat16, std=0.3)
    grouped = _drafts(model, True, compile, monkeypatch)
    one_by_one = _drafts(random_model(args, dtype=torch.bfloat16, std=0.3), False, compile, monkeypatch)
    assert len(grouped) == len(one_by_one)
    for a, b in zip(grouped, one_by_one):
        assert torch.equal(a, b)


@needs_kernel
def test_grouped_heads_run_only_where_the_kernels_do():
    model = random_model(tiny_args(n_future_tokens=4), dtype=torch.bfloat16)
    model.setup_caches(1, 32)
    h = torch.randn(1, 4, model.args.dim).to(torch.bfloat16)
    heads = list(model.extra_heads)
    DecodeSteps(model)
    with torch.inference_mode():
        assert grouped_heads.usable(heads, h)
        assert not grouped_heads.usable(heads, h.float())
        assert not grouped_heads.usable([], h)
    assert not grouped_heads.usable(heads, h)  # gradients on
    DecodeSteps(model, cpu_kernels=False)
    with torch.inference_mode():
        assert not grouped_heads.usable(heads, h)


@needs_kernel
def test_grouped_heads_in_one_kernel_call_are_the_grouped_path_bit_for_bit():
    # Eager steps run the grouped heads as one call (`head_group`); the same operations from Python
    # must give the same drafts and caches, bit for bit.
    args = tiny_args(n_future_tokens=4, n_layers=6, dim=64, n_heads=4, n_kv_heads=2)
    calls, one_call = [], grouped_heads._one_call
    with pytest.MonkeyPatch.context() as m:
        m.setattr(grouped_heads, "_one_call", lambda *a: calls.append(1) or one_call(*a))
        one = _drafts(random_model(args, dtype=torch.bfloat16, std=0.3), True, False, pytest.MonkeyPatch())
    assert len(calls) == 5  # the prefill's drafts, three steps' and a greedy step's
    with pytest.MonkeyPatch.context() as m:
        m.setattr(grouped_heads, "_in_one_call", lambda *a: False)
        python = _drafts(random_model(args, dtype=torch.bfloat16, std=0.3), True, False, pytest.MonkeyPatch())
    assert len(one) == len(python) and all(torch.equal(a, b) for a, b in zip(one, python))


@needs_kernel
@pytest.mark.parametrize("one_call", [True, False])
def test_grouped_heads_at_every_token_are_each_heads_block(one_call, monkeypatch):
    # A greedy step runs every head, the next-token head too, at every token in one computation; each
    # token's output must be what that head's block gives it, bit for bit, whichever way it runs.
    args = tiny_args(n_future_tokens=4, n_layers=6, dim=64, n_heads=4, n_kv_heads=2)
    model = random_model(args, dtype=torch.bfloat16, std=0.3)
    model.setup_caches(3, 64)
    DecodeSteps(model)
    if not one_call:
        monkeypatch.setattr(grouped_heads, "_in_one_call", lambda *a: False)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        pos = model.positions(torch.tensor([9, 0, 30]), 3, 5)  # ragged rows
        model.forward_trunk(torch.randint(0, args.vocab_size, (3, 40), generator=g), 0)
        h = model.forward_trunk(torch.randint(0, args.vocab_size, (3, 5), generator=g), pos)
        heads = model.heads
        assert grouped_heads.usable(heads, h)
        got = grouped_heads.forward(heads, h, pos)
        assert got.shape == (3, 5, 4, args.dim)
        for i in range(4):
            assert torch.equal(got[:, :, i], model.forward_head(i, h, pos))
        # and a token a row, as drafting after acceptance asks for it
        index = torch.tensor([4, 0, 2])
        assert torch.equal(grouped_heads.forward(heads[1:], h, pos, index), got[torch.arange(3), index, 1:])


@needs_kernel
def test_greedy_step_with_every_head_at_every_token_is_drafting_after_acceptance(monkeypatch):
    args = tiny_args(n_future_tokens=4, n_layers=6, dim=64, n_heads=4, n_kv_heads=2)
    runs = []
    for every_token in (True, False):
        monkeypatch.setattr(steps_module, "ALL_HEADS_MAX_ROWS", 16 if every_token else 0)
        calls = []
        forward = grouped_heads.forward
        monkeypatch.setattr(grouped_heads, "forward", lambda *a: calls.append(len(a)) or forward(*a))
        model = random_model(args, dtype=torch.bfloat16, std=0.3)
        model.setup_caches(3, 64)
        steps = DecodeSteps(model)
        g = torch.Generator().manual_seed(0)
        out = []
        with torch.inference_mode():
            model.forward_trunk(torch.randint(0, args.vocab_size, (3, 30), generator=g), 0)
            start = torch.tensor([30, 12, 5])
            for step, k in enumerate((3, 2, 3)):
                # Drafts the next-token head agrees with: (step + b) % 4 of row b's, from plain steps.
                tokens = torch.randint(0, args.vocab_size, (3, 4), generator=g)
                for i in range(3):
                    _, logits = steps.step(tokens[:, i : i + 1], start + i)
                    agree = torch.tensor([i < (step + b) % 4 for b in range(3)])
                    tokens[:, i + 1] = torch.where(agree, logits[:, 0].argmax(-1), tokens[:, i + 1])
                out += steps.greedy(tokens, start, k)
                assert out[-2].tolist() == [(step + b) % 4 for b in range(3)]
                start = start + out[-2] + 1
        monkeypatch.undo()
        # every head at every token: forward without an index; else the drafts' heads at one token each
        assert calls == [3] * 3 if every_token else calls == [4] * 3
        runs.append(out + [b.attention.cache.k.clone() for b in model.heads])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
