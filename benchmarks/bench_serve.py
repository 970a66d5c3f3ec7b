"""Load test of `multitoken serve` on loopback: concurrent clients, with and without self-speculation, one run.

    python benchmarks/bench_serve.py [--ckpt-dir CKPT] [--clients 64] [--requests 128] [--max-batch-size 16]
        [--time-limit 45] [--device cpu] [--dtype float32]

The model loads once; for each mode the server (engine + HTTP app under uvicorn) runs in a thread of
this process on a free loopback port, and `--clients` concurrent asyncio clients send `--requests` completions in all (the same ones in both modes, greedy):
prompts of mixed lengths (openings of Python standard library modules), mixed max_tokens, every
other one streamed. Each mode is bounded by `--time-limit` seconds; unfinished requests are reported.
Prints throughput (generated tokens/s over the mode's wall time), p50/p99 time to first token and
time per output token after the first (streamed requests), and the server's tokens per forward.

Without --ckpt-dir the model is a random byte-level one (so its drafts are rarely accepted and
self-speculation cannot pay off): the numbers then measure the server, not the model's heads.
Clients and server share one Python process (and its GIL): on a small model the clients' share of
the CPU shows in the latencies; the two modes bear it alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn

from multitoken.checkpoint import save_model
from multitoken.cli import _find_tokenizer as find_tokenizer
from multitoken.generation import Llama
from multitoken.model import ModelArgs, Transformer
from multitoken.serve.app import ServerConfig, create_app
from multitoken.serve.engine import Engine


@dataclass
class Result:
    ok: bool
    tokens: int = 0
    ttft: float | None = None  # streamed requests only
    per_token: float | None = None


def _workload(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    stdlib = Path(os.__file__).parent
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    bodies = []
    for i in range(n):
        text = rng.choice(texts)
        start = rng.randrange(max(1, len(text) - 400))
        bodies.append({"prompt": text[start : start + rng.choice([16, 48, 120, 240])],
                       "max_tokens": rng.choice([16, 32, 64, 128]), "temperature": 0, "stream": i % 2 == 0,
                       "stream_options": {"include_usage": True}})
    return bodies


async def _one(client: httpx.AsyncClient, body: dict) -> Result:
    start = time.perf_counter()
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        return Result(r.status_code == 200, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0)
    first = last = None
    tokens, done = 0, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event.get("choices"):
                last = time.perf_counter()
                first = first or last
    if not done or first is None:
        return Result(False)
    per_token = (last - first) / (tokens - 1) if tokens > 1 else None
    return Result(True, tokens, first - start, per_token)


async def _load(url: str, bodies: list[dict], clients: int, time_limit: float) -> tuple[list[Result], float]:
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results: list[Result] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            try:
                results.append(await _one(client, body))
            except httpx.HTTPError:
                results.append(Result(False))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=time_limit, limits=limits) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(client_loop(client)) for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:
            t.cancel()
        elapsed = time.perf_counter() - start
    return results, elapsed


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


@contextmanager
def _server(llama: Llama, speculative: bool, a: argparse.Namespace) -> Iterator[tuple[str, Engine]]:
    engine = Engine(llama.model, llama.tokenizer.eos_id, max_batch_size=a.max_batch_size, max_seq_len=a.max_seq_len,
                    speculative=speculative, max_queue=a.requests)
    app = create_app(engine, llama.tokenizer, ServerConfig(model_name="bench"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(60)


def _random_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=259, n_future_tokens=4, multiple_of=32)
    model = Transformer(args)
    model.init_weights()
    save_model(model, folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, help="default: a random byte-level n=4 model")
    p.add_argument("--tokenizer-path", help="default: the checkpoint's (or 'byte' for the random model)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--time-limit", type=float, default=45.0, help="seconds per mode")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    a = p.parse_args()

    torch.set_num_threads(a.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.ckpt_dir or _random_checkpoint(Path(tmp))
        tokenizer = a.tokenizer_path or ("byte" if a.ckpt_dir is None else find_tokenizer(ckpt))
        llama = Llama.build(ckpt, tokenizer, max_seq_len=a.max_seq_len, max_batch_size=1, device=a.device,
                            dtype=a.dtype)
    bodies = _workload(a.requests)
    print(f"{a.clients} clients, {a.requests} requests (half streamed), max batch {a.max_batch_size}, "
          f"model {'random (byte-level, n=4)' if a.ckpt_dir is None else ckpt}, {a.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'mode':<13}{'done':>8}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'TPOT p50':>10}{'TPOT p99':>10}{'tau':>6}")
    for speculative in (False, True):
        with _server(llama, speculative, a) as (url, engine):
            results, elapsed = asyncio.run(_load(url, bodies, a.clients, a.time_limit))
        ok = [r for r in results if r.ok]
        ttft = [r.ttft for r in ok if r.ttft is not None]
        tpot = [r.per_token for r in ok if r.per_token is not None]
        ms = lambda x: f"{1000 * x:.0f}ms"  # noqa: E731
        print(f"{'speculative' if speculative else 'plain':<13}{f'{len(ok)}/{a.requests}':>8}"
              f"{sum(r.tokens for r in ok) / elapsed:>10.1f}{ms(_percentile(ttft, 0.5)):>10}"
              f"{ms(_percentile(ttft, 0.99)):>10}{ms(_percentile(tpot, 0.5)):>10}{ms(_percentile(tpot, 0.99)):>10}"
              f"{engine.stats.tokens_per_forward:>6.2f}")


if __name__ == "__main__":
    main()
