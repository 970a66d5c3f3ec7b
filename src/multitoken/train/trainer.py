"""The training loop: AdamW, warmup + cosine, gradient accumulation, crash-safe resumable checkpoints.

A run writes into OUT:
    metrics.jsonl          one JSON line per step (split "train") and per evaluation (split "val")
    step-000100/           params.json + consolidated.00.pth (Meta format, loadable by `generate`),
                           tokenizer.model, train_state.pt (optimizer, step, data position, RNG), COMPLETE
A step folder is built under a temporary name and renamed only once COMPLETE is written inside it, so a
`step-*` folder always holds a whole checkpoint; `--resume` picks the newest one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from multitoken.checkpoint import load_model, read_params, save_model
from multitoken.model import ModelArgs, Transformer
from multitoken.train import distributed as dist_utils
from multitoken.train.data import TokenData
from multitoken.train.loss import HeadStats, NTokenLoss, evaluate_batch


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainConfig:
    out: Path
    steps: int = 1000
    batch_size: int = 8  # per process, per micro-batch
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4  # peak; the paper's value
    min_lr_ratio: float = 0.03  # cosine decays to this fraction of the peak
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    head_weights: list[float] | None = None
    loss_chunk: int | None = None  # positions per cross-entropy chunk (None: whole sequence)
    per_head_backward: bool = True
    freeze_trunk: bool = False
    soft_targets: float = 0.0  # the next-token head's share in the extra heads' targets (loss.py)
    bf16: bool = False
    compile: bool = False
    save_every: int = 100
    keep: int = 2
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    max_bad_steps: int = 5
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in train_state for resume checks


# --- model set-up -------------------------------------------------------------------------------

def add_heads(model: Transformer, k: int) -> Transformer:
    """n -> n + k prediction heads; each new head starts as a copy of the next-token head's block."""
    if k <= 0:
        return model
    a = model.args
    new = Transformer(replace(a, n_layers=a.n_layers + k, n_future_tokens=a.n_future_tokens + k))
    state = model.state_dict()
    head0 = f"layers.{len(model.layers) - 1}."
    for j in range(a.n_future_tokens - 1, a.n_future_tokens - 1 + k):
        for key, v in list(state.items()):
            if key.startswith(head0):
                state[f"extra_heads.{j}.{key[len(head0):]}"] = v.clone()
    new.load_state_dict(state, strict=True)
    return new.to(model.tok_embeddings.weight.device)


def load_trainable(ckpt_dir: Path, seq_len: int) -> Transformer:
    """A checkpoint as a float32 cache-free model whose parameters are plain tensors (not file maps)."""
    loaded = load_model(ckpt_dir, max_seq_len=seq_len)
    model = Transformer(loaded.args)  # fresh storage: optimizer updates must not touch the mapped file
    model.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()})
    return model


