import itertools

import pytest
import torch

from multitoken import tree as tree_mod
from multitoken.generation import Llama
from multitoken.steps import DecodeSteps
from multitoken.tree import Tree, best_tree, close_paths, first_moved, static_tree, tree_positions
from test_speculative import PROMPTS, _homogeneity_p_value, _llama

STATIC = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [1, 0, 0]]
TREES = [1, 3, 16, 40, STATIC, [[2, 1, 3]]]


def _small_vocab(vocab=12, **kw):
    """A random float64 model over a small vocabulary: trees cover most candidates, so drafts are
    accepted deep and at every rank, which exercises the tree mask and the KV compaction."""
    llama = _llama(vocab=vocab, seed=1, **kw)
    return llama, [[t % (vocab - 1) for t in p] for p in PROMPTS]


def _poison_caches(llama):
    for block in [*llama.model.layers, *llama.model.extra_heads]:
        block.attention.cache.k.fill_(1e4)
        block.attention.cache.v.fill_(1e4)


@pytest.mark.parametrize("tree", TREES, ids=str)
@pytest.mark.parametrize("vocab", [300, 12])
def test_greedy_equals_plain_decoding_for_every_tree_batched_and_alone(tree, vocab):
    llama, prompts = _small_vocab(vocab)
    plain = [llama.generate([p], 24, temperature=0)[0][0] for p in prompts]
    _poison_caches(llama)  # stale and unwritten entries must never be attended
    assert llama.generate(prompts, 24, temperature=0, tree=tree)[0] == plain
    assert [llama.generate([p], 24, temperature=0, tree=tree)[0][0] for p in prompts] == plain


def test_deep_acceptance_at_every_rank_is_exercised():
    llama, prompts = _small_vocab()
    llama.generate(prompts, 24, temperature=0, tree=40)
    s = llama.last_stats
    assert s.accepted[1] > 0 and s.acceptance[0] > 0.9, s.summary()


@pytest.mark.parametrize("draft_heads", [1, 2])
def test_draft_heads_bound_the_depth(draft_heads):
    llama, prompts = _small_vocab()
    plain = llama.generate(prompts, 16, temperature=0)[0]
    assert llama.generate(prompts, 16, temperature=0, tree=10, draft_heads=draft_heads)[0] == plain
    assert len(llama.last_stats.proposed) == draft_heads


def test_eos_max_gen_len_and_streaming_are_respected_exactly():
    llama, prompts = _small_vocab()
    plain = llama.generate(prompts, 20, temperature=0)[0]
    llama.tokenizer.eos_id = plain[1][6]  # a token the second row produces mid-way
    expected = llama.generate(prompts, 20, temperature=0)[0]
    assert any(len(r) < 20 for r in expected)
    seen = []
    got = llama.generate(prompts, 20, temperature=0, tree=16, on_token=lambda r, t: seen.append((r, t)))[0]
    assert got == expected
    assert [[t for r, t in seen if r == b] for b in range(4)] == expected
    for n in (0, 1, 2, 5):
        assert llama.generate(prompts, n, temperature=0, tree=16)[0] == llama.generate(prompts, n, temperature=0)[0]


def test_finished_rows_leave_the_batch(monkeypatch):
    llama, prompts = _small_vocab()
    llama.tokenizer.eos_id = llama.generate(prompts, 20, temperature=0)[0][1][6]  # row 1 ends early
    expected = [llama.generate([p], 20, temperature=0)[0][0] for p in prompts]
    assert len({len(r) for r in expected}) > 1
    sizes, trunk = [], llama.model.forward_trunk
    monkeypatch.setattr(llama.model, "forward_trunk",
                        lambda tokens, pos: sizes.append(tokens.shape[0]) or trunk(tokens, pos))
    assert llama.generate(prompts, 20, temperature=0, tree=16)[0] == expected
    assert sizes[0] == 4 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 3


