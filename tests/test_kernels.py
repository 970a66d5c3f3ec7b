import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_model, tiny_args
from multitoken import kernels
from multitoken.generation import Llama
from multitoken.kernels import (
    ATTENTION_MAX_QUERIES,
    PACKED_MAX_ROWS,
    KernelBlock,
    KernelKVCache,
    KernelRMSNorm,
    PackedLinear,
    attention,
    pack_weight,
    use_packed_matmuls,
)
from multitoken.model import KVCache, Positions, RMSNorm, TransformerBlock, apply_rope, precompute_rope, scaled_dot_product
from multitoken.steps import DecodeSteps, block_products, inference_products
from test_generation import IdTokenizer

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="the packed kernel needs x86-64 Linux with avx512_bf16")


def _packed(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    use_packed_matmuls([linear])
    return linear


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17, PACKED_MAX_ROWS])
@pytest.mark.parametrize("shape", [(1536, 256), (100, 64), (17, 2), (48, 770)])
def test_packed_linear_computes_the_linear_map(rows, shape):
    linear = _packed(*shape)
    x = torch.randn(rows, shape[1]).to(torch.bfloat16)
    expected = x.double() @ linear.weight.double().T
    with torch.inference_mode():
        got = linear(x)
    assert got.shape == (rows, shape[0]) and got.dtype == torch.bfloat16
    # float32 sums of bf16 products, rounded once to bf16: within bf16's half-ulp of the exact product.
    torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=1e-6 * expected.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("in_features", [128, 130])  # on CPUs with AMX: its tiles, then vdpbf16ps (130 = 2 mod 32)
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(in_features):
    linear = _packed(300, in_features)
    x = torch.randn(2, 21, in_features).to(torch.bfloat16)  # 42 rows: groups of 16 (AMX) and of 8 and a rest
    with torch.inference_mode():
        together = linear(x)
        for b in range(2):
            for t in range(21):
                assert torch.equal(linear(x[b, t:t + 1]), together[b, t:t + 1])
        assert torch.equal(linear(x[:, 3:7]), together[:, 3:7])
        assert torch.equal(linear(x[1]), together[1])


@needs_kernel
def test_packed_linear_is_nn_linear_with_gradients_or_many_rows():
    linear = _packed(64, 32)
    x = torch.randn(4, 32).to(torch.bfloat16)
    y = linear(x)  # gradients on: nn.Linear, differentiable
    assert y.grad_fn is not None and torch.equal(y, F.linear(x, linear.weight))
    many = torch.randn(PACKED_MAX_ROWS + 1, 32).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(linear(many), F.linear(many, linear.weight))


@needs_kernel
def test_the_packed_copy_follows_the_weight():
    linear = _packed(64, 32)
    x = torch.randn(3, 32).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.mul_(-2)  # an in-place update, as an optimizer's
        torch.testing.assert_close(linear(x).double(), x.double() @ linear.weight.double().T, rtol=2**-8, atol=1e-3)
    linear.float()  # not bf16: the copy is dropped, the layer is nn.Linear's map
    assert linear.packed is None
    with torch.no_grad():
        assert torch.equal(linear(x.float()), F.linear(x.float(), linear.weight))


@needs_kernel
def test_packing_keeps_parameters_and_state_dict_and_can_be_undone():
    model = random_model(dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_packed_matmuls(inference_products(model))
    assert isinstance(model.output, PackedLinear) and isinstance(model.layers[0].attention.wq, PackedLinear)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    use_packed_matmuls(inference_products(model), packed=False)
    assert type(model.output) is nn.Linear and not hasattr(model.output, "packed")


def test_packed_kernel_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="even number of input features, got 5"):
        pack_weight(torch.zeros(8, 5, dtype=torch.bfloat16))
    linear = nn.Linear(5, 8, bias=False).to(torch.bfloat16)
    if kernels.available():
        use_packed_matmuls([linear])  # left to ATen
        assert type(linear) is nn.Linear


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MULTITOKEN_KERNELS", "0")
    kernels.available.cache_clear()
    try:
        assert not kernels.available()
        with pytest.raises(RuntimeError, match="does not run on this host"):
            use_packed_matmuls([nn.Linear(4, 4)])
        model = random_model(dtype=torch.bfloat16)
        model.setup_caches(1, 32)
        assert not DecodeSteps(model).cpu_kernels
    finally:
        kernels.available.cache_clear()


