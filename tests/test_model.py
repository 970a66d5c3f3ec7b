import pytest
import torch

from conftest import random_model, tiny_args
from multitoken.convert.hf import head_to_hf_state_dict, hf_llama_config
from multitoken.model import ModelArgs, Transformer


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_every_head_matches_transformers_llama(n_kv_heads):
    transformers = pytest.importorskip("transformers")
    args = tiny_args(n_kv_heads=n_kv_heads)
    model = random_model(args).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 33))
    with torch.no_grad():
        ours = model(tokens, return_all_heads=True)
    assert ours.shape == (2, 33, args.n_future_tokens, args.vocab_size) and ours.dtype == torch.float32
    for head in range(args.n_future_tokens):
        hf = transformers.LlamaForCausalLM(hf_llama_config(args)).eval()
        hf.load_state_dict(head_to_hf_state_dict(model.state_dict(), args, head), strict=True)
        with torch.no_grad():
            theirs = hf(tokens).logits
        torch.testing.assert_close(ours[:, :, head], theirs, atol=1e-4, rtol=0)


def test_heads_are_distinct_and_default_returns_next_token_head_only():
    model = random_model()
    tokens = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        all_heads = model(tokens, return_all_heads=True)
        head0 = model(tokens)
    assert head0.shape == (1, 10, 1, 300)
    torch.testing.assert_close(head0[:, :, 0], all_heads[:, :, 0], atol=0, rtol=0)
    assert not torch.allclose(all_heads[:, :, 0], all_heads[:, :, 1])


def test_block_layout_follows_the_release():
    args = ModelArgs(dim=64, n_layers=8, n_heads=4, vocab_size=50, n_future_tokens=4)
    model = Transformer(args)
    assert len(model.layers) == 5 and len(model.extra_heads) == 3
    assert model.heads[0] is model.layers[-1]
    keys = set(model.state_dict())
    assert "layers.4.attention.wq.weight" in keys and "extra_heads.2.feed_forward.w2.weight" in keys
    assert "layers.5.attention.wq.weight" not in keys
    # Same parameter count as the n=1 baseline with the same n_layers.
    baseline = Transformer(ModelArgs(dim=64, n_layers=8, n_heads=4, vocab_size=50, n_future_tokens=1))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in baseline.parameters())


def test_ffn_width_rounding_matches_llama_7b():
    assert ModelArgs(dim=4096, multiple_of=256).ffn_hidden_dim == 11008


@pytest.mark.parametrize("chunks", [[1] * 24, [5, 1, 7, 11], [24]])
def test_kv_cache_decoding_equals_full_forward_for_all_heads(chunks):
    model = random_model(dtype=torch.float64).eval()
    tokens = torch.randint(0, 300, (3, sum(chunks)))
    with torch.no_grad():
        full = model(tokens, return_all_heads=True)
        model.setup_caches(max_batch_size=3, max_seq_len=64)
        pieces, pos = [], 0
        for n in chunks:
            pieces.append(model(tokens[:, pos : pos + n], start_pos=pos, return_all_heads=True))
            pos += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_pairs_as_metas_complex_product_and_as_the_pairwise_formula(dtype):
    from multitoken.model import apply_rope, precompute_rope

    head_dim, theta = 16, 500.0
    x = torch.randn(2, 5, 3, head_dim).to(dtype)
    at = torch.tensor([[0, 1, 2, 3, 4], [7, 9, 30, 31, 2]])  # per-row positions
    out = apply_rope(x, precompute_rope(head_dim, 32, theta)[at])
    # Meta's reference: pairs as complex numbers times e^(i * position * theta^(-2j / head_dim)).
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    turn = torch.polar(torch.ones(32, head_dim // 2), torch.outer(torch.arange(32).float(), freqs))[at][:, :, None]
    ref = torch.view_as_real(torch.view_as_complex(x.float().reshape(2, 5, 3, -1, 2)) * turn).flatten(-2)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.type_as(x).float(), atol=atol, rtol=0)
    # The same float32 numbers as (x0 cos - x1 sin, x0 sin + x1 cos), bit for bit.
    angles = torch.outer(torch.arange(32).float(), freqs)[at][:, :, None]
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    pairwise = torch.stack([x0 * angles.cos() - x1 * angles.sin(), x0 * angles.sin() + x1 * angles.cos()], -1)
    assert torch.equal(out, pairwise.flatten(-2).type_as(x))


@pytest.mark.slow  # ~16 s: twelve fresh processes
def test_rope_table_is_accurate_in_every_fresh_process():
    # A process's first float32 cos/sin on the CPU, split between 2 threads, has computed the second
    # thread's half with ~1e-4 errors in about one process of three (torch 2.13, 209 positions): the table
    # is the first such call of a process that loads a model. Twelve fresh processes, every position.
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(2)\n"
        "from multitoken.model import precompute_rope\n"
        "t = precompute_rope(32, 209, 10000.0)[:, 0, 0, 0::2].double()\n"
        "f = 1.0 / 10000.0 ** (torch.arange(0, 32, 2).float() / 32)\n"
        "ref = torch.outer(torch.arange(209).float(), f).double().cos()\n"
        "print(int(((t - ref).abs().amax(-1) > 1e-6).sum()))\n"
    )
    # One after another: run side by side on a 2-core machine, the processes' threads seldom race.
    wrong_rows = [int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                     check=True).stdout) for _ in range(12)]
    assert wrong_rows == [0] * 12