def test_end_of_cache_shrinks_the_tree_and_stops_at_max_seq_len():
    llama, _ = _small_vocab(vocab=8, max_seq_len=16)
    llama.tokenizer.eos_id = -1  # rows run into the end of the cache
    prompts = [[1, 2, 3], [1, 2, 3, 4, 5, 6] * 2, [1] * 16]
    expected = llama.generate(prompts, 50, temperature=0)[0]
    assert [len(r) for r in expected] == [13, 4, 0]
    assert llama.generate(prompts, 50, temperature=0, tree=20)[0] == expected


def test_logprobs_and_echo_match_plain_decoding():
    llama, prompts = _small_vocab()
    t1, lp1 = llama.generate(prompts, 10, temperature=0, logprobs=True, echo=True)
    t2, lp2 = llama.generate(prompts, 10, temperature=0, logprobs=True, echo=True, tree=16)
    assert t1 == t2
    for a, b in zip(lp1, lp2):
        assert a == pytest.approx(b, abs=1e-5)


def test_a_tree_accepts_more_per_forward_than_the_chain():
    llama, prompts = _small_vocab()
    llama.generate(prompts, 30, temperature=0, speculative=True)
    chain = llama.last_stats
    out, _ = llama.generate(prompts, 30, temperature=0, tree=16)
    s = llama.last_stats
    assert s.tokens == sum(map(len, out))
    assert s.tokens_per_forward >= 1.15 * chain.tokens_per_forward, (chain.summary(), s.summary())


def test_static_paths_are_closed_under_prefixes_and_lower_ranks_in_topological_order():
    assert close_paths([[1, 2]], 3) == [(0,), (1,), (1, 0), (1, 1), (1, 2)]
    t = static_tree(close_paths([[0, 0], [1]], 2), 2, "cpu")
    assert t.parent.tolist() == [[0, 0, 0, 1]] * 2
    assert t.depth.tolist() == [[0, 1, 1, 2]] * 2
    assert t.rank.tolist() == [[0, 0, 1, 0]] * 2
    with pytest.raises(ValueError, match="deeper than the 2 draft heads"):
        close_paths([[0, 0, 0]], 2)
    with pytest.raises(ValueError, match="ranks >= 0"):
        close_paths([[0, -1]], 2)


def test_best_tree_keeps_the_chain_then_the_most_probable_paths_and_is_a_tree():
    torch.manual_seed(0)
    n_heads, n_ranks, budget = 3, 4, 9
    logp = torch.log_softmax(torch.randn(5, n_heads, 10), -1).topk(n_ranks, -1).values
    t = best_tree(logp, budget)
    for b in range(5):
        # Brute force: the joint log probability of every rank path, best `budget` of them.
        joint = {p: sum(logp[b, d, r].item() for d, r in enumerate(p))
                 for n in range(1, n_heads + 1) for p in itertools.product(range(n_ranks), repeat=n)}
        chain = [tuple([0] * n) for n in range(1, n_heads + 1)]
        rest = sorted((v for p, v in joint.items() if p not in chain), reverse=True)
        best = [joint[p] for p in chain] + rest[: budget - n_heads]
        paths = []
        for i in range(1, budget + 1):
            path, node = [], i
            while node:
                path.append(t.rank[b, node].item())
                node = t.parent[b, node].item()
            paths.append(tuple(reversed(path)))
            assert t.parent[b, i] < i and t.depth[b, i] == len(path)
        assert set(chain) <= set(paths)
        assert paths[:n_heads] == chain  # best first: cut short near the end of the cache, the chain stays
        assert sorted((joint[p] for p in paths), reverse=True) == pytest.approx(sorted(best, reverse=True))
        assert set(close_paths(paths, n_heads)) == set(paths)  # closed: parents and lower ranks present


