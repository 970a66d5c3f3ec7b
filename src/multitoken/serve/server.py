"""Load a model once and serve it with uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import uvicorn

from multitoken.generation import Llama
from multitoken.serve.app import ServerConfig, create_app
from multitoken.serve.engine import Engine


def serve(
    ckpt_dir: Path,
    tokenizer_path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_len: int = 2048,
    max_queue: int = 256,
    speculative: bool | None = None,
    draft_heads: int | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    shutdown_timeout: float = 30.0,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                        device=device, dtype=dtype)
    if speculative is None:  # self-speculate whenever the model has heads to draft with
        speculative = llama.model.n_future_tokens > 1
    engine = Engine(llama.model, llama.tokenizer.eos_id, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                    speculative=speculative, draft_heads=draft_heads, max_queue=max_queue)
    config = ServerConfig(model_name=model_name or Path(ckpt_dir).resolve().name, api_key=api_key)
    app = create_app(engine, llama.tokenizer, config)
    drafting = f"self-speculation with {engine.k} draft heads" if engine.k else "no self-speculation"
    print(f"serving {config.model_name}: {drafting}, {max_batch_size} batch rows, context {max_seq_len}",
          file=sys.stderr)
    # On SIGTERM uvicorn stops accepting, waits for in-flight requests up to the timeout, then cancels
    # them, and the app's lifespan stops the engine. uvicorn then re-raises the signal under the
    # handler that was there before it: a SIGTERM that finds this no-op handler lets us exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=math.ceil(shutdown_timeout),
                log_level="info")