def trainable_parameters(model: Transformer, freeze_trunk: bool) -> None:
    """--freeze-trunk trains the extra heads only: embeddings, trunk, next-token head and the shared
    norm/output projection stay fixed, so the model's own next-token output does not change and
    self-speculation with the new heads reproduces the original model exactly."""
    extra = {id(p) for p in model.extra_heads.parameters()}
    for p in model.parameters():
        p.requires_grad_(not freeze_trunk or id(p) in extra)


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on the matrices of the blocks and the output projection only: not on norm gains
    (decay pulls them toward 0, not their neutral 1) and not on the embedding table (a row is only
    used when its token occurs, so decay would shrink rare tokens' embeddings every step)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name.startswith("tok_embeddings") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based step `step`: linear warmup, then cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- checkpoints --------------------------------------------------------------------------------

def step_dir(out: Path, step: int) -> Path:
    return out / f"step-{step:06d}"


def complete_checkpoints(out: Path) -> list[Path]:
    """Step folders with their COMPLETE marker, oldest first."""
    found = [p for p in out.glob("step-*") if p.is_dir() and (p / "COMPLETE").is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _remove_dir(path: Path) -> None:
    """Rename first, then delete: a half-deleted folder never keeps a name resume would pick."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def clean_partial(out: Path) -> None:
    """Remove leftovers of an interrupted save or delete (never picked by resume, just clutter)."""
    for p in out.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".trash-*"):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(out: Path, step: int, model: Transformer, train_state: dict, tokenizer_file: Path | None,
                    keep: int) -> Path:
    """Write OUT/step-NNNNNN atomically (temporary folder, COMPLETE last, rename) and keep the last `keep`."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # never write a checkpoint that resume would happily load and keep training on
        raise NonFiniteError(f"refusing to save step {step}: non-finite weights in {bad[:5]}")
    final = step_dir(out, step)
    tmp = out / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
    _write_synced(tmp / "train_state.pt", lambda f: torch.save(train_state, f))
    _write_synced(tmp / "COMPLETE", lambda f: f.write(f"step {step}\n".encode()))
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step after a resume from an older one
        _remove_dir(final)
    os.rename(tmp, final)
    _fsync_dir(out)
    for old in complete_checkpoints(out)[:-keep]:
        _remove_dir(old)
    return final


def load_train_state(ckpt: Path) -> dict:
    # weights_only: the state holds tensors and plain Python values only; a pickle that runs code is refused.
    return torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- metrics ------------------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict]:
    """Every complete JSON line (a line cut short by a crash is dropped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step`: the resumed run logs those steps again."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# --- the loop -----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, model: Transformer, data: TokenData, cfg: TrainConfig, *, tokenizer_file: Path | None = None,
                 rank: int = 0, world_size: int = 1, resume_from: Path | None = None):
        if cfg.seq_len > model.rope.shape[0]:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's maximum sequence length "
                             f"{model.rope.shape[0]}: lower --seq-len")
        if cfg.keep < 2:
            raise ValueError(f"keep={cfg.keep}: keep at least 2 checkpoints, so a crash while writing one "
                             f"leaves a complete older one")
        self.model, self.data, self.cfg = model, data, cfg
        self.rank, self.world = rank, world_size
        self.tokenizer_file = tokenizer_file
        trainable_parameters(model, cfg.freeze_trunk)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(model, cfg)
        self.step, self.data_pos, self.skipped, self.bad_in_a_row = 0, 0, 0, 0
        self.metrics_path = cfg.out / "metrics.jsonl"
        if resume_from is not None:
            self._load(resume_from)
        if cfg.compile:
            for block in [*model.layers, *model.extra_heads]:
                block.compile()  # per block: forward_trunk/forward_head call the blocks, not model.forward
        # The loss as a module: one forward and one backward per micro-batch, which is what DDP wraps.
        self.loss = NTokenLoss(model, cfg.head_weights, cfg.per_head_backward, cfg.loss_chunk, cfg.soft_targets)
        if world_size > 1:  # DDP: rank 0's weights to all, gradients averaged during the backward
            self.loss = DistributedDataParallel(self.loss, broadcast_buffers=False)

    def run_config(self) -> dict:
        """What a resumed run must share with the run it continues."""
        return {"params": self.model.args.to_params(), "world_size": self.world, "seq_len": self.cfg.seq_len,
                "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum,
                "freeze_trunk": self.cfg.freeze_trunk, "seed": self.cfg.seed, **self.cfg.extra}

    def _state(self) -> dict:
        return {"step": self.step, "data_pos": self.data_pos, "skipped": self.skipped,
                "optimizer": self.opt.state_dict(), "rng": _rng_state(), "run": self.run_config(),
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()}}

    def _load(self, ckpt: Path) -> None:
        state = load_train_state(ckpt)
        mine = self.run_config()
        theirs = state["run"]
        diff = {k: (theirs.get(k), mine.get(k)) for k in mine | theirs if theirs.get(k) != mine.get(k)}
        if diff:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume from {ckpt}: the run differs ({detail}). Resume with the same "
                             f"flags and number of processes, or start a new run with another --out")
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.data_pos, self.skipped = state["step"], state["data_pos"], state["skipped"]
        _set_rng_state(state["rng"])

    # One optimizer step: grad_accum micro-batches per rank (DDP syncs on the last), clip, AdamW.
    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        autocast = torch.autocast(self.model.output.weight.device.type, torch.bfloat16) if cfg.bf16 else nullcontext()
        stats = None
        for m in range(cfg.grad_accum):
            # The global batch at data_pos, micro-batch m: rank r reads its own slice of it.
            pos = self.data_pos + (m * self.world + self.rank) * cfg.batch_size
            inputs, labels = self.data.train_batch(cfg.seed, pos, cfg.batch_size)
            device = self.model.output.weight.device
            last = m == cfg.grad_accum - 1
            sync = self.loss.no_sync() if self.world > 1 and not last else nullcontext()
            with sync:
                with autocast:
                    loss, *sums = self.loss(inputs.to(device), labels.to(device))
                if loss.requires_grad:  # False when nothing trains
                    (loss / cfg.grad_accum).backward()
            s = HeadStats(*sums)
            stats = s if stats is None else stats + s
        self.data_pos += cfg.batch_size * cfg.grad_accum * self.world
        if self.world > 1:
            stats = _reduce_stats(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        losses = stats.losses
        finite = math.isfinite(float(grad_norm)) and all(math.isfinite(x) for x in losses)
        if finite:
            self.opt.step()
            self.bad_in_a_row = 0
        else:  # skip: weights untouched, data moves on
            self.skipped += 1
            self.bad_in_a_row += 1
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        weights = cfg.head_weights or [1.0] * len(losses)
        tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world
        row = {"step": self.step, "split": "train", "loss": sum(w * x for w, x in zip(weights, losses)),
               "head_losses": losses, "head_acc": stats.accuracies, "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": tokens / (time.perf_counter() - t0)}
        if not finite:
            row["skipped"] = True
        return row

    @torch.no_grad()
    def evaluate(self) -> dict:
        device = self.model.output.weight.device
        autocast = torch.autocast(device.type, torch.bfloat16) if self.cfg.bf16 else nullcontext()
        total = None
        for b, (inputs, labels) in enumerate(self.data.val_batches(self.cfg.batch_size, self.cfg.eval_batches)):
            if b % self.world != self.rank:
                continue
            with autocast:
                s = evaluate_batch(self.model, inputs.to(device), labels.to(device), chunk=self.cfg.loss_chunk)
            total = s if total is None else total + s
        if total is None:
            n = self.model.n_future_tokens
            total = HeadStats(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long),
                              torch.zeros(n, dtype=torch.long))
        if self.world > 1:
            total = _reduce_stats(total)
        weights = self.cfg.head_weights or [1.0] * len(total.losses)
        return {"step": self.step, "split": "val", "loss": sum(w * x for w, x in zip(weights, total.losses)),
                "head_losses": total.losses,
                "head_acc": total.accuracies, "positions": int(total.count[0])}

    def _log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _save(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.cfg.out, self.step, self.model, self._state(), self.tokenizer_file, self.cfg.keep)
        dist_utils.barrier()

    def fit(self) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        if self.rank == 0:
            _truncate_metrics(self.metrics_path, self.step)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not cfg.progress or self.rank != 0)
        while self.step < cfg.steps:
            row = self.train_step()
            self._log(row)
            if row.get("skipped"):
                msg = (f"step {self.step}: non-finite loss or gradient (losses {row['head_losses']}, grad norm "
                       f"{row['grad_norm']}); step skipped ({self.skipped} so far)")
                bar.write(f"warning: {msg}", file=sys.stderr)
                if self.bad_in_a_row >= cfg.max_bad_steps:
                    raise NonFiniteError(
                        f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient (last: step "
                        f"{self.step}); stopping. Lower --lr, raise --warmup, or check the data; resume from "
                        f"the last checkpoint with --resume")
            bar.update(1)
            bar.set_postfix_str(f"loss {row['loss']:.3f} heads {'/'.join(f'{x:.2f}' for x in row['head_losses'])} "
                                f"{row['tokens_per_s']:.0f} tok/s", refresh=False)
            if len(self.data.val) and (
                    self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                ev = self.evaluate()
                self._log(ev)
                bar.write(f"step {self.step}: val loss {ev['loss']:.4f} per head "
                          f"{' '.join(f'{x:.3f}' for x in ev['head_losses'])} acc "
                          f"{' '.join(f'{x:.3f}' for x in ev['head_acc'])}", file=sys.stderr)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self._save()
        bar.close()


def _reduce_stats(s: HeadStats) -> HeadStats:
    """Sum the per-head sums (and counts) over ranks: the global per-head means follow."""
    return HeadStats(dist_utils.all_reduce_sum_(s.loss_sum.clone()), dist_utils.all_reduce_sum_(s.correct.clone()),
                     dist_utils.all_reduce_sum_(s.count.clone()))


# --- the command --------------------------------------------------------------------------------

def build_args(shape: dict, vocab_size: int, seq_len: int) -> ModelArgs:
    """Model arguments for a run from scratch: a params.json (config) overridden by explicit flags."""
    config = shape.pop("config", None)
    params = json.loads(Path(config).read_text()) if config else {}
    params.update({k: v for k, v in shape.items() if v is not None})
    if params.get("vocab_size", -1) not in (-1, vocab_size):
        raise ValueError(f"the config says vocab_size={params['vocab_size']} but the tokenizer has {vocab_size} "
                         f"ids: they must match")
    params["vocab_size"] = vocab_size
    return ModelArgs.from_params(params, max_seq_len=seq_len)


def run(cfg: TrainConfig, *, tokenizer_path: str | Path, data_paths: list[Path] | None = None, glob: str = "*.py",
        text_field: str = "text", val_fraction: float = 0.01, cache_dir: Path | None = None,
        val_data: list[Path] | None = None, shape: dict | None = None, init_from: Path | None = None, add_heads_k: int = 0,
        resume: bool = False) -> Trainer:
    """Everything `multitoken train` does: model, data, resume, loop. Returns the finished trainer."""
    from multitoken.tokenizer import load_tokenizer
    from multitoken.train.data import load_data

    rank, world = dist_utils.setup()
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer_file = getattr(tokenizer, "model_path", None)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        clean_partial(cfg.out)
    dist_utils.barrier()
    existing = complete_checkpoints(cfg.out)
    if existing and not resume:
        raise ValueError(f"{cfg.out} already holds checkpoints ({existing[-1].name}): pass --resume to continue "
                         f"that run, or choose another --out")

    # The model the flags ask for (its shape is what a resumed checkpoint must match).
    if init_from is not None:
        params = read_params(init_from)
        want = ModelArgs.from_params({**params, "vocab_size": params.get("vocab_size", -1)
                                      if params.get("vocab_size", -1) != -1 else tokenizer.n_words})
        want = replace(want, n_layers=want.n_layers + add_heads_k, n_future_tokens=want.n_future_tokens + add_heads_k)
    else:
        if add_heads_k:
            raise ValueError("--add-heads needs a checkpoint to add heads to: pass --from CKPT")
        want = build_args(dict(shape or {}), tokenizer.n_words, cfg.seq_len)
    if want.vocab_size != tokenizer.n_words:
        raise ValueError(f"the model's vocabulary ({want.vocab_size}) does not match the tokenizer's "
                         f"({tokenizer.n_words} ids, {tokenizer_path}): pass the tokenizer the model was trained with")

    resume_from = existing[-1] if (resume and existing) else None
    if resume_from is not None:
        model = load_trainable(resume_from, cfg.seq_len)
        if model.args.to_params() != want.to_params():
            have = model.args.to_params()
            diff = {k: (have[k], v) for k, v in want.to_params().items() if have.get(k) != v}
            raise ValueError(f"cannot resume from {resume_from}: it holds a different model "
                             f"({'; '.join(f'{k}: checkpoint {a}, flags {b}' for k, (a, b) in diff.items())}). "
                             f"Resume with the flags of the original run, or use another --out")
    elif init_from is not None:
        model = add_heads(load_trainable(init_from, cfg.seq_len), add_heads_k)
    else:
        torch.manual_seed(cfg.seed)
        model = Transformer(want)
        model.init_weights()
    if rank == 0:
        where = f"resuming from {resume_from}" if resume_from else (f"from {init_from}" if init_from else "from scratch")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"training {n_params / 1e6:.1f}M parameters, n_future_tokens={model.n_future_tokens}, {where}",
              file=sys.stderr)

    data = load_data(data_paths, tokenizer, cfg.seq_len, glob=glob, text_field=text_field,
                     val_fraction=val_fraction, cache_dir=cache_dir, progress=cfg.progress and rank == 0,
                     val_data=val_data)
    if rank == 0:
        print(f"data: {len(data.tokens):,} tokens in {data.n_docs} documents; {len(data.train):,} training windows "
              f"of {cfg.seq_len + 1}; validation: {len(data.val.tokens):,} tokens in {data.n_val_docs} held-out "
              f"documents", file=sys.stderr)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    trainer = Trainer(model, data, cfg, tokenizer_file=Path(tokenizer_file) if tokenizer_file else None,
                      rank=rank, world_size=world, resume_from=resume_from)
    try:
        trainer.fit()
    finally:
        dist_utils.teardown()
    return trainer