def test_tree_mask_and_positions_follow_ancestors():
    llama = _llama()
    t = static_tree(close_paths([[0, 0], [1]], 2), 1, "cpu")
    pos = tree_positions(llama.model, t, torch.tensor([5]))
    assert pos.start.tolist() == [[5, 6, 7, 8]]
    assert torch.equal(pos.rope, llama.model.rope[torch.tensor([[5, 6, 6, 7]])])
    mask = pos.mask[0, 0].int().tolist()
    assert [row[:5] for row in mask] == [[1] * 5] * 4  # everyone sees the prompt
    assert [row[5:] for row in mask] == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert Tree(t.parent, t.depth, t.rank).children(2)[0].tolist() == [[1, 2], [3, -1], [-1, -1], [-1, -1]]


def test_compaction_starts_at_the_first_node_out_of_its_slot():
    # Node j of an accepted path belongs in slot j; past a row's draft count the path is padding.
    assert first_moved(torch.tensor([[0, 1, 2, 3], [0, 1, 5, 6]]), torch.tensor([3, 3])) == 2
    assert first_moved(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 9]]), torch.tensor([3, 2])) == 4
    assert first_moved(torch.tensor([[0, 4, 9, 9]]), torch.tensor([1])) == 1
    assert first_moved(torch.tensor([[0, 9, 9]]), torch.tensor([0])) == 3


def test_clear_errors_for_bad_trees():
    llama = _llama()
    with pytest.raises(ValueError, match="budget of at least 1"):
        llama.generate([[1]], 4, tree=0)
    with pytest.raises(ValueError, match="deeper than the 3 draft heads"):
        llama.generate([[1]], 4, tree=[[0, 0, 0, 0]])
    with pytest.raises(ValueError, match="deeper than the 1 draft heads"):
        llama.generate([[1]], 4, tree=[[0, 0]], draft_heads=1)
    with pytest.raises(ValueError, match="past the vocabulary"):
        llama.generate([[1]], 4, tree=[[300]])
    with pytest.raises(TypeError, match="node budget"):
        llama.generate([[1]], 4, tree="16")
    with pytest.raises(ValueError, match="n_future_tokens=1"):
        _llama(n_future=1).generate([[1]], 4, tree=4)


def _joint_counts(llama, tree, n_batches: int, bsz: int, seed: int, top_p: float, n: int = 3) -> torch.Tensor:
    """Counts of each sequence of the first n sampled tokens (tree=None: plain sampling)."""
    torch.manual_seed(seed)
    vocab = llama.model.args.vocab_size
    counts = torch.zeros(vocab**n)
    for _ in range(n_batches):
        out, _ = llama.generate([[1, 2, 3]] * bsz, n, temperature=1.0, top_p=top_p, tree=tree)
        idx = torch.tensor([sum(t * vocab**i for i, t in enumerate(r)) for r in out])
        counts += torch.bincount(idx, minlength=vocab**n)
    return counts


@pytest.fixture(scope="module")
def sampler():
    llama = _llama(n_future=3, vocab=8, max_batch_size=500, seed=3, std=0.3, dtype=torch.float32)
    llama.tokenizer.eos_id = -1  # every sample has three tokens
    return llama


# top_p=0.6 leaves the heads two or three candidates: the ranks past q's support are no draws.
@pytest.mark.parametrize("tree, top_p", [(6, 0.95), (STATIC[:6], 0.95), (12, 0.6)], ids=str)
def test_sampling_over_a_tree_is_lossless(sampler, tree, top_p):
    plain = _joint_counts(sampler, None, 8, 500, seed=1, top_p=top_p)
    spec = _joint_counts(sampler, tree, 8, 500, seed=2, top_p=top_p)
    assert _homogeneity_p_value(plain, spec) > 1e-3
    assert sampler.last_stats.accepted[top_p > 0.9] > 0  # drafts were accepted (at depth 2 where likely)


