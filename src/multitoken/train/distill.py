"""Self-distillation data: text a model generates itself from a set of prompts.

Heads added to an existing model (`multitoken train --from CKPT --add-heads K --freeze-trunk`) draft
well when they learn what that model says, not what some corpus says: trained on the model's own
samples, head i learns the model's distribution of token t + 1 + i (Medusa-2's self-distillation).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from multitoken.generation import Llama


def chat_formatter(template_path: Path):
    """prompt -> the model's chat-formatted user turn plus the assistant's opening, from a Hugging Face
    `chat_template.jinja` (as `convert --from-hf/--from-gguf` write beside the checkpoint)."""
    import jinja2

    if not template_path.is_file():
        raise FileNotFoundError(f"--chat needs the model's chat template, but {template_path} does not exist")
    template = jinja2.Environment().from_string(template_path.read_text("utf-8"))
    return lambda prompt: template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)


def self_distill(
    llama: Llama,
    prompts: Sequence[str],
    out: Path,
    *,
    samples_per_prompt: int = 1,
    max_gen_len: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 8,
    chat_template: Path | None = None,
    progress: bool = True,
) -> int:
    """Write one JSON line {"text": prompt + completion} per sample to `out` (atomically: a temporary
    file renamed at the end); returns the number of generated tokens."""
    from tqdm import tqdm

    if not prompts:
        raise ValueError("no prompts: give a prompts file with one prompt per line")
    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError("samples_per_prompt and batch_size must be >= 1")
    fmt = chat_formatter(chat_template) if chat_template is not None else (lambda p: p)
    texts = [fmt(p) for p in prompts for _ in range(samples_per_prompt)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    n_tokens = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f, tqdm(total=len(texts), desc="self-distilling",
                                                              unit=" samples", disable=not progress) as bar:
            for i in range(0, len(texts), batch_size):
                batch = texts[i : i + batch_size]
                tokens = [llama.tokenizer.encode(t, bos=True, eos=False) for t in batch]
                completions, _ = llama.generate(tokens, max_gen_len, temperature=temperature, top_p=top_p)
                for text, completion in zip(batch, completions):
                    n_tokens += len(completion)
                    f.write(json.dumps({"text": text + llama.tokenizer.decode(completion)}) + "\n")
                bar.update(len(batch))
                bar.set_postfix(tokens=n_tokens)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return n_tokens
