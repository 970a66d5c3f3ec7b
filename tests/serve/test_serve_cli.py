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


def test_sigterm_lets_the_running_stream_finish_and_exits_0(tiny_ckpt):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "multitoken.cli", "serve", "--ckpt-dir", str(tiny_ckpt),
                             "--port", str(port), "--max-seq-len", "512", "--shutdown-timeout", "20"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300  # a starved CI machine may take minutes to import torch
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.2)
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


def test_serve_without_a_checkpoint_says_what_to_pass(capsys):
    with pytest.raises(SystemExit, match="pass --ckpt-dir"):
        main(["serve"])
