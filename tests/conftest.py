import os
from pathlib import Path

import pytest
import torch

from multitoken.checkpoint import save_model
from multitoken.model import ModelArgs, Transformer


def tiny_args(**overrides) -> ModelArgs:
    """A small model with grouped-query attention and 3 prediction heads."""
    defaults = dict(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=300, n_future_tokens=3,
                    multiple_of=32, max_seq_len=128)
    return ModelArgs(**{**defaults, **overrides})


def random_model(args: ModelArgs | None = None, seed: int = 0, dtype=torch.float32, std: float = 0.1) -> Transformer:
    """Random weights with std large enough that logits are far from uniform (no argmax near-ties)."""
    torch.manual_seed(seed)
    model = Transformer(args or tiny_args())
    model.init_weights(std=std)
    with torch.no_grad():  # random norm weights too, so a wrong norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def stdlib_sources(max_bytes: int = 300_000) -> list[Path]:
    """A fixed list of the running Python's own standard library files: test data with no download."""
    root = Path(os.__file__).parent
    files, total = [], 0
    for path in sorted(root.glob("*.py")):
        files.append(path)
        total += path.stat().st_size
        if total >= max_bytes:
            break
    return files


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    """A SentencePiece code tokenizer (vocab 512) trained on stdlib sources inside the test run."""
    from multitoken.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("sp") / "tokenizer"
    return train_sentencepiece(stdlib_sources(), 512, out)


@pytest.fixture
def tiny_ckpt(tmp_path, sp_model_path) -> Path:
    """A checkpoint folder (params.json, consolidated.00.pth, tokenizer.model) of a random n=3 model."""
    import shutil

    ckpt = tmp_path / "ckpt"
    save_model(random_model(tiny_args(vocab_size=512)), ckpt)
    shutil.copy(sp_model_path, ckpt / "tokenizer.model")
    return ckpt