def _attention_inputs(batch, heads, kv_heads, n_q, keys, dim, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(batch, n_q, heads, dim).to(torch.bfloat16).transpose(1, 2)  # as Attention.attend passes it
    cache = torch.randn(2, batch, kv_heads, keys + 9, dim).to(torch.bfloat16)  # a span of a longer cache
    mask = torch.rand(batch, 1, n_q, keys) < 0.6
    mask[..., 0] = True
    return q, cache[0, :, :, :keys], cache[1, :, :, :keys], mask


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 8, 4, 1, 144, 32), (2, 8, 8, 9, 40, 64), (3, 32, 8, 2, 100, 128), (1, 4, 4, 17, 23, 16)])
def test_attention_matches_a_float64_reference(shape):
    q, k, v, mask = _attention_inputs(*shape)
    with torch.inference_mode():
        got = attention(q, k, v, mask)
        n_q = q.shape[2]
        causal = attention(q, k[:, :, -n_q - 3:], v[:, :, -n_q - 3:], None)  # the queries are the last tokens
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), scaled_dot_product(q.double(), k.double(), v.double(), mask), rtol=2e-2, atol=1e-2)
    # Without a mask query t sees every key up to its own position, keys - n_q + t.
    keys = n_q + 3
    causal_mask = torch.arange(keys) <= torch.arange(n_q)[:, None] + keys - n_q
    expected = scaled_dot_product(q.double(), k[:, :, -keys:].double(), v[:, :, -keys:].double(), causal_mask)
    torch.testing.assert_close(causal.double(), expected, rtol=2e-2, atol=1e-2)


@needs_kernel
def test_a_querys_attention_does_not_depend_on_the_queries_beside_it():
    q, k, v, mask = _attention_inputs(2, 8, 4, 9, 77, 32)
    with torch.inference_mode():
        together = attention(q, k, v, mask)
        for t in range(9):
            assert torch.equal(attention(q[:, :, t:t + 1], k, v, mask[:, :, t:t + 1]), together[:, :, t:t + 1])
        assert torch.equal(attention(q[1:], k[1:], v[1:], mask[1:]), together[1:])


@needs_kernel
@pytest.mark.parametrize("dim", [64, 128])  # head_dim 16, and 32: attention scores on AMX tiles where the CPU has them
def test_a_tree_nodes_logits_are_a_1_token_steps_bit_for_bit(dim):
    # A draft tree's node sees the prompt and its ancestors, whose slots have other nodes between them; a
    # 1-token step sees the same keys in consecutive slots. Its logits must be the same bit for bit (the
    # attention kernel's part of it: test_a_querys_attention_does_not_depend_on_the_slots_of_the_keys_it_sees).
    from multitoken.tree import Tree, tree_positions

    model = random_model(tiny_args(n_future_tokens=2, dim=dim, n_heads=4, n_kv_heads=2), dtype=torch.bfloat16, std=0.3)
    model.setup_caches(1, 256)
    DecodeSteps(model)
    torch.manual_seed(0)
    differ = 0
    with torch.inference_mode():
        for trial in range(40):
            prompt_len, nodes = 40 + 3 * trial, 9 + trial % 9
            model(torch.randint(0, 300, (1, prompt_len)), 0)
            tokens = torch.randint(0, 300, (1, nodes))
            tokens[0, nodes - 1] = tokens[0, 1]  # the last node: another child of the root, slots away from it
            tree = Tree(torch.tensor([[0] * nodes]), torch.tensor([[0] + [1] * (nodes - 1)]),
                        torch.tensor([[0] + list(range(nodes - 1))]), tokens)
            pos = tree_positions(model, tree, torch.tensor([prompt_len]))
            logits = model.logits(model.forward_head(0, model.forward_trunk(tokens, pos), pos))
            # The same two tokens as 1-token steps, overwriting the tree's slots.
            model(tokens[:, :1], prompt_len)
            step = model(tokens[:, 1:2], prompt_len + 1)[:, 0, 0]
            assert torch.equal(logits[:, 1], step) and torch.equal(logits[:, nodes - 1], step), trial
            differ += int(not torch.equal(logits[:, 1], logits[:, 0]))
    assert differ > 0


@needs_kernel
def test_a_querys_attention_does_not_depend_on_the_slots_of_the_keys_it_sees():
    # The same keys in the same order, in consecutive slots or among masked ones, give the same output.
    differ = 0
    for seed in range(300):
        keys = 40 + seed % 200
        q, k, v, _ = _attention_inputs(1, 32, 8, 1, keys, 64, seed=seed)
        seen = torch.rand(keys) < 0.8
        seen[0] = True
        order = torch.cat([seen.nonzero()[:, 0], (~seen).nonzero()[:, 0]])  # the seen keys first, in order
        compact_mask = (torch.arange(keys) < int(seen.sum())).view(1, 1, 1, keys)
        with torch.inference_mode():
            scattered = attention(q, k, v, seen.view(1, 1, 1, keys))
            compact = attention(q, k[:, :, order], v[:, :, order], compact_mask)
        differ += int(not torch.equal(scattered, compact))
    assert differ == 0


