"""Meta format to Meta format: merge model-parallel shards into one file and/or change the weights' dtype
(the shipped default model is stored in bfloat16 this way), carrying the tokenizer along."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from multitoken.checkpoint import CheckpointError, load_model, save_model

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def recast(ckpt_dir: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write `ckpt_dir` to `out` as one consolidated file in `dtype` (default: as stored)."""
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if out.resolve() == ckpt_dir.resolve():
        raise CheckpointError(f"--out {out} is the checkpoint being read: write to another folder")
    model = load_model(ckpt_dir, dtype=dtype, max_seq_len=1)  # the smallest cache: only the weights matter
    save_model(model, out)
    for folder in (ckpt_dir, ckpt_dir.parent):  # the trainer keeps the tokenizer beside its checkpoints
        found = [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()]
        if found:
            for f in found:
                shutil.copyfile(f, out / f.name)
            break
    return out
