from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_args
from multitoken.generation import Llama


@dataclass
class IdTokenizer:
    """Ids in, ids out: generation tests need only eos_id."""

    eos_id: int = 299
    bos_id: int = 1
    pad_id: int = -1
    n_words: int = 300

    def encode(self, s, bos, eos):
        return [self.bos_id] * bos + [int(x) for x in s.split()] + [self.eos_id] * eos

    def decode(self, ids):
        return " ".join(map(str, ids))


def _llama(max_seq_len=64, max_batch_size=4, eos_id=299, seed=0) -> Llama:
    model = random_model(tiny_args(), seed=seed, dtype=torch.float64).eval()
    model.setup_caches(max_batch_size, max_seq_len)
    return Llama(model, IdTokenizer(eos_id=eos_id))


def _argmax_loop(model, prompt, n) -> list[int]:
    """Greedy decoding with no cache at all: a full forward over the whole sequence per token."""
    tokens = list(prompt)
    for _ in range(n):
        model.free_caches()
        with torch.no_grad():
            logits = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1, 0].argmax()))
    return tokens[len(prompt):]


def test_greedy_equals_cache_free_argmax_loop():
    llama = _llama()
    prompt = [1, 17, 42, 99, 7]
    out, _ = llama.generate([prompt], max_gen_len=20, temperature=0)
    model = llama.model
    expected = _argmax_loop(model, prompt, 20)
    assert out == [expected]
    assert len(out[0]) == 20


def test_batched_prompts_of_different_lengths_equal_each_alone():
    llama = _llama()
    prompts = [[1, 5], [1, 200, 3, 4, 5, 6, 7, 8], [1, 9, 9, 9], [1, 250, 1, 2, 3]]
    batched, _ = llama.generate(prompts, max_gen_len=12, temperature=0)
    alone = [llama.generate([p], max_gen_len=12, temperature=0)[0][0] for p in prompts]
    assert batched == alone


def test_each_row_stops_at_its_eos_and_never_past_it():
    llama = _llama()
    prompt = [1, 17, 42]
    free_run = _argmax_loop(llama.model, prompt, 12)
    llama.model.setup_caches(4, 64)
    eos = free_run[5]
    first = free_run.index(eos)
    llama.tokenizer.eos_id = eos
    seen = []
    out, _ = llama.generate([prompt, [1, 3]], max_gen_len=12, temperature=0, on_token=lambda r, t: seen.append((r, t)))
    assert out[0] == free_run[:first]
    assert [t for r, t in seen if r == 0] == free_run[:first]
    assert eos not in out[1]


def test_logprobs_and_echo_match_an_independent_forward():
    llama = _llama()
    prompt = [1, 8, 30, 64]
    tokens, logprobs = llama.generate([prompt], max_gen_len=6, temperature=0, logprobs=True, echo=True)
    assert tokens[0][: len(prompt)] == prompt and len(tokens[0]) == len(prompt) + 6
    model = llama.model
    model.free_caches()
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor(tokens))[0, :, 0].double(), dim=-1)
    expected = [0.0] + [float(logp[i - 1, tokens[0][i]]) for i in range(1, len(tokens[0]))]
    assert logprobs[0] == pytest.approx(expected, abs=1e-6)


def test_sampling_is_reproducible_with_a_seed_and_stays_in_vocab():
    llama = _llama()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(llama.generate([[1, 2, 3]] * 3, max_gen_len=15, temperature=1.0, top_p=0.9)[0])
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 1  # rows sample independently
    assert all(0 <= t < 300 for r in runs[0] for t in r)


def test_max_gen_len_and_max_seq_len_bound_the_output():
    llama = _llama(max_seq_len=16)
    out, _ = llama.generate([[1, 2, 3]], max_gen_len=4, temperature=0)
    assert len(out[0]) == 4
    out, _ = llama.generate([[1, 2, 3]], max_gen_len=100, temperature=0)
    assert len(out[0]) == 16 - 3
    out, _ = llama.generate([[1, 2, 3]], max_gen_len=0, temperature=0)
    assert out == [[]]