def test_attention_is_scaled_dot_product_elsewhere():
    q, k, v, mask = _attention_inputs(1, 4, 2, ATTENTION_MAX_QUERIES + 1, 80, 16)
    with torch.inference_mode():
        assert torch.equal(attention(q, k, v, mask), scaled_dot_product(q, k, v, mask))  # too many queries
        q32, k32, v32 = q[:, :, :3].float(), k.float(), v.float()
        assert torch.equal(attention(q32, k32, v32, mask[:, :, :3]), scaled_dot_product(q32, k32, v32, mask[:, :, :3]))
    q, k, v, mask = _attention_inputs(1, 4, 2, 2, 30, 16)
    assert torch.equal(attention(q, k, v, mask), scaled_dot_product(q, k, v, mask))  # gradients on


@needs_kernel
@pytest.mark.parametrize("compiled, dim", [(False, 64), (False, 128), pytest.param(True, 64, marks=pytest.mark.slow)])
def test_bf16_self_speculation_gives_plain_decodings_tokens(compiled, dim):
    # Every product and attention of a verify step computes each token as a 1-token step does, so in
    # bf16 too the chain and the tree emit exactly plain greedy decoding's tokens (ATen's bf16 kernels
    # round multi-token steps differently, and decodings part at near-ties).
    model = random_model(tiny_args(n_future_tokens=4, dim=dim, n_heads=4, n_kv_heads=2), dtype=torch.bfloat16, std=0.3)
    model.setup_caches(3, 128)
    llama = Llama(model, IdTokenizer())
    if compiled:
        llama.compile()
    assert llama.steps.cpu_kernels and isinstance(model.output, PackedLinear)
    assert all(block.attention.sdpa is attention for block in model.layers)
    prompts = [[1, 5, 9, 200, 7, 7], [1, 7], [1, 100, 101, 102]]
    plain, _ = llama.generate(prompts, max_gen_len=48, temperature=0)
    assert llama.generate(prompts, max_gen_len=48, temperature=0, speculative=True)[0] == plain
    assert llama.generate(prompts[:1], max_gen_len=48, temperature=0, tree=6)[0] == plain[:1]
    if not compiled:  # (each tree shape is a graph of its own: CI's time)
        assert llama.generate(prompts[1:], max_gen_len=48, temperature=0, tree=[[0], [1], [0, 0]])[0] == plain[1:]


@needs_kernel
@pytest.mark.parametrize("x_shape, rows_shape", [((3, 5, 4, 32), (5,)), ((3, 5, 4, 32), (3, 5)),
                                                 ((2, 3, 5, 8, 16), (3, 5)), ((2, 3, 5, 8, 16), (5,))])
