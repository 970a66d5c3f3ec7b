import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_model, tiny_args
from multitoken import steps as steps_mod
from multitoken.generation import Llama
from multitoken.model import Attention, Transformer, scaled_dot_product
from multitoken.steps import (
    ROWWISE_MAX_ROWS,
    DecodeSteps,
    FusedAttention,
    FusedFeedForward,
    RowwiseLinear,
    block_products,
    fuse_projections,
    inference_products,
    leading_true,
    masked_flex_attention,
    single_query_attention,
    use_rowwise_matmuls,
)
from test_generation import IdTokenizer
from test_tree import _FusedEagerly

PROMPTS = [[1, 5], [1, 200, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 9, 9, 9]]


@pytest.mark.parametrize("rows", [1, ROWWISE_MAX_ROWS + 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_rowwise_linear_computes_the_linear_map(rows, dtype, compiled):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=False).to(dtype)
    x = torch.randn(rows, 1, 96).to(dtype)
    expected = (x.double() @ linear.weight.double().T).to(dtype)
    use_rowwise_matmuls(linear)
    assert isinstance(linear, RowwiseLinear)
    got = torch.compile(linear, dynamic=False)(x) if compiled else linear(x)
    assert got.shape == (rows, 1, 40) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_rowwise_matmuls_keep_parameters_and_state_dict():
    model = random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 300, (1, 7))
    logits = model(x, return_all_heads=True)
    use_rowwise_matmuls(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(model(x, return_all_heads=True), logits, rtol=1e-4, atol=1e-4)


def test_full_cache_positions_give_the_logits_of_the_filled_prefix():
    model = random_model(tiny_args(n_future_tokens=3), dtype=torch.float64).eval()
    model.setup_caches(2, 64)
    prompt = torch.randint(0, 300, (2, 9))
    with torch.inference_mode():
        model(prompt, 0, return_all_heads=True)
        start = torch.tensor([9, 5])  # row 1 re-writes positions 5..7: stale entries beyond stay hidden
        tokens = torch.randint(0, 300, (2, 3))
        steps = DecodeSteps(model)
        h, logits = steps.step(tokens, start)
        steps.compiled = True  # the compiled steps' positions, run eagerly
        h_full, logits_full = steps.step(tokens, start)
        torch.testing.assert_close(logits_full, logits, rtol=1e-10, atol=1e-10)
        _, logits_span = steps.step(tokens, start, span=16)  # a span of the cache that holds the positions
        torch.testing.assert_close(logits_span, logits, rtol=1e-10, atol=1e-10)
        index = torch.tensor([2, 0])
        torch.testing.assert_close(steps.draft(h_full, start, index, 2), DecodeSteps(model).draft(h, start, index, 2),
                                   rtol=1e-10, atol=1e-10)


def test_compiled_gpu_steps_attend_the_least_power_of_two_span_that_holds_their_positions(monkeypatch):
    monkeypatch.setattr(steps_mod, "MIN_SPAN", 8)
    model = random_model()
    model.setup_caches(1, 48)
    assert DecodeSteps(model).span(5) is None  # eager steps attend exactly the prefix they need
    steps = DecodeSteps(model)
    steps.compiled, steps.dynamic_span = True, False  # a GPU's: one graph per span
    assert [steps.span(end) for end in (1, 8, 9, 16, 17, 33, 48)] == [8, 8, 16, 16, 32, 48, 48]
    assert steps.spans(20) == [8, 16, 32] and steps.spans(500) == [8, 16, 32, 48]
    with steps.spanning(32):  # a warm-up compiling the span a longer text will reach
        assert steps.span(3) == 32
    assert steps.span(3) == 8
    with pytest.raises(ValueError, match="past max_seq_len=48"):
        model.positions(torch.tensor([3]), 1, 1, span=64)


def test_compiled_cpu_steps_attend_the_written_slots_rounded_up_in_one_graph():
    model = random_model()
    model.setup_caches(1, 56)
    steps = DecodeSteps(model)
    steps.compiled, steps.dynamic_span = True, True
    assert [steps.span(end) for end in (1, 16, 17, 33, 48, 49, 56)] == [16, 16, 32, 48, 48, 56, 56]
    # One graph serves every span short of the cache; the whole cache is a second.
    assert steps.spans(40) == [16] and steps.spans(500) == [16, 56]
    window = steps.window(32)
    assert window.shape == (32,) and steps.window(None).shape == (56,)
    assert window.untyped_storage().data_ptr() == steps.window(48).untyped_storage().data_ptr()  # no allocation


@pytest.mark.parametrize("dynamic_span", [False, True], ids=["powers of two", "windows"])
def test_decoding_across_spans_gives_the_eager_tokens(monkeypatch, dynamic_span):
    """Plain, chain and tree decoding on the compiled steps' paths (run eagerly), the span growing
    from 8 (or 16) to the whole cache as the text does."""
    monkeypatch.setattr(steps_mod, "MIN_SPAN", 8)
    model = random_model(tiny_args(n_layers=6, n_future_tokens=4), seed=1, dtype=torch.float64).eval()
    model.setup_caches(len(PROMPTS), 64)
    eager = Llama(model, IdTokenizer(eos_id=299, n_words=300))
    expected = eager.generate(PROMPTS, 48, temperature=0)[0]
    spans = []
    positions = Transformer.positions

    def recorded(self, *args, span=None, **kwargs):
        spans.append(span)
        return positions(self, *args, span=span, **kwargs)

    monkeypatch.setattr(Transformer, "positions", recorded)
    fused = Llama(model, eager.tokenizer)
    fused.steps = _FusedEagerly(model)
    fused.steps.dynamic_span = dynamic_span
    for options in ({}, {"speculative": True}, {"tree": 6}):
        spans.clear()
        assert fused.generate(PROMPTS, 48, temperature=0, **options)[0] == expected
        # A tree of 6 after the 11-token prompt starts at 32 (the least power of two from 8 above 17).
        assert ({32, 48, 64} if dynamic_span else {32, 64}) <= set(spans), options


@pytest.mark.slow
def test_compiled_decoding_across_spans_gives_the_eager_greedy_tokens():
    """Compiled plain and self-speculative steps attending spans of 16 to 64 slots as the text grows: one
    graph for the spans short of the cache, one for the whole cache."""
    model = random_model(tiny_args(n_layers=6, n_future_tokens=4), seed=1).eval()
    model.setup_caches(1, 64)
    eager = Llama(model, IdTokenizer(eos_id=299, n_words=300))
    prompt = PROMPTS[1]  # 11 tokens: 40 more reach the end of the 64-slot cache
    expected = eager.generate([prompt], 40, temperature=0)[0]
    compiled = Llama(model, eager.tokenizer).compile()
    spans = []
    span = compiled.steps.span
    compiled.steps.span = lambda end: spans.append(span(end)) or spans[-1]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled.generate([prompt], 40, temperature=0)[0] == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    assert compiled.generate([prompt], 40, temperature=0, speculative=True)[0] == expected
    assert {16, 32, 48, 64} <= set(spans)


def test_decode_steps_need_caches():
    with pytest.raises(ValueError, match="setup_caches"):
        DecodeSteps(random_model())


def test_rows_that_finish_leave_eager_batches_at_once_and_compiled_cpu_ones_by_powers_of_two():
    model = random_model(tiny_args(n_layers=4), seed=1).eval()
    model.setup_caches(16, 32)
    assert [DecodeSteps(model).batch_size(n) for n in (1, 3, 5, 16)] == [1, 3, 5, 16]
    compiled = DecodeSteps(model, compile=True)
    assert [compiled.batch_size(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    compiled.device = torch.device("cuda")  # compiled GPU steps keep the batch (each size would compile again)
    assert compiled.batch_size(3) is None
    eager = DecodeSteps(model)
    eager.retire_rows = False
    assert eager.batch_size(3) is None


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_greedy_tokens():
    """Plain and self-speculative greedy decoding, batch 1 and a ragged batch, with compiled steps."""
    model = random_model(tiny_args(n_layers=6, n_future_tokens=4), seed=1).eval()
    model.setup_caches(len(PROMPTS), 64)
    eager = Llama(model, IdTokenizer(eos_id=299, n_words=300))
    expected = [eager.generate([p], 24, temperature=0)[0][0] for p in PROMPTS]
    assert eager.generate(PROMPTS, 24, temperature=0, speculative=True)[0] == expected

    compiled = Llama(model, eager.tokenizer).compile()
    assert compiled.steps.compiled
    assert [compiled.generate([p], 24, temperature=0)[0][0] for p in PROMPTS] == expected
    assert compiled.generate(PROMPTS, 24, temperature=0)[0] == expected
    sizes = []  # rows that finish leave the batch: 3 rows run as 3, then 2, then 1 (powers of two)
    greedy = compiled.steps.greedy
    compiled.steps.greedy = lambda tokens, *a, **kw: sizes.append(tokens.shape[0]) or greedy(tokens, *a, **kw)
    assert compiled.generate(PROMPTS, 24, temperature=0, speculative=True)[0] == expected
    compiled.steps.greedy = greedy
    assert sizes[0] == 3 and set(sizes) <= {3, 2, 1} and sizes == sorted(sizes, reverse=True)
    assert [compiled.generate([p], 24, temperature=0, speculative=True)[0][0] for p in PROMPTS] == expected
    # "auto" verifies 1, 2 or 3 drafts per step: a compiled graph each, the same tokens.
    assert compiled.generate(PROMPTS, 24, temperature=0, speculative=True, draft_heads="auto")[0] == expected
    assert {j for b, j in compiled.steps.step_times if b == len(PROMPTS)} == {1, 2, 3}
    assert {b for b, j in compiled.steps.step_times} == {len(PROMPTS)}  # compiled "auto" keeps the batch whole
    sampled, _ = compiled.generate(PROMPTS, 24, temperature=0.8, speculative=True)
    assert all(len(s) <= 24 and all(0 <= t < 300 for t in s) for s in sampled) and any(sampled)


def test_freezing_is_the_default_for_compiled_low_precision_cpu_steps_only(monkeypatch):
    for dtype, compile, expected in ((torch.bfloat16, True, True), (torch.float16, True, True),
                                     (torch.float32, True, False), (torch.bfloat16, False, False)):
        model = random_model(dtype=dtype)
        model.setup_caches(1, 16)
        assert DecodeSteps(model, compile=compile).frozen is expected
    # Not where memory cannot hold the packed copy beside the weights: a host of 1 MB (~0.5 MB of bf16 weights).
    import multitoken.steps

    monkeypatch.setattr(multitoken.steps.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 256}[name])
    assert not DecodeSteps(model, compile=True).frozen
    # Every option still compiles the steps (a slip once left them eager without single-query attention).
    for options in ({"single_query": False}, {"single_query": True}, {"fuse": False}, {"freeze": False}):
        steps = DecodeSteps(model, compile=True, **options)
        assert steps.step != steps._step and steps.greedy != steps._greedy, options
    with pytest.raises(ValueError, match="freeze=True is for steps compiled without a mode"):
        DecodeSteps(model, compile=True, mode="reduce-overhead", freeze=True)
    with pytest.raises(ValueError, match="freeze=True"):
        DecodeSteps(model, compile=False, freeze=True)


def test_compile_options_reach_torch_compile_and_refuse_a_mode():
    model = random_model()
    model.setup_caches(1, 16)
    # torch.compile checks option names when the steps are compiled, i.e. on construction.
    with pytest.raises(RuntimeError, match="no_such_option"):
        DecodeSteps(model, compile=True, compile_options={"no_such_option": True})
    with pytest.raises(ValueError, match="compile_options are for steps compiled without a mode"):
        DecodeSteps(model, compile=True, mode="reduce-overhead", compile_options={"cpp_wrapper": True})


@pytest.mark.slow
def test_frozen_steps_give_the_eager_greedy_tokens_and_leave_the_freezing_flag_alone():
    """Frozen (weights as packed constants, max-autotune GEMMs): plain and self-speculative greedy
    decoding equal eager decoding in float32, so the KV caches are written and read as unfrozen.
    Freezing is on while the steps run only: other compiled code keeps its parameters as inputs."""
    import torch._inductor.config as inductor_config

    model = random_model(tiny_args(n_layers=4, n_future_tokens=3), seed=2).eval()
    model.setup_caches(1, 48)
    eager = Llama(model, IdTokenizer(eos_id=299, n_words=300))
    prompt = PROMPTS[1:2]
    expected = eager.generate(prompt, 16, temperature=0)[0]
    frozen = Llama(model, eager.tokenizer).compile(freeze=True)
    assert frozen.steps.frozen and not inductor_config.freezing
    assert frozen.generate(prompt, 16, temperature=0)[0] == expected
    assert frozen.generate(prompt, 16, temperature=0, speculative=True)[0] == expected
    assert not inductor_config.freezing
    # Frozen steps skip the guards on the model's modules, not those on its caches: new caches of
    # another length are new graphs, not stale ones.
    model.setup_caches(1, 40)
    assert frozen.generate(prompt, 16, temperature=0)[0] == expected


@pytest.mark.slow
def test_compiled_plain_decoding_compiles_once_per_batch_size():
    """Prompts and generation lengths change the token buffer's shape, never the step's inputs."""
    model = random_model(tiny_args(n_layers=4), seed=1).eval()
    model.setup_caches(2, 64)
    llama = Llama(model, IdTokenizer(eos_id=299, n_words=300)).compile()
    llama.generate([[1, 2, 3]], 5, temperature=0)  # compiles the batch-1 step
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt, max_gen_len in (([1, 2, 3, 4, 5, 6, 7], 20), ([9] * 20, 11)):
            llama.generate([prompt], max_gen_len, temperature=0)


def test_fused_projections_keep_parameters_state_dict_and_outputs():
    model = random_model(tiny_args(n_future_tokens=3)).eval()
    reference = random_model(tiny_args(n_future_tokens=3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    assert isinstance(model.layers[0].attention, FusedAttention) and isinstance(model.extra_heads[0].feed_forward,
                                                                                FusedFeedForward)
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x, return_all_heads=True), reference(x, return_all_heads=True),
                                   rtol=1e-5, atol=1e-5)
    # Cached decoding, extra heads at one selected token per row included: the same greedy tokens.
    for m in (model, reference):
        m.setup_caches(len(PROMPTS), 64)
    fused = Llama(model, IdTokenizer(eos_id=299, n_words=300))
    with pytest.MonkeyPatch.context() as m:  # decode steps fuse by default: keep the reference's products apart
        m.setattr(steps_mod, "fuse_projections", lambda model: model)
        plain = Llama(reference, IdTokenizer(299, 300))
        expected = plain.generate(PROMPTS, 20, temperature=0)[0]
    assert type(reference.layers[0].attention) is Attention
    assert fused.generate(PROMPTS, 20, temperature=0)[0] == expected
    assert fused.generate(PROMPTS, 20, temperature=0, speculative=True)[0] == expected
    assert fused.generate(PROMPTS, 20, temperature=0, tree=8)[0] == expected


def test_each_steps_object_sets_fused_or_separate_products_and_rowwise_reaches_fused_ones():
    model = random_model(tiny_args(n_future_tokens=3)).eval()
    model.setup_caches(len(PROMPTS), 64)
    llama = Llama(model, IdTokenizer(eos_id=299, n_words=300))  # eager steps fuse by default
    assert isinstance(model.layers[0].attention, FusedAttention) and llama.steps.fused
    fused = llama.generate(PROMPTS, 12, temperature=0, speculative=True)[0]
    llama.steps = DecodeSteps(model, fuse=False)
    assert type(model.layers[0].attention) is Attention and not hasattr(model.layers[0].attention, "wqkv")
    assert len(block_products(model.extra_heads[0])) == 7
    assert llama.generate(PROMPTS, 12, temperature=0, speculative=True)[0] == fused
    DecodeSteps(model)  # fused again, then made row-wise: the fused products too
    use_rowwise_matmuls(model)
    assert all(type(m) is RowwiseLinear for m in inference_products(model))


def test_fused_projections_train_the_parameters_and_see_their_updates():
    """With gradients on the separate products run, so the parameters get their gradients; the fused
    weights are the parameters' storage, so an optimizer's in-place update reaches inference too."""
    model, reference = random_model(), random_model()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, reference)]
    fuse_projections(model)  # after the optimizer took the parameters, as a mid-training evaluation would
    x = torch.randint(0, 300, (2, 9))
    for m, optimizer in zip((model, reference), optimizers):
        m(x, return_all_heads=True).logsumexp(-1).mean().backward()
        optimizer.step()
    assert torch.equal(model.layers[1].attention.wk.weight, reference.layers[1].attention.wk.weight)
    assert torch.equal(model.extra_heads[0].feed_forward.w3.weight, reference.extra_heads[0].feed_forward.w3.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x, return_all_heads=True), reference(x, return_all_heads=True),
                                   rtol=1e-5, atol=1e-5)