def test_the_statistical_test_catches_wrong_sibling_rules(sampler, monkeypatch):
    plain = _joint_counts(sampler, None, 8, 500, seed=1, top_p=0.95)
    # Forgetting that siblings are drawn without replacement (q keeps the rejected candidate).
    monkeypatch.setattr(tree_mod, "_without", lambda q, x: q)
    assert _homogeneity_p_value(plain, _joint_counts(sampler, 6, 8, 500, seed=2, top_p=0.95)) < 1e-4
    monkeypatch.undo()
    monkeypatch.setattr(tree_mod, "accept_drafts", lambda p, q, u: torch.ones_like(p, dtype=torch.bool))
    assert _homogeneity_p_value(plain, _joint_counts(sampler, 6, 8, 500, seed=2, top_p=0.95)) < 1e-6


class _FusedEagerly(DecodeSteps):
    """Decode steps that take the compiled paths (full-cache masks, the fused tree step) uncompiled."""

    def __init__(self, model):
        super().__init__(model)
        self.compiled = True
        self.calls = 0

    def compile_fn(self, fn):
        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return counted


@pytest.mark.parametrize("tree", TREES, ids=str)
@pytest.mark.parametrize("vocab", [300, 12])
def test_fused_tree_step_gives_plain_greedy_tokens(tree, vocab):
    """The fixed-shape step that compiled decoding runs (verify, accept, compact, draft the next tree
    in one function), batched and alone, over poisoned caches and up to the end of the cache."""
    llama, prompts = _small_vocab(vocab, max_seq_len=64)
    plain = llama.generate(prompts, 60, temperature=0)[0]
    assert any(len(p) + len(r) == 64 for p, r in zip(prompts, plain))  # a row reaches the end of the cache
    _poison_caches(llama)
    steps = _FusedEagerly(llama.model)
    eos = llama.tokenizer.eos_id
    assert tree_mod.generate(llama.model, prompts, 60, eos, tree=tree, steps=steps)[0] == plain
    assert [tree_mod.generate(llama.model, [p], 60, eos, tree=tree, steps=steps)[0][0] for p in prompts] == plain
    assert steps.calls > 0


@pytest.mark.slow
def test_compiled_tree_decoding_gives_plain_greedy_tokens():
    llama, prompts = _small_vocab(12, dtype=torch.float32)
    plain = llama.generate(prompts, 24, temperature=0)[0]
    compiled = Llama(llama.model, llama.tokenizer).compile()
    assert compiled.generate(prompts, 24, temperature=0, tree=16)[0] == plain
    assert compiled.generate(prompts, 24, temperature=0, tree=STATIC)[0] == plain
    assert tree_mod.greedy_tree_step in compiled.steps._compiled_fns
    assert compiled.last_stats.tokens_per_forward > 1.2  # drafts were accepted, paths compacted


@pytest.mark.parametrize("tree", [8, STATIC], ids=str)
def test_queueing_fused_tree_steps_before_reading_changes_nothing(tree):
    """lag=1 (a GPU's default) gives lag 0's tokens and statistics, with rows ending at EOS, at
    max_gen_len and at the end of the cache, and runs at most one step past the last one read."""
    ran_ahead, filled = 0, False
    for vocab in (300, 12):
        llama, prompts = _small_vocab(vocab, max_seq_len=48)
        stop = llama.generate(prompts, 20, temperature=0)[0][1][5]  # an EOS that stops a row early
        for eos, max_gen_len in ((stop, 44), (-1, 4), (-1, 44)):
            results = []
            for lag in (0, 1):
                steps = _FusedEagerly(llama.model)
                out = tree_mod.generate(llama.model, prompts, max_gen_len, eos, tree=tree, steps=steps, lag=lag)
                results.append((out, steps.calls))
            (out0, calls0), (out1, calls1) = results
            assert out1 == out0
            assert calls1 in (calls0, calls0 + 1)
            ran_ahead += calls1 - calls0
            filled |= any(len(p) + len(r) == 48 for p, r in zip(prompts, out0[0]))
    assert ran_ahead > 0 and filled  # a step ran ahead; a row filled the cache