def test_rotation_kernel_is_apply_rope_bit_for_bit(x_shape, rows_shape):
    torch.manual_seed(0)
    table = precompute_rope(x_shape[-1], 256, 1e4)
    rope = table[torch.randint(0, 256, rows_shape)]
    x = (torch.randn(x_shape) * 4).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(kernels.rotate(x, rope), apply_rope(x, rope))
        # Keys and values come out of one fused product: a slice of each row, not a contiguous tensor.
        qkv = (torch.randn(*x_shape[:-2], 3 * x_shape[-2] * x_shape[-1]) * 4).to(torch.bfloat16)
        k = qkv[..., x_shape[-2] * x_shape[-1]: 2 * x_shape[-2] * x_shape[-1]].unflatten(-1, x_shape[-2:])
        assert not k.is_contiguous() and torch.equal(kernels.rotate(k, rope), apply_rope(k, rope))
    assert torch.equal(kernels.rotate(x.float(), rope), apply_rope(x.float(), rope))  # float32: apply_rope itself


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, any NaN matching any NaN."""
    nan = torch.isnan(a.float()) & torch.isnan(b.float())
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | nan).all())


@needs_kernel
def test_silu_mul_and_add_kernels_are_atens_for_every_bf16_value():
    """The block kernel's feed-forward activation and residual adds give eager ATen's bits for every
    bf16 gate value (denormals included, which the CPU's own bf16 conversion flushes to zero)."""
    torch.manual_seed(0)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gate = every.view(-1, 32)  # hidden 32
    for scale in (1.0, 1e3):
        up = (torch.randn(gate.shape) * scale).to(torch.bfloat16)
        with torch.inference_mode():
            out = torch.ops.multitoken.silu_mul(torch.cat([gate, up], -1).view(64, 32, 64))
            assert _same_bits(out.view(-1, 32), F.silu(gate) * up)
            other = every[torch.randperm(every.numel())].view(-1, 32)
            assert _same_bits(torch.ops.multitoken.add_bf16(gate, other), gate + other)
    with pytest.raises(RuntimeError, match="hidden a multiple of 16"):
        torch.ops.multitoken.silu_mul(torch.zeros(2, 40, dtype=torch.bfloat16))


@needs_kernel
def test_norm_kernel_is_rmsnorm_row_by_row():
    torch.manual_seed(0)
    norms = [RMSNorm(64).to(torch.bfloat16) for _ in range(3)]
    with torch.no_grad():
        for n in norms:
            n.weight.normal_()
    x = (torch.randn(4, 7, 64) * torch.rand(4, 7, 1) * 8).to(torch.bfloat16)
    fast = KernelRMSNorm(64).to(torch.bfloat16)
    fast.load_state_dict(norms[0].state_dict())
    with torch.inference_mode():
        got, expected = fast(x), norms[0](x)
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        # Its sum of squares runs in its own order: at most one bf16 rounding step from ATen's result.
        torch.testing.assert_close(got, expected, rtol=8e-3, atol=1e-6)
        assert (got != expected).float().mean() < 0.01
        assert torch.equal(fast(x[2:3, 4:5]), got[2:3, 4:5])  # a row's result does not depend on the others
        every = kernels.rms_norm(x, norms)  # each norm on the same rows
        per_group = kernels.rms_norm(x[:3], norms, per_group=True)  # norm g on x[g]
        for g, n in enumerate(norms):
            torch.testing.assert_close(every[g], n(x), rtol=8e-3, atol=1e-6)
            assert torch.equal(per_group[g], every[g, g])
    # With gradients on (training) it is RMSNorm exactly.
    assert torch.equal(fast(x), norms[0](x))


@needs_kernel
@pytest.mark.parametrize("rows", [None, torch.tensor([3, 0])])
def test_cache_kernel_stores_what_kvcache_stores(rows):
    torch.manual_seed(0)
    caches = [KVCache(4, 32, 2, 16, torch.bfloat16, "cpu") for _ in range(2)]
    kernels.use_kernel_modules(caches[1:])
    assert type(caches[1]) is KernelKVCache
    slots = torch.tensor([[5, 6, 9], [20, 21, 22]])
    pos = Positions(slots, torch.empty(0), torch.ones(2, 1, 3, 32, dtype=torch.bool), rows)
    fused = (torch.randn(2, 3, 4, 2, 16) * 3).to(torch.bfloat16)  # k and v as slices of one product
    k, v = fused[:, :, 1].transpose(1, 2), fused[:, :, 3].transpose(1, 2)
    with torch.inference_mode():
        out = [cache.update(pos, k, v) for cache in caches]
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert all(torch.equal(a, b) for a, b in zip(*out))
    assert caches[1].k.abs().sum() > 0
    if rows is None:  # every row at one position, as a plain decoding step or a prefill stores them
        with torch.inference_mode():
            out = [cache.update(Positions(11, pos.rope, None), k, v) for cache in caches]
        assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
        assert all(torch.equal(a, b) for a, b in zip(*out)) and out[0][0].shape == (2, 2, 14, 16)
    before = caches[1].k.clone()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="slot 40 is past the cache's 32"):
        caches[1].update(Positions(slots + 20, pos.rope, pos.mask, rows), k, v)
    assert torch.equal(caches[1].k, before)  # refused whole: row 0's slots were in range, and not written


@needs_kernel
def test_steps_without_cpu_kernels_are_atens_again():
    model = random_model(dtype=torch.bfloat16)
    model.setup_caches(1, 32)
    steps = DecodeSteps(model)
    # The products a step runs: fused q, k, v (and w1, w3) by default, eagerly too.
    assert steps.cpu_kernels and all(isinstance(m, PackedLinear) for m in block_products(model.layers[0]))
    assert model.layers[0].attention.wqkv in block_products(model.layers[0])
    assert type(model.norm) is KernelRMSNorm and type(model.extra_heads[0].attention.cache) is KernelKVCache
    assert model.layers[0].attention.rotate is kernels.rotate
    steps = DecodeSteps(model, cpu_kernels=False)
    assert not steps.cpu_kernels and all(type(m) is nn.Linear for m in block_products(model.layers[0]))
    assert model.layers[0].attention.sdpa is scaled_dot_product
    assert type(model.norm) is RMSNorm and type(model.extra_heads[0].attention.cache) is KVCache
    assert model.layers[0].attention.rotate is apply_rope


