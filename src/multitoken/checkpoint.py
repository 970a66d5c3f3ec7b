"""Meta-format checkpoints: `params.json` plus one `*.pth` per model-parallel rank.

Loading builds the model on the meta device, merges shards tensor by tensor from memory-mapped files
and assigns them, so a large model never exists twice in memory. Keys and shapes are checked strictly
(the release loads with strict=False, which silently leaves heads uninitialised).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from multitoken.model import ModelArgs, Transformer


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as asked; the message says why and what to do."""


# Model-parallel split dimension of each weight (Llama convention); anything else is replicated.
_SHARD_DIM = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
}
_IGNORED_KEYS = ("rope.freqs",)  # older Llama checkpoints store the rotary table; we compute it

# The model shipped inside the package (see its MODEL_CARD.md): what commands use without --ckpt-dir.
DEFAULT_CKPT_DIR = Path(__file__).parent / "default_model"


def default_ckpt_dir() -> Path:
    """The shipped default model's folder (params.json, consolidated.00.pth, tokenizer.model)."""
    if not (DEFAULT_CKPT_DIR / "params.json").is_file():
        raise CheckpointError(f"the default model is missing from this installation ({DEFAULT_CKPT_DIR}): "
                              f"reinstall multitoken, or pass --ckpt-dir DIR")
    return DEFAULT_CKPT_DIR


def _shard_dim(key: str) -> int | None:
    for suffix, dim in _SHARD_DIM.items():
        if key.endswith(suffix):
            return dim
    return None


def _weight_files(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
    files = sorted(ckpt_dir.glob("*.pth"))
    if not files:
        raise FileNotFoundError(
            f"no *.pth weight file in {ckpt_dir}: expected consolidated.pth or consolidated.00.pth, ..."
        )
    return files


def read_params(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: a Meta-format checkpoint folder needs params.json beside its *.pth")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only refuses pickles that would run code; mmap leaves the data on disk until used.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (its pickle asks to run code "
            f"or build objects that weights_only loading forbids). Details: {str(e).splitlines()[0]}"
        ) from None
    except RuntimeError as e:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k: v for k, v in state.items() if k not in _IGNORED_KEYS}


def stored_dtype(ckpt_dir: str | os.PathLike) -> torch.dtype:
    """The dtype of a checkpoint's weights on disk (its embedding table's; the file is memory-mapped,
    so no weight is read)."""
    state = _load_file(_weight_files(Path(ckpt_dir))[0])
    weight = state.get("tok_embeddings.weight")
    if weight is None:
        weight = next((v for v in state.values() if v.is_floating_point()), None)
    if weight is None:
        raise CheckpointError(f"{ckpt_dir}: the weights hold no floating-point tensor")
    return weight.dtype


def _merge_shards(shards: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    parts = [s[key] for s in shards]
    if len(parts) == 1:
        return parts[0]
    dim = _shard_dim(key)
    return parts[0] if dim is None else torch.cat(parts, dim=dim)


def _heads_in(keys: set[str]) -> tuple[int, int]:
    """(number of `layers` blocks, number of `extra_heads` blocks) found in a state dict's keys."""
    def count(prefix: str) -> int:
        idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
        return max(idx) + 1 if idx else 0

    return count("layers"), count("extra_heads")


def _check_keys(args: ModelArgs, expected: dict[str, torch.Size], found: dict[str, torch.Size], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        n_layers_file, n_extra_file = _heads_in(set(found))
        msg = [f"checkpoint {where} does not match its params.json."]
        if (n_layers_file, n_extra_file) != (args.n_layers - args.n_future_tokens + 1, args.n_future_tokens - 1):
            msg.append(
                f"The weights hold {n_layers_file} `layers` blocks and {n_extra_file} `extra_heads`, i.e. "
                f"n_future_tokens={n_extra_file + 1} with n_layers={n_layers_file + n_extra_file}; params.json "
                f"says n_future_tokens={args.n_future_tokens}, n_layers={args.n_layers}."
            )
        if missing:
            msg.append(f"Missing keys ({len(missing)}): {_abbrev(missing)}")
        if unexpected:
            msg.append(f"Unexpected keys ({len(unexpected)}): {_abbrev(unexpected)}")
        raise CheckpointError("\n".join(msg))
    wrong = [f"{k}: file {tuple(found[k])}, model {tuple(expected[k])}" for k in sorted(expected) if found[k] != expected[k]]
    if wrong:
        raise CheckpointError(
            f"checkpoint {where} has tensors whose shapes do not match params.json "
            f"(dim, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier):\n  " + "\n  ".join(wrong[:20])
        )


def _abbrev(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_model(
    ckpt_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_seq_len: int = 2048,
    max_batch_size: int = 1,
    vocab_size: int | None = None,
) -> Transformer:
    """Load a Meta-format checkpoint (any number of model-parallel shards) with KV caches allocated.

    dtype defaults to the dtype stored in the file, device to CPU. `vocab_size` resolves a
    params.json that says -1; without it the vocabulary size is read off the embedding weights.
    """
    ckpt_dir = Path(ckpt_dir)
    params = read_params(ckpt_dir)
    files = _weight_files(ckpt_dir)
    shards = [_load_file(f) for f in files]
    key_sets = [set(s) for s in shards]
    if any(ks != key_sets[0] for ks in key_sets[1:]):
        raise CheckpointError(f"the {len(files)} shards in {ckpt_dir} do not hold the same keys: {[f.name for f in files]}")

    if params.get("vocab_size", -1) == -1:
        if vocab_size is None:
            emb = shards[0].get("tok_embeddings.weight")
            if emb is None:
                raise CheckpointError(f"{ckpt_dir}: params.json has vocab_size -1 and the weights have no tok_embeddings")
            vocab_size = emb.shape[0]
        params = {**params, "vocab_size": vocab_size}
    try:
        args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir / 'params.json'}: {e}") from None

    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = {}
    for key in key_sets[0]:
        dim = _shard_dim(key) if len(shards) > 1 else None
        shape = list(shards[0][key].shape)
        if dim is not None:
            shape[dim] = sum(s[key].shape[dim] for s in shards)
        found[key] = torch.Size(shape)
    _check_keys(args, expected, found, ckpt_dir)

    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = shards[0]["tok_embeddings.weight"].dtype
    state = {}
    for key in expected:
        # One tensor at a time: merge, convert, move; the mmap'd source stays on disk.
        state[key] = _merge_shards(shards, key).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    del shards, state
    model.setup_caches(max_batch_size, max_seq_len)  # also rebuilds the rotary table off the meta device
    return model.eval()


def save_model(model: Transformer, out_dir: str | os.PathLike) -> Path:
    """Write params.json and consolidated.00.pth; each goes to a temporary name first, then is renamed,
    so an interrupted save never leaves a half-written file under the final name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out_dir / "consolidated.00.pth", lambda f: torch.save(state, f))
    params = json.dumps(model.args.to_params(), indent=2) + "\n"
    _atomic_write(out_dir / "params.json", lambda f: f.write(params.encode()))
    return out_dir


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files only their owner can read; a checkpoint is for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
