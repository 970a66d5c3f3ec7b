import json
import os
import pickle

import pytest
import torch

from conftest import random_model, tiny_args
from multitoken.checkpoint import CheckpointError, load_model, save_model


def _save_sharded(model, out, n_shards: int) -> None:
    """Split a state dict the way Llama model-parallel ranks store it."""
    col = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
    row = ("wo.weight", "w2.weight", "tok_embeddings.weight")
    shards = [{} for _ in range(n_shards)]
    for k, v in model.state_dict().items():
        dim = 0 if k.endswith(col) else 1 if k.endswith(row) else None
        parts = v.chunk(n_shards, dim=dim) if dim is not None else [v] * n_shards
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    out.mkdir()
    for i, s in enumerate(shards):
        torch.save(s, out / f"consolidated.{i:02d}.pth")
    (out / "params.json").write_text(json.dumps(model.args.to_params()))


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


def test_save_load_round_trip(tmp_path):
    model = random_model()
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["consolidated.00.pth", "params.json"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in (tmp_path / "ckpt").iterdir())  # readable by others
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    assert params["n_future_tokens"] == 3 and "max_seq_len" not in params
    loaded = load_model(tmp_path / "ckpt", max_seq_len=64, max_batch_size=2)
    _same_weights(model, loaded)
    assert loaded.has_caches and loaded.args.max_seq_len == 64
    tokens = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, return_all_heads=True), model(tokens, return_all_heads=True))


def test_two_shards_load_to_the_same_model(tmp_path):
    model = random_model()
    save_model(model, tmp_path / "one")
    _save_sharded(model, tmp_path / "two", 2)
    _same_weights(load_model(tmp_path / "one"), load_model(tmp_path / "two"))


def test_dtype_conversion_and_vocab_size_minus_one(tmp_path):
    model = random_model()
    save_model(model, tmp_path / "ckpt")
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    loaded = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert loaded.args.vocab_size == 300
    assert loaded.output.weight.dtype == torch.bfloat16
    assert loaded.layers[0].attention.cache.k.dtype == torch.bfloat16


def test_rope_freqs_from_older_checkpoints_is_ignored(tmp_path):
    model = random_model()
    save_model(model, tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "consolidated.00.pth", weights_only=True)
    state["rope.freqs"] = torch.zeros(8)
    torch.save(state, tmp_path / "ckpt" / "consolidated.00.pth")
    load_model(tmp_path / "ckpt")


def test_wrong_n_future_tokens_says_what_the_file_holds(tmp_path):
    save_model(random_model(tiny_args(n_future_tokens=3)), tmp_path / "ckpt")
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps({**params, "n_future_tokens": 1}))
    with pytest.raises(CheckpointError, match=r"n_future_tokens=3 with n_layers=5.*says n_future_tokens=1"):
        load_model(tmp_path / "ckpt")


def test_missing_key_is_named(tmp_path):
    model = random_model()
    state = model.state_dict()
    del state["extra_heads.1.ffn_norm.weight"]
    (tmp_path / "ckpt").mkdir()
    torch.save(state, tmp_path / "ckpt" / "consolidated.00.pth")
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps(model.args.to_params()))
    with pytest.raises(CheckpointError, match=r"Missing keys \(1\): extra_heads.1.ffn_norm.weight"):
        load_model(tmp_path / "ckpt")


def test_wrong_shape_is_named(tmp_path):
    save_model(random_model(tiny_args(dim=64)), tmp_path / "ckpt")
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps({**params, "vocab_size": 301}))
    with pytest.raises(CheckpointError, match=r"output.weight: file \(300, 64\), model \(301, 64\)"):
        load_model(tmp_path / "ckpt")


def test_missing_params_json(tmp_path):
    save_model(random_model(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_model(tmp_path / "ckpt")


def test_folder_without_weights(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(tiny_args().to_params()))
    with pytest.raises(FileNotFoundError, match=r"no \*.pth weight file"):
        load_model(tmp_path)


def test_unknown_params_field(tmp_path):
    save_model(random_model(), tmp_path / "ckpt")
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    (tmp_path / "ckpt" / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    with pytest.raises(CheckpointError, match="use_scaled_rope"):
        load_model(tmp_path / "ckpt")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "legacy pickle"])
def test_malicious_pickle_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "params.json").write_text(json.dumps(tiny_args().to_params()))
    payload = {"tok_embeddings.weight": _Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, ckpt / "consolidated.00.pth")
    else:
        with open(ckpt / "consolidated.00.pth", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(ckpt)
    assert not marker.exists()


def test_interrupted_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    model = random_model()
    save_model(model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "consolidated.00.pth").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(random_model(seed=1), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "consolidated.00.pth").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["consolidated.00.pth", "params.json"]