class _CallCounter:
    """Stands in for torch.ops.multitoken.block: counts the calls of its `default` and makes them."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def default(self, *args):
        self.calls += 1
        return self.op.default(*args)


@needs_kernel
@pytest.mark.parametrize("where", ["one token", "prompt", "own offsets", "cache rows", "tree", "int start, 3 tokens"])
def test_block_kernel_is_the_blocks_forward_bit_for_bit(monkeypatch, where):
    model = random_model(tiny_args(n_future_tokens=2), dtype=torch.bfloat16, std=0.3)
    model.setup_caches(4, 64)
    DecodeSteps(model)
    block = model.layers[1]
    assert type(block) is KernelBlock
    torch.manual_seed(0)
    seq = {"one token": 1, "prompt": 6, "int start, 3 tokens": 3}.get(where, 4)
    with torch.inference_mode():
        model(torch.randint(0, 300, (3, 20)), 0)  # something in the caches to attend
        if where == "one token":
            pos = model.positions(20, 3, seq)
        elif where == "prompt":
            pos = model.positions(0, 3, seq)
        elif where == "int start, 3 tokens":
            pos = model.positions(20, 3, seq)
        elif where == "own offsets":
            pos = model.positions(torch.tensor([20, 14, 17]), 3, seq)
        elif where == "cache rows":
            pos = model.positions(torch.tensor([20, 14, 17]), 3, seq, rows=torch.tensor([2, 0, 3]))
        else:  # siblings that share a position, each seeing the prompt, its ancestors and itself
            slots = torch.tensor([[20, 21, 22, 23]] * 3)
            at = torch.tensor([[20, 21, 21, 22]] * 3)
            tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
            mask = torch.cat([torch.ones(3, 4, 20, dtype=torch.bool), tree.expand(3, 4, 4)], dim=-1)
            pos = model.positions_at(slots, at, mask)
        x = (torch.randn(3, seq, 64) * 2).to(torch.bfloat16)
        cache = block.attention.cache
        before = cache.k.clone(), cache.v.clone()
        counter = _CallCounter(torch.ops.multitoken.block)
        monkeypatch.setattr(torch.ops.multitoken, "block", counter)
        got, got_k, got_v = block(x, pos), cache.k.clone(), cache.v.clone()
        assert counter.calls == 1
        cache.k.copy_(before[0]), cache.v.copy_(before[1])
        expected = TransformerBlock.forward(block, x, pos)
    assert torch.equal(got, expected) and torch.equal(got_k, cache.k) and torch.equal(got_v, cache.v)
    assert not torch.equal(got_k, before[0])


@needs_kernel
def test_block_kernel_leaves_what_it_does_not_cover_to_the_block(monkeypatch):
    model = random_model(tiny_args(n_future_tokens=2), dtype=torch.bfloat16, std=0.3)
    model.setup_caches(2, 128)
    steps = DecodeSteps(model)
    counter = _CallCounter(torch.ops.multitoken.block)
    monkeypatch.setattr(torch.ops.multitoken, "block", counter)
    with torch.no_grad():
        model(torch.randint(0, 300, (2, 70)), 0)  # a prompt past PACKED_MAX_ROWS tokens: ATen's products
        assert counter.calls == 0
        pos = model.positions(torch.tensor([70, 60]), 2, 3)
        h = model.forward_trunk(torch.randint(0, 300, (2, 3)), pos)
        calls = counter.calls
        assert calls == len(model.layers) - 1
        model.forward_head(1, h, pos, torch.tensor([2, 0]))  # an extra head at one token per row
        assert counter.calls == calls
    model.forward_trunk(torch.randint(0, 300, (2, 3)), pos)  # gradients on
    assert counter.calls == calls
    DecodeSteps(model, cpu_kernels=False)
    assert not any(type(b) is KernelBlock for b in [*model.layers, *model.extra_heads])
    assert steps is not None


def _aten_probs_from_logits(monkeypatch, logits, temperature, top_p):
    from multitoken.sampling import probs_from_logits

    with monkeypatch.context() as m:
        m.setattr(kernels, "top_p_runs", lambda probs: False)
        return probs_from_logits(logits, temperature, top_p)


@needs_kernel
@pytest.mark.parametrize("vocab", [7, 300, 4096, 49152])
def test_top_p_kernel_gives_atens_distribution_bit_for_bit(monkeypatch, vocab):
    from multitoken.sampling import probs_from_logits

    torch.manual_seed(vocab)
    for i in range(24 if vocab < 49152 else 8):
        logits = torch.randn(1 + i % 5, vocab) * (0.5, 1, 3, 8, 30)[i % 5]
        if i % 3 == 0:
            logits = logits.bfloat16()  # ties, at the cut too: which of equal tokens stays is the sort's
        if i % 4 == 1:
            logits = logits.round()
        # 1 - 1e-9 rounds to 1.0 in float32: the cut falls within a rounding of the mass of a flat row.
        top_p = (0.9, 0.5, 0.95, 1 - 1e-9, 0.1, 0.999)[i % 6]
        temperature = (0.6, 0.8, 1.0, 1.7)[i % 4]
        expected = _aten_probs_from_logits(monkeypatch, logits, temperature, top_p)
        assert torch.equal(probs_from_logits(logits, temperature, top_p), expected), (i, top_p, temperature)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_p_kernel_takes_a_top_p_per_row(monkeypatch, dtype):
    from multitoken.sampling import probs_from_logits

    torch.manual_seed(0)
    logits = (torch.randn(2, 6, 4096) * 4).bfloat16()
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.95, 1.0, 0.7], dtype=dtype)[:, None]
    expected = _aten_probs_from_logits(monkeypatch, logits, 0.8, top_p)
    assert torch.equal(probs_from_logits(logits, 0.8, top_p), expected)
    assert (expected > 0).sum(-1)[0, 0] < (expected > 0).sum(-1)[0, 3]


@needs_kernel
@pytest.mark.parametrize("vocab", [1, 6, 4096])
def test_draw_kernel_draws_atens_ids(monkeypatch, vocab):
    from multitoken.sampling import draw

    g = torch.Generator().manual_seed(vocab)
    for i in range(20):
        # Distributions after top-p (zeros at either end), unnormalised residuals, one-hot rows, all-zero rows.
        w = torch.softmax(torch.randn(3, 2, vocab, generator=g) * (0.5, 3, 30)[i % 3], -1)
        w[..., : vocab // 3] *= torch.rand(vocab // 3, generator=g) < 0.5
        w[..., -(vocab // 4) :] = 0 if i % 2 else w[..., -(vocab // 4) :]
        w = w * (1.0, 0.3)[i % 2]
        w[0, 0] = 0
        w[0, 1, -1] = 1.0 if i % 4 == 3 else w[0, 1, -1]
        u = torch.rand(3, 2, dtype=torch.float64, generator=g)
        u[1, 0] = 0.0
        u[1, 1] = 1 - 2**-53  # the total, rounded: the last id of positive weight
        # u at a cumulative weight exactly: the id after it (searchsorted's right=True)
        u[2, 0] = float(w[2, 0].double().cumsum(-1)[vocab // 2] / w[2, 0].double().sum()) if w[2, 0].sum() > 0 else 0.5
        fast = draw(w, u)
        with monkeypatch.context() as m:
            m.setattr(kernels, "sampling_runs", lambda probs: False)
            slow = draw(w, u)
        assert torch.equal(fast, slow), (i, fast, slow)
        assert fast.shape == (3, 2) and ((fast == 0) | (w.gather(-1, fast[..., None])[..., 0] > 0) | (w.sum(-1) == 0)).all()
    with pytest.raises(RuntimeError, match=r"draw: u must be float64 \(rows,\)"):
        torch.ops.multitoken.draw(w[0], u[0].float())


@needs_kernel
def test_sampled_acceptance_kernel_is_atens(monkeypatch):
    from multitoken.speculative import accept_sampled

    g = torch.Generator().manual_seed(0)
    counts = set()
    for i in range(40):
        batch, j, vocab = 4, i % 4, (5, 64, 4096)[i % 3]
        p = torch.softmax(torch.randn(batch, j + 1, vocab, generator=g) * 3, -1)
        q = torch.softmax(torch.randn(batch, j, vocab, generator=g) * 3, -1)
        p[..., : vocab // 2] *= torch.rand(vocab // 2, generator=g) < 0.7  # zeros, as top-p leaves them
        drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).view(batch, j) if j else torch.zeros(batch, 0, dtype=torch.long)
        u = torch.rand(batch, j, generator=g)
        if j:
            q[0, 0] = p[0, 0]  # p == q: always accepted; at a rejection there the residual is all zeros
            u[1, 0] = 0.0
            x = drafts[2, 0]
            u[2, 0] = p[2, 0, x] / q[2, 0, x] if q[2, 0, x] > p[2, 0, x] else 0.5  # u q(x) == p(x)?: rejected
            p[3, 0, drafts[3, 0]] = 1.0  # accepted whatever u
        u_next = torch.rand(batch, dtype=torch.float64, generator=g)
        fast = accept_sampled(p, q, drafts, u, u_next)
        with monkeypatch.context() as m:
            m.setattr(kernels, "sampling_runs", lambda probs: False)
            slow = accept_sampled(p, q, drafts, u, u_next)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow)), (i, fast, slow)
        counts.update(fast[0].tolist())
    assert counts == {0, 1, 2, 3}
    with pytest.raises(RuntimeError, match=r"accept_sampled: draft (\d+) is not a token of the \1"):
        torch.ops.multitoken.accept_sampled(p, q, torch.full_like(drafts, vocab), u, u_next)


@needs_kernel
def test_top_p_kernel_names_bad_arguments():
    probs = torch.softmax(torch.randn(3, 50), -1)
    with pytest.raises(RuntimeError, match="probs must be a float32"):
        torch.ops.multitoken.top_p(probs.double(), torch.full((3,), 0.9, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"top_p must be float64 \(rows,\)"):
        torch.ops.multitoken.top_p(probs, torch.full((2,), 0.9, dtype=torch.float64))
    assert not kernels.top_p_runs(probs.requires_grad_())


def _random_trees(seed: int, bsz: int, heads: int, ranks: int, budget: int):
    """Draft logits' best candidates (log probabilities best first, their tokens), roots, and the dynamic
    tree ATen's tree.best_tree makes of them."""
    from multitoken.tree import best_tree

    g = torch.Generator().manual_seed(seed)
    logp, ids = torch.log_softmax(torch.randn(bsz, heads, 50, generator=g) * 2, -1).topk(ranks, dim=-1)
    root = torch.randint(0, 50, (bsz,), generator=g)
    return logp, ids, root, best_tree(logp, budget)


