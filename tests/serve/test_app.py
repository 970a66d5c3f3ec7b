"""The server on loopback, driven by the official `openai` client, raw HTTP (httpx) and curl."""

import json
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

from conftest import random_model, tiny_args
from multitoken.generation import Llama
from multitoken.serve.app import ServerConfig, create_app
from multitoken.serve.engine import Engine
from multitoken.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MAX_SEQ_LEN = 96


def _model():
    args = tiny_args(n_layers=6, n_future_tokens=4, vocab_size=TOK.n_words)
    return random_model(args, seed=1, dtype=torch.float64).eval()


def _alone(prompt: str, max_tokens: int) -> str:
    """Plain greedy decoding of the prompt by itself, as text: what the server must answer."""
    model = _model()
    model.setup_caches(1, MAX_SEQ_LEN)
    llama = Llama(model, TOK)
    return TOK.decode(llama.generate([TOK.encode(prompt, bos=True, eos=False)], max_tokens, temperature=0)[0][0])


@contextmanager
def _serve(speculative=True, max_batch_size=4, max_queue=16, api_key=None, engine_hook=None):
    engine = Engine(_model(), TOK.eos_id, max_batch_size=max_batch_size, max_seq_len=MAX_SEQ_LEN,
                    speculative=speculative, max_queue=max_queue)
    if engine_hook:
        engine_hook(engine)
    app = create_app(engine, TOK, ServerConfig(model_name="tiny", api_key=api_key, max_body_bytes=4096, max_n=3))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server():
    with _serve() as (url, engine):
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_completion_with_the_openai_client_equals_decoding_alone(client):
    r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12, temperature=0)
    assert r.choices[0].text == _alone("def f(x):", 12)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion" and r.model == "tiny"
    assert r.usage.prompt_tokens == 10 and r.usage.completion_tokens == 12 and r.usage.total_tokens == 22


def test_concurrent_streams_each_get_their_own_greedy_output(client):
    prompts = ["import os", "x = [", "def main():\n    ", "#"]
    lengths = [30, 8, 20, 14]
    texts = {}

    def stream(prompt: str, n: int) -> None:
        chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        texts[prompt] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=stream, args=a) for a in zip(prompts, lengths)]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.02 * i)  # staggered: later requests join a running batch
    for t in threads:
        t.join(30)
    assert texts == {p: _alone(p, n) for p, n in zip(prompts, lengths)}


def test_a_stream_may_end_with_the_usage(client):
    chunks = list(client.completions.create(model="tiny", prompt="ab", max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == 3


def test_stream_events_are_server_sent_events_ending_with_done(server):
    with httpx.stream("POST", server[0] + "/v1/completions", timeout=30,
                      json={"prompt": "abc", "max_tokens": 10, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events) == _alone("abc", 10)
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_several_prompts_and_n_choices_are_indexed_prompt_major(client):
    r = client.completions.create(model="tiny", prompt=["a", "bb"], n=2, max_tokens=5, temperature=0)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1] == _alone("a", 5) and by_index[2] == by_index[3] == _alone("bb", 5)


def test_a_stop_string_ends_the_text_before_it(client):
    full = _alone("def f(x):", 30)
    stop = full[10:12]
    assert stop and full.index(stop) >= 1
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=30, temperature=0, stop=[stop],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (full[: full.index(stop)], "stop")


def test_seeded_sampling_is_reproducible_and_the_seed_matters(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="tiny", prompt="x", max_tokens=16, temperature=1.0, seed=seed).choices[0].text
    assert sample(7) == sample(7) != sample(8)


def test_logprobs_of_a_greedy_completion_pick_the_most_likely_token(client):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(chosen)
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
    text = httpx.get(server[0] + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["multitoken_generated_tokens_total"] == server[1].stats.tokens >= 5
    assert values["multitoken_time_to_first_token_seconds_count"] >= 1
    assert values['multitoken_http_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert 'multitoken_draft_acceptance{position="3"}' in values and "multitoken_queue_length" in values


BAD_REQUESTS = [
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": MAX_SEQ_LEN}, "prompt"),  # prompt + max_tokens over the context
    ({"prompt": "a" * MAX_SEQ_LEN, "max_tokens": 1}, "prompt"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "n": 4}, "n"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [[1, 100000]]}, None),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body, param", BAD_REQUESTS)
def test_bad_requests_get_400_with_an_openai_error_body(server, body, param):
    r = httpx.post(server[0] + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_invalid_json_oversized_bodies_unknown_models_and_paths(server):
    url = server[0]
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "a",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "a" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(url + "/v1/completions", content=iter([b'{"prompt": "', b"a" * 5000, b'"}']))
    assert chunked.status_code == 413
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(url + "/v1/chat/completions")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(url + "/v1/completions").status_code == 405


def test_the_openai_client_sees_errors_as_its_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="a" * 80, max_tokens=40)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="a")


def test_a_full_queue_answers_429_and_the_queued_request_still_completes():
    gate = threading.Event()

    def hold(engine: Engine) -> None:  # the engine waits at its next step until the gate opens
        step = engine.step
        engine.step = lambda: (gate.wait(30), step())
    with _serve(max_batch_size=1, max_queue=1, engine_hook=hold) as (url, engine):
        result = {}
        first = threading.Thread(target=lambda: result.update(r=httpx.post(
            url + "/v1/completions", json={"prompt": "a", "max_tokens": 3}, timeout=30)))
        first.start()
        while engine.queue_length == 0:
            time.sleep(0.01)
        r = httpx.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 3})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        gate.set()
        first.join(30)
        assert result["r"].status_code == 200


def _slow(engine: Engine) -> None:
    step = engine.step
    engine.step = lambda: (time.sleep(0.03), step())  # 90 tokens take seconds


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_its_row_at_once(stream):
    with _serve(engine_hook=_slow) as (url, engine):
        body = json.dumps({"prompt": "a", "max_tokens": 90, "temperature": 0, "stream": stream}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            _wait_for(lambda: engine.running)
            request = engine.running[0]
        _wait_for(lambda: not engine.running)
        assert request.cancelled and request.n_generated < 90  # freed by the hang-up, not by finishing


def test_an_api_key_is_required_when_set():
    with _serve(api_key="s3cret") as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0).choices[0].text == _alone("a", 2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl(server):
    body = json.dumps({"prompt": "abc", "max_tokens": 8, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", server[0] + "/v1/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=30).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == _alone("abc", 8)
    out = subprocess.run(["curl", "-s", "-w", "%{http_code}", server[0] + "/v1/completions", "-d", "{oops"],
                         capture_output=True, text=True, timeout=30).stdout
    assert out.endswith("400") and json.loads(out[:-3])["error"]["type"] == "invalid_request_error"