def test_fused_projections_follow_the_model_to_another_dtype():
    model, reference = random_model(), random_model()
    fuse_projections(model).to(torch.float64)
    reference.to(torch.float64)
    attention = model.layers[2].attention
    assert attention.wqkv.weight.dtype == torch.float64
    assert attention.wk.weight.untyped_storage().data_ptr() == attention.wqkv.weight.untyped_storage().data_ptr()
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x, return_all_heads=True), reference(x, return_all_heads=True),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_query_attention_is_scaled_dot_product(dtype, monkeypatch):
    """The multiply-and-sum attention of compiled CPU steps (its math run eagerly: is_compiling patched),
    grouped-query heads and a ragged mask included; more queries fall back to scaled_dot_product."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 8, 1, 16, dtype=dtype), torch.randn(2, 4, 40, 16, dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.rand(2, 1, 1, 40) < 0.4
    mask[..., 0] = True
    expected = scaled_dot_product(q.double(), k.double(), v.double(), mask)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    out = single_query_attention(q, k, v, mask)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(single_query_attention(q, k, v, None).double(),
                               scaled_dot_product(q.double(), k.double(), v.double(), None), **tol)
    q3 = torch.randn(2, 8, 3, 16, dtype=dtype)
    mask3 = mask.expand(2, 1, 3, 40)
    torch.testing.assert_close(single_query_attention(q3, k, v, mask3), scaled_dot_product(q3, k, v, mask3))


def test_masked_flex_attention_is_scaled_dot_product(monkeypatch):
    """FlexAttention with the mask read by a score_mod (its math run eagerly: is_compiling patched):
    ragged rows, grouped-query heads, one query and several with a tree-like mask, a mask without
    batch or head dimensions; without a mask it is scaled_dot_product (causal)."""
    torch.manual_seed(0)
    k = torch.randn(2, 4, 40, 16)
    v = torch.randn_like(k)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for n_q in (1, 4):
        q = torch.randn(2, 8, n_q, 16)
        mask = torch.rand(2, 1, n_q, 40) < 0.4
        mask[..., 0] = True
        expected = scaled_dot_product(q.double(), k.double(), v.double(), mask)
        out = masked_flex_attention(q, k, v, mask)
        assert out.shape == q.shape
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # Query 2 of row 0 sees key 5 alone, so it reads value 5 (each query head's kv head).
    mask = torch.zeros(2, 1, 4, 40, dtype=torch.bool)
    mask[..., 0] = True
    mask[0, 0, 2] = torch.arange(40) == 5
    torch.testing.assert_close(masked_flex_attention(q, k, v, mask)[0, :, 2], v[0, :, 5].repeat_interleave(2, 0))
    causal = torch.ones(4, 40, dtype=torch.bool).tril(36)  # the (n_q, keys) mask of several tokens at an int start
    torch.testing.assert_close(masked_flex_attention(q, k, v, causal), scaled_dot_product(q, k, v, causal),
                               atol=1e-5, rtol=1e-5)
    q_prompt, k_prompt = torch.randn(2, 8, 6, 16), torch.randn(2, 4, 6, 16)
    torch.testing.assert_close(masked_flex_attention(q_prompt, k_prompt, k_prompt, None),
                               scaled_dot_product(q_prompt, k_prompt, k_prompt, None))


def test_materialized_is_a_contiguous_copy_that_inductor_keeps_as_a_buffer():
    """The mask FlexAttention reads goes through `materialized`: a contiguous copy eagerly and compiled,
    its own kernel call in inductor's code (so the mask's computation is not inlined into the attention
    kernel, which broke its compile on a GPU)."""
    from torch._inductor.utils import run_and_get_code

    at = torch.tensor([3, 7])
    mask = (torch.arange(10) <= at[:, None]).unsqueeze(1).expand(2, 3, 10)
    copy = steps_mod.materialized(mask)
    assert copy.is_contiguous() and torch.equal(copy, mask) and copy.data_ptr() != mask.data_ptr()

    def fn(at):
        return steps_mod.materialized(torch.arange(10) <= at[:, None]) | False

    out, code = run_and_get_code(torch.compile(fn, fullgraph=True), at)
    assert torch.equal(out, fn(at))
    assert "multitoken.materialized" in "".join(code)


def test_flex_attention_decodes_plain_self_speculative_and_tree_steps_as_sdpa_does(monkeypatch):
    """FlexAttention in decode steps, its math run eagerly (is_compiling patched; `flex=True` compiles it
    for GPUs, and inductor's CPU template does not take cache views): the steps' masks (ragged rows,
    verify steps, a draft tree) give scaled_dot_product's greedy tokens. flex=True refuses a CPU."""
    model = random_model(tiny_args(n_layers=4, n_future_tokens=3), seed=2).eval()
    model.setup_caches(len(PROMPTS), 64)
    llama = Llama(model, IdTokenizer(eos_id=299, n_words=300))
    expected = llama.generate(PROMPTS, 16, temperature=0)[0]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for block in [*model.layers, *model.extra_heads]:
        monkeypatch.setattr(block.attention, "sdpa", masked_flex_attention)
    assert llama.generate(PROMPTS, 16, temperature=0)[0] == expected
    assert llama.generate(PROMPTS, 16, temperature=0, speculative=True)[0] == expected
    assert llama.generate(PROMPTS, 16, temperature=0, tree=6)[0] == expected
    with pytest.raises(ValueError, match="flex=True is for compiled steps on a GPU"):
        DecodeSteps(model, compile=True, flex=True)
    with pytest.raises(ValueError, match="flex=True is for compiled steps on a GPU"):
        DecodeSteps(model, flex=True)


def test_leading_true_counts_the_drafts_before_the_first_rejection():
    g = torch.Generator().manual_seed(0)
    ok = torch.rand(200, 4, generator=g) < 0.7
    assert torch.equal(leading_true(ok), ok.long().cumprod(1).sum(1))
    assert leading_true(torch.tensor([[True, True, True], [False, True, True], [True, False, True]])).tolist() == [3, 0, 1]
    assert leading_true(torch.zeros(2, 0, dtype=torch.bool)).tolist() == [0, 0]  # no drafts verified