@needs_kernel
@pytest.mark.parametrize("bsz, heads, ranks, budget", [(1, 3, 8, 8), (3, 3, 16, 16), (2, 1, 5, 5), (2, 2, 4, 40),
                                                       (4, 3, 12, 12), (1, 3, 1, 1)])
def test_tree_kernels_choose_and_place_atens_tree(monkeypatch, bsz, heads, ranks, budget):
    from multitoken.tree import TreeDrafter, tree_positions

    for seed in range(5):
        logp, ids, root, t = _random_trees(seed, bsz, heads, ranks, budget)
        tokens, parent, depth, rank = torch.ops.multitoken.best_tree(logp, ids, root, budget)
        assert torch.equal(parent, t.parent) and torch.equal(depth, t.depth) and torch.equal(rank, t.rank)
        expected_tokens = ids.flatten(1).gather(1, (t.depth - 1).clamp_min(0) * ranks + t.rank)
        expected_tokens[:, 0] = root
        assert torch.equal(tokens, expected_tokens)
        # And so the drafter's tree, with the kernels and without.
        drafter = TreeDrafter(budget, heads, 50)
        logits = torch.randn(bsz, heads, 50)
        fast, _ = drafter(logits, root, 0.0, 1.0)
        model = random_model(tiny_args(max_seq_len=64))
        model.setup_caches(bsz, 64)
        start = torch.tensor([3, 17, 0, 9][:bsz])
        fast_pos = tree_positions(model, t, start)
        with monkeypatch.context() as m:
            m.setattr(kernels, "tree_ops", lambda x: False)
            slow, _ = drafter(logits, root, 0.0, 1.0)
            slow_pos = tree_positions(model, t, start)
        assert all(torch.equal(getattr(fast, f), getattr(slow, f)) for f in ("tokens", "parent", "depth", "rank"))
        assert all(torch.equal(a, b) for a, b in zip(fast_pos[:3], slow_pos[:3]))