def test_prompt_that_fills_max_seq_len_returns_no_tokens_instead_of_crashing():
    llama = _llama(max_seq_len=8)
    prompt = list(range(1, 9))
    out, lp = llama.generate([prompt], max_gen_len=5, temperature=0.6, logprobs=True, echo=True)
    assert out == [prompt] and len(lp[0]) == 8
    out, _ = llama.generate([prompt, [1, 2]], max_gen_len=5, temperature=0)
    assert out[0] == [] and len(out[1]) == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_tokens=[list(range(1, 20))]), "prompt 0 has 19 tokens, more than max_seq_len=16"),
        (dict(prompt_tokens=[[1]] * 5), "5 prompts exceed max_batch_size=4"),
        (dict(prompt_tokens=[[1]], temperature=-0.1), "temperature must be >= 0"),
        (dict(prompt_tokens=[[1]], top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(prompt_tokens=[[1]], top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(prompt_tokens=[]), "no prompts given"),
        (dict(prompt_tokens=[[1], []]), "prompt 1 is empty"),
        (dict(prompt_tokens=[[1, 300]]), "outside the vocabulary"),
        (dict(prompt_tokens=[[1]], max_gen_len=-1), "max_gen_len must be >= 0"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, message):
    llama = _llama(max_seq_len=16)
    kwargs.setdefault("max_gen_len", 4)
    with pytest.raises(ValueError, match=message):
        llama.generate(**kwargs)


def test_text_completion_with_a_sentencepiece_checkpoint(tiny_ckpt):
    llama = Llama.build(tiny_ckpt, tiny_ckpt / "tokenizer.model", max_seq_len=48, max_batch_size=2, device="cpu")
    assert llama.model.output.weight.dtype == torch.float32
    prompts = ["def add(a, b):", "import os\n"]
    results = llama.text_completion(prompts, temperature=0, max_gen_len=10, logprobs=True)
    assert len(results) == 2
    for prompt, r in zip(prompts, results):
        ids = llama.tokenizer.encode(prompt, bos=True, eos=False)
        expected, _ = llama.generate([ids], max_gen_len=10, temperature=0)
        assert r["generation"] == llama.tokenizer.decode(expected[0])
        assert len(r["tokens"]) == len(r["logprobs"]) == len(expected[0])
    with pytest.raises(TypeError, match="list of strings"):
        llama.text_completion("def f():")


def test_build_rejects_a_tokenizer_of_another_size(tiny_ckpt, tmp_path):
    from multitoken.tokenizer import train_sentencepiece
    from conftest import stdlib_sources

    other = train_sentencepiece(stdlib_sources(300_000), 600, tmp_path / "other")
    with pytest.raises(ValueError, match="has 600 tokens but the checkpoint's vocab_size is 512"):
        Llama.build(tiny_ckpt, other, max_seq_len=32, max_batch_size=1)
    smaller = train_sentencepiece(stdlib_sources(100_000), 400, tmp_path / "smaller")
    assert Llama.build(tiny_ckpt, smaller, max_seq_len=32, max_batch_size=1).model.args.vocab_size == 512


def test_auto_dtype_runs_bf16_weights_in_bf16_only_where_the_kernels_run(tiny_ckpt, tmp_path, monkeypatch):
    from multitoken import kernels
    from multitoken.checkpoint import load_model, save_model, stored_dtype

    bf16 = tmp_path / "bf16"
    save_model(load_model(tiny_ckpt, dtype=torch.bfloat16), bf16)
    assert stored_dtype(bf16) == torch.bfloat16 and stored_dtype(tiny_ckpt) == torch.float32

    def built(ckpt):
        return Llama.build(ckpt, tiny_ckpt / "tokenizer.model", max_seq_len=32, max_batch_size=1, device="cpu",
                           dtype="auto").model.output.weight.dtype

    assert built(tiny_ckpt) == torch.float32  # float32 weights stay float32
    assert built(bf16) == (torch.bfloat16 if kernels.available() else torch.float32)
    monkeypatch.setenv("MULTITOKEN_KERNELS", "0")  # no kernels: ATen's bf16 is slower than float32 on a CPU
    kernels.available.cache_clear()
    try:
        assert built(bf16) == torch.float32
    finally:
        monkeypatch.undo()
        kernels.available.cache_clear()
    # The released API's default is unchanged: float32 on a CPU.
    assert Llama.build(bf16, tiny_ckpt / "tokenizer.model", max_seq_len=32, max_batch_size=1,
                       device="cpu").model.output.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="needs the checkpoint folder"):
        from multitoken.generation import default_device_and_dtype
        default_device_and_dtype("cpu", "auto")
