import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from multitoken.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """`multitoken serve ARGS` on a free port, once /health answers: (process, base URL)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "multitoken.cli", "serve", *args, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300  # a starved CI machine may take minutes to import torch
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            if time.time() > deadline:
                proc.kill()
                raise AssertionError("the server did not start")
            time.sleep(0.2)


def test_sigterm_lets_the_running_stream_finish_and_exits_0(tiny_ckpt):
    proc, url = _start_server("--ckpt-dir", str(tiny_ckpt), "--max-seq-len", "512", "--shutdown-timeout", "20")
    try:
        body = {"prompt": "def", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert json.loads(first.removeprefix("data: "))["choices"][0]["index"] == 0
        assert rest[-1] == "data: [DONE]"
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        proc.kill()
        proc.wait()


def test_serve_without_a_checkpoint_serves_the_shipped_model():
    proc, url = _start_server("--max-seq-len", "256", "--max-batch-size", "2")
    try:
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["default_model"]
        body = {"prompt": "def quicksort(arr):", "max_tokens": 8, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    import multitoken.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "DEFAULT_CKPT_DIR", tmp_path / "gone")
    with pytest.raises(SystemExit, match="default model is missing.*pass --ckpt-dir"):
        main(["serve"])