@needs_kernel
def test_greedy_tree_kernel_ranks_equal_logits_as_argmax_does():
    # Head 1: tokens 1 and 2 tie for best (argmax takes 1); head 2: 0 best, then 2 and 3 tied.
    logits = torch.tensor([[[1.0, 3.0, 3.0, 2.0], [5.0, 1.0, 4.0, 4.0]]])
    tokens, parent, depth, rank = torch.ops.multitoken.greedy_tree(logits, torch.tensor([9]), 4, 3)
    assert tokens[0, :3].tolist() == [9, 1, 0]  # the root, then the chain: each head's argmax
    for i in range(1, 5):  # every node holds its head's rank-th best token, ties by id
        head_ranked = sorted(range(4), key=lambda v: (-logits[0, depth[0, i] - 1, v].item(), v))
        assert tokens[0, i] == head_ranked[rank[0, i]]
    assert parent[0].tolist()[:3] == [0, 0, 1] and depth[0].tolist()[:3] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="ranks must be in 1 .. 4"):
        torch.ops.multitoken.greedy_tree(logits, torch.tensor([9]), 4, 5)
    # A broken model's NaNs rank last and the tree is still a tree (sorting NaNs has no order to follow).
    broken = torch.randn(2, 3, 50)
    broken[0, :, :7] = float("nan")
    broken[1, 1] = float("nan")
    tokens, parent, depth, rank = torch.ops.multitoken.greedy_tree(broken, torch.tensor([1, 2]), 12, 12)
    assert (parent[:, 1:] < torch.arange(1, 13)).all() and (depth[:, 1:] >= 1).all()
    assert not set(tokens[0, 1:4].tolist()) & set(range(7))  # the chain holds no NaN's token


