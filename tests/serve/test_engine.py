import threading

import pytest
import torch

from conftest import random_model, tiny_args
from multitoken import grouped_heads, kernels
from multitoken.generation import Llama
from multitoken import speculative
from multitoken.serve.engine import Engine, Output, QueueFull, Request, SamplingParams
from multitoken.steps import DecodeSteps
from test_generation import IdTokenizer

VOCAB = 300
PROMPTS = [[1, 5], [1, 200, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 9, 9, 9], [1, 250, 1, 2, 3, 17, 4], [7] * 20, [1, 2]]


def _model(vocab=VOCAB, seed=0, dtype=torch.float64, std=0.1):
    return random_model(tiny_args(n_layers=6, n_future_tokens=4, vocab_size=vocab), seed=seed, dtype=dtype, std=std).eval()


def _alone(prompts, max_tokens, eos_id=VOCAB - 1) -> list[list[int]]:
    """Plain greedy decoding of each prompt by itself: what every request must get."""
    model = _model()
    model.setup_caches(1, 64)
    llama = Llama(model, IdTokenizer(eos_id=eos_id, n_words=VOCAB))
    return [llama.generate([p], max_tokens, temperature=0)[0][0] for p in prompts]


class Collect:
    """Requests that record what they receive."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = {}
        self.reasons: dict[int, str | None] = {}

    def request(self, i: int, prompt, **params) -> Request:
        self.tokens[i], self.reasons[i] = [], None

        def on_output(out: Output) -> None:
            assert self.reasons[i] is None, "output after the request finished"
            self.tokens[i] += out.tokens
            self.reasons[i] = out.finish_reason
        return Request(list(prompt), SamplingParams(**{"max_tokens": 20, **params}), on_output)


def _drain(engine: Engine) -> None:
    while engine.running or engine.waiting:
        engine.step()


@pytest.mark.parametrize("speculative", [False, True])
def test_requests_joining_midway_get_exactly_their_greedy_output_alone(speculative):
    plain = _alone(PROMPTS, 20)
    eos = plain[1][6]  # a token the second prompt produces mid-way: rows also finish early
    expected = _alone(PROMPTS, 20, eos_id=eos)
    assert any(len(e) < 20 for e in expected) and any(len(e) == 20 for e in expected)
    engine = Engine(_model(), eos, max_batch_size=3, max_seq_len=64, speculative=speculative)
    got = Collect()
    engine.submit([got.request(0, PROMPTS[0])])
    engine.step()
    engine.step()
    engine.submit([got.request(i, p) for i, p in enumerate(PROMPTS) if i > 0])  # more than the free rows
    engine.step()
    assert len(engine.running) == 3 and len(engine.waiting) == 3
    _drain(engine)
    assert [got.tokens[i] for i in range(len(PROMPTS))] == expected
    assert [got.reasons[i] for i in range(len(PROMPTS))] == ["stop" if len(e) < 20 else "length" for e in expected]
    if speculative:
        assert engine.stats.proposed[0] > 0
    assert engine.stats.tokens == sum(map(len, expected))


def test_a_request_ending_at_the_context_limit_keeps_its_drafts_and_its_output():
    prompt = list(range(1, 50))
    expected = _alone([prompt], 15)  # 49 + 15 = 64 = max_seq_len: the last token sits at the last position
    engine = Engine(_model(), VOCAB - 1, max_batch_size=2, max_seq_len=64, speculative=True)
    got = Collect()
    engine.submit([got.request(0, prompt, max_tokens=15), got.request(1, [1, 2, 3])])
    _drain(engine)
    assert got.tokens[0] == expected[0]
    with pytest.raises(ValueError, match="maximum context length is 64 tokens"):
        engine.submit([got.request(2, prompt, max_tokens=16)])


def test_cancel_frees_the_row_and_the_others_are_unaffected():
    expected = _alone(PROMPTS[:3], 20)
    engine = Engine(_model(), VOCAB - 1, max_batch_size=3, max_seq_len=64, speculative=True)
    got = Collect()
    requests = [got.request(i, p) for i, p in enumerate(PROMPTS[:3])]
    engine.submit(requests)
    engine.step()
    engine.step()
    requests[0].cancel()
    engine.step()
    assert requests[0] not in engine.running and len(engine.running) == 2
    n_cancelled = len(got.tokens[0])
    _drain(engine)
    assert len(got.tokens[0]) == n_cancelled < 20 and got.reasons[0] is None
    assert [got.tokens[1], got.tokens[2]] == expected[1:]


@pytest.mark.parametrize("speculative", [False, True])
def test_a_seed_gives_the_same_sample_whatever_the_batch_mates(speculative):
    engine = Engine(_model(), VOCAB - 1, max_batch_size=4, max_seq_len=64, speculative=speculative)
    params = dict(temperature=1.0, top_p=0.9, seed=1234)
    alone = Collect()
    engine.submit([alone.request(0, PROMPTS[1], **params)])
    _drain(engine)
    crowd = Collect()
    engine.submit([crowd.request(1, PROMPTS[0], temperature=0.7, seed=5), crowd.request(2, PROMPTS[2])])
    engine.step()
    engine.submit([crowd.request(0, PROMPTS[1], **params), crowd.request(3, PROMPTS[3], temperature=1.5)])
    _drain(engine)
    assert crowd.tokens[0] == alone.tokens[0]
    other = Collect()
    engine.submit([other.request(0, PROMPTS[1], **{**params, "seed": 4321})])
    _drain(engine)
    assert other.tokens[0] != alone.tokens[0]


def _first_tokens_counts(engine: Engine, n_batches: int, bsz: int, n: int = 3) -> torch.Tensor:
    vocab = engine.model.args.vocab_size
    counts = torch.zeros(vocab**n)
    for b in range(n_batches):
        got = Collect()
        engine.submit([got.request(i, [1, 2, 3], max_tokens=n, temperature=1.0, top_p=0.95, seed=b * bsz + i)
                       for i in range(bsz)])
        _drain(engine)
        idx = torch.tensor([sum(t * vocab**i for i, t in enumerate(got.tokens[r])) for r in range(bsz)])
        counts += torch.bincount(idx, minlength=vocab**n)
    return counts


def test_sampling_is_lossless_and_the_test_catches_a_wrong_acceptance_rule(monkeypatch):
    from test_speculative import _homogeneity_p_value, _joint_counts, _llama

    llama = _llama(n_future=3, vocab=8, max_batch_size=500, seed=3, std=0.3, dtype=torch.float32)
    llama.tokenizer.eos_id = -1  # every sample has three tokens
    plain = _joint_counts(llama, False, 8, 500, seed=1)  # the reference: plain sampling
    engine = Engine(llama.model, -1, max_batch_size=500, max_seq_len=64, speculative=True, max_queue=500)
    spec = _first_tokens_counts(engine, 8, 500)
    assert _homogeneity_p_value(plain, spec) > 1e-3
    assert engine.stats.accepted[0] > 0  # drafts were accepted, so acceptance was exercised

    # The acceptance's kernel (ATen's ids bit for bit: tests/test_kernels.py) off, ATen's rule made wrong.
    monkeypatch.setattr(kernels, "sampling_runs", lambda probs: False)
    monkeypatch.setattr(speculative, "accept_drafts", lambda p, q, u: torch.ones_like(p, dtype=torch.bool))
    wrong = _first_tokens_counts(engine, 8, 500)
    assert _homogeneity_p_value(plain, wrong) < 1e-6


def test_logprobs_are_the_models_and_the_greedy_token_is_the_most_likely():
    model = _model()
    model.setup_caches(1, 64)
    llama = Llama(model, IdTokenizer(eos_id=VOCAB - 1, n_words=VOCAB))
    tokens, logprobs = llama.generate([PROMPTS[1]], 8, temperature=0, logprobs=True)
    engine = Engine(_model(), VOCAB - 1, max_batch_size=2, max_seq_len=64, speculative=True)
    got, lps = [], []
    engine.submit([Request(PROMPTS[1], SamplingParams(8, logprobs=3),
                           lambda out: (got.extend(out.tokens), lps.extend(out.logprobs))),
                   Request(PROMPTS[0], SamplingParams(8), lambda out: None)])  # a batch mate without logprobs
    _drain(engine)
    assert got == tokens[0]
    assert [lp.logprob for lp in lps] == pytest.approx(logprobs[0], abs=1e-5)  # float32 logits
    assert all(len(lp.top) == 3 and lp.top[0] == (t, pytest.approx(lp.logprob)) for t, lp in zip(got, lps))


def test_a_full_queue_refuses_all_or_nothing_and_bad_requests_are_refused():
    engine = Engine(_model(), VOCAB - 1, max_batch_size=1, max_seq_len=64, speculative=False, max_queue=2)
    got = Collect()
    engine.submit([got.request(0, [1, 2])])
    with pytest.raises(QueueFull, match="no room for 2 more completions: 1 of the queue's 2 places"):
        engine.submit([got.request(1, [1, 2]), got.request(2, [1, 2])])
    assert len(engine.waiting) == 1
    for prompt, params, message in [([], {}, "empty"), ([1, VOCAB], {}, "outside the vocabulary"),
                                    ([1], {"max_tokens": 0}, "at least 1"), ([1], {"temperature": -1}, "temperature"),
                                    ([1], {"top_p": 0}, "top_p")]:
        with pytest.raises(ValueError, match=message):
            engine.submit([got.request(3, prompt, **params)])


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_serves_on(monkeypatch):
    engine = Engine(_model(), VOCAB - 1, max_batch_size=2, max_seq_len=64, speculative=True)
    thread = engine.start()
    real = engine._decode
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        real()
    monkeypatch.setattr(engine, "_decode", flaky)
    done = threading.Event()
    got = Collect()
    first = got.request(0, [1, 2])
    first.on_output = lambda out, f=first.on_output: (f(out), out.finish_reason and done.set())
    engine.submit([first])
    assert done.wait(10) and got.reasons[0] == "error"
    done.clear()
    second = got.request(1, PROMPTS[1])
    second.on_output = lambda out, f=second.on_output: (f(out), out.finish_reason and done.set())
    engine.submit([second])
    assert done.wait(10) and got.reasons[1] == "length"
    assert got.tokens[1] == _alone([PROMPTS[1]], 20)[0]
    engine.stop()
    thread.join(10)
    assert not thread.is_alive()


@pytest.mark.skipif(not kernels.available(), reason="needs the bf16 CPU kernels")
def test_heads_grouped_by_the_bf16_kernels_draft_as_one_by_one_in_served_rows(monkeypatch):
    def serve(grouped: bool) -> list[torch.Tensor]:
        model = _model(dtype=torch.bfloat16, std=0.3)
        model.setup_caches(3, 64)
        DecodeSteps(model)  # puts the bf16 kernels in the model's products and attention
        calls = []
        forward = grouped_heads.forward
        monkeypatch.setattr(grouped_heads, "usable", grouped_heads.usable if grouped else lambda heads, h: False)
        monkeypatch.setattr(grouped_heads, "forward", lambda *args: calls.append(1) or forward(*args))
        engine = Engine(model, VOCAB - 1, max_batch_size=3, max_seq_len=64)
        got = Collect()
        engine.submit([got.request(i, p, max_tokens=12) for i, p in enumerate(PROMPTS)])  # rows get reused
        drafts = []
        while engine.running or engine.waiting:
            engine.step()
            drafts.append(engine.drafts.clone())
        monkeypatch.undo()
        assert bool(calls) == grouped
        return drafts + [torch.tensor(got.tokens[i]) for i in range(len(PROMPTS))]

    grouped, one_by_one = serve(True), serve(False)
    assert len(grouped) == len(one_by_one) and all(torch.equal(a, b) for a, b in zip(grouped, one_by_one))