def test_caches_take_the_model_dtype_and_rope_stays_float32():
    model = random_model().to(torch.bfloat16)
    model.setup_caches(2, 16)
    cache = model.extra_heads[0].attention.cache
    assert cache.k.dtype == torch.bfloat16 and cache.k.shape == (2, 2, 16, 16)
    assert model.rope.dtype == torch.float32


def test_copy_cache_rows_copies_every_block_up_to_end_and_nothing_else():
    model = random_model()
    model.setup_caches(3, 16)
    blocks = [*model.layers, *model.extra_heads]
    for block in blocks:
        block.attention.cache.k.normal_()
        block.attention.cache.v.normal_()
    before = [(b.attention.cache.k.clone(), b.attention.cache.v.clone()) for b in blocks]
    model.copy_cache_rows(torch.tensor([2]), torch.tensor([0]), end=5)
    for block, (k, v) in zip(blocks, before):
        cache = block.attention.cache
        assert torch.equal(cache.k[0, :, :5], k[2, :, :5]) and torch.equal(cache.v[0, :, :5], v[2, :, :5])
        assert torch.equal(cache.k[0, :, 5:], k[0, :, 5:]) and torch.equal(cache.v[0, :, 5:], v[0, :, 5:])
        assert torch.equal(cache.k[1:], k[1:]) and torch.equal(cache.v[1:], v[1:])
    model.copy_cache_rows(torch.tensor([1]), torch.tensor([0]))  # without end: the whole row
    assert all(torch.equal(b.attention.cache.k[0], k[1]) for b, (k, _) in zip(blocks, before))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_float32(dtype):
    model = random_model(std=0.02)
    tokens = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = model(tokens, return_all_heads=True)
        low = model.to(dtype)(tokens, return_all_heads=True)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_training_forward_backward_has_gradients_everywhere():
    model = random_model()
    tokens = torch.randint(0, 300, (2, 9))
    model(tokens, return_all_heads=True).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_positions_past_max_seq_len_and_batches_past_cache_are_rejected():
    model = random_model()
    model.setup_caches(max_batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_batch_size=1"):
        model(torch.zeros(2, 3, dtype=torch.long))


def test_invalid_model_args_are_explained():
    with pytest.raises(ValueError, match="n_future_tokens=9"):
        ModelArgs(n_layers=4, n_future_tokens=9)
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        ModelArgs(dim=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2))


def test_per_row_positions_match_each_row_decoded_alone():
    """Rows at different offsets in one forward (as batched speculation does) equal separate runs."""
    model = random_model(dtype=torch.float64).eval()
    seqs = [torch.randint(0, 300, (1, n)) for n in (9, 4, 13)]
    with torch.no_grad():
        alone = []
        for s in seqs:
            model.setup_caches(1, 32)
            model(s[:, :-3], 0, return_all_heads=True)
            alone.append(model(s[:, -3:], s.shape[1] - 3, return_all_heads=True))
        model.setup_caches(3, 32)
        for cache in (b.attention.cache for b in [*model.layers, *model.extra_heads]):
            cache.k.fill_(1e4), cache.v.fill_(1e4)  # any stale entry that is attended would show
        prefix = torch.zeros(3, 10, dtype=torch.long)
        for b, s in enumerate(seqs):
            prefix[b, : s.shape[1] - 3] = s[0, :-3]  # right-padded: padding lands past each row's end
        model(prefix, 0, return_all_heads=True)
        start = torch.tensor([s.shape[1] - 3 for s in seqs])
        together = model(torch.cat([s[:, -3:] for s in seqs]), start, return_all_heads=True)
    for b in range(3):
        torch.testing.assert_close(together[b : b + 1], alone[b], atol=1e-10, rtol=0)


def test_query_index_computes_one_token_per_row_and_still_caches_all():
    model = random_model(dtype=torch.float64).eval()
    tokens = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        model.setup_caches(2, 32)
        full = model(tokens, 0, return_all_heads=True)
        model.setup_caches(2, 32)
        pos = model.positions(torch.tensor([0, 0]), 2, 8)
        h = model.forward_trunk(tokens[:, :8], pos)
        index = torch.tensor([7, 3])
        picked = [model.logits(model.forward_head(i, h, pos, query_index=index)) for i in range(3)]
        # The head's cache holds keys for every token, so continuing from position 8 matches too.
        rest = model(tokens[:, 8:], torch.tensor([8, 8]), return_all_heads=True)
    for i in range(3):
        torch.testing.assert_close(picked[i][:, 0], full[[0, 1], [7, 3], i], atol=1e-10, rtol=0)
    torch.testing.assert_close(rest, full[:, 8:], atol=1e-10, rtol=0)


def test_query_index_refuses_a_shared_int_offset():
    model = random_model()
    model.setup_caches(1, 16)
    h = model.forward_trunk(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="query_index needs per-row positions"):
        model.forward_head(1, h, 0, query_index=torch.tensor([1]))