@needs_kernel
def test_tree_acceptance_kernel_is_atens(monkeypatch):
    from multitoken.tree import Tree, accept_greedy_step

    for seed in range(20):
        logp, ids, root, t = _random_trees(seed, 4, 3, 6, 12)
        t.tokens = ids.flatten(1).gather(1, (t.depth - 1).clamp_min(0) * 6 + t.rank)
        # Targets that pass some random nodes: each node's argmax is one of its children's tokens, or none.
        g = torch.Generator().manual_seed(seed)
        target = torch.randint(50, 100, t.tokens.shape, generator=g)
        for b in range(4):
            for i in torch.randperm(t.size, generator=g)[: t.size // 2].tolist():
                if i:
                    target[b, t.parent[b, i]] = t.tokens[b, i]
        # Logits whose argmax is the target, a few with a later token tied for best (argmax takes the first).
        logits = torch.randn(*t.tokens.shape, 100, generator=g).round()
        logits.scatter_(2, target[..., None], 10.0)
        logits[0, :, 99] = 10.0
        fast = accept_greedy_step(t, logits)
        with monkeypatch.context() as m:
            m.setattr(kernels, "tree_ops", lambda x: False)
            slow = accept_greedy_step(t, logits)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))
        assert fast[1].max() > 0
    with pytest.raises(RuntimeError, match="must come after its parent"):
        accept_greedy_step(Tree(torch.tensor([[0, 2, 0]]), t.depth[:1, :3], t.rank[:1, :3], t.tokens[:1, :3]),
                           logits[:1, :3])
    with pytest.raises(RuntimeError, match="one deeper"):  # a depth the path could not be climbed by
        accept_greedy_step(Tree(torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1, 9]]), t.rank[:1, :3], t.tokens[:1, :3]),
                           logits[:1, :3])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chain_acceptance_kernel_is_atens(dtype, monkeypatch):
    from multitoken.steps import accept_chain

    g = torch.Generator().manual_seed(0)
    accepted = set()
    for seed in range(30):
        batch, seq, heads, vocab = 3, 1 + seed % 4, 1 + seed % 4, 37 + seed
        tokens = torch.randint(0, vocab, (batch, seq), generator=g)
        # Logits whose next-token argmax agrees with a random number of each row's drafts; small integers,
        # so that ties (argmax takes the first) are frequent, in bf16 too; a NaN now and then (it wins).
        logits = torch.randint(-3, 4, (batch, seq, heads, vocab), generator=g).float()
        for b in range(batch):
            for i in range(int(torch.randint(0, seq, (), generator=g))):
                logits[b, i, 0, tokens[b, i + 1]] = 9.0
        if seed % 5 == 0:
            logits[0, 0, -1, seed % vocab] = float("nan")
        logits = logits.to(dtype)
        fast = accept_chain(tokens, logits)
        with monkeypatch.context() as m:
            m.setattr(kernels, "tree_ops", lambda x: False)
            slow = accept_chain(tokens, logits)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))
        assert fast[2].shape == (batch, heads - 1)
        accepted.update(fast[1].tolist())
    assert accepted == {0, 1, 2, 3}
    with pytest.raises(RuntimeError, match="accept_chain: logits must be float32 or bfloat16 \\(batch, seq, heads, vocab\\)"):
        torch.ops.multitoken.accept_chain(tokens, logits[:, :-1])


@needs_kernel
def test_cache_kernel_moves_what_kvcache_moves():
    torch.manual_seed(0)
    caches = [KVCache(3, 24, 2, 16, torch.bfloat16, "cpu") for _ in range(2)]
    kernels.use_kernel_modules(caches[1:])
    k, v = torch.randn(caches[0].k.shape), torch.randn(caches[0].v.shape)
    for cache in caches:
        cache.k.copy_(k)
        cache.v.copy_(v)
    # A path's nodes into consecutive slots, and moves whose sources are others' destinations.
    src, dst = torch.tensor([[7, 9, 12], [4, 3, 2]]), torch.tensor([[6, 7, 8], [3, 4, 5]])
    with torch.inference_mode():
        for cache in caches:
            cache.move(src, dst)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert not torch.equal(caches[0].k, k.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="slot out of range"):
        caches[1].move(src + 20, dst)


@needs_kernel
def test_row_positions_kernel_is_the_models():
    model = random_model(tiny_args(max_seq_len=40))
    model.setup_caches(3, 40)
    start = torch.tensor([0, 17, 35])
    for seqlen in (1, 4, 5):
        fast, slow = kernels.row_positions(model, start, seqlen), model.positions(start, 3, seqlen)
        assert all(torch.equal(a, b) for a, b in zip(fast[:3], slow[:3])) and fast.rows is None
    with pytest.raises(RuntimeError, match="position 40 is past max_seq_len=40"):
        kernels.row_positions(model, start, 6)
    with pytest.raises(ValueError, match="batch of 4 exceeds max_batch_size=3"):
        kernels.row_positions(model, torch.tensor([0, 1, 2, 3]), 1)
