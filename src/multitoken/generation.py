"""The released generation API (`Llama.build`, `generate`, `text_completion`), on CPU or GPU."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F

from multitoken.checkpoint import load_model, read_params
from multitoken.model import Transformer
from multitoken.sampling import check_sampling_args, sample
from multitoken.speculative import DraftHeads, SpeculativeStats
from multitoken.speculative import generate as speculative_generate
from multitoken.steps import DecodeSteps
from multitoken.tree import TreeSpec
from multitoken.tree import generate as tree_generate
from multitoken.tokenizer import Tokenizer, load_tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]
    logprobs: list[float]


def default_device_and_dtype(
    device: str | torch.device | None, dtype: torch.dtype | str | None, ckpt_dir: str | os.PathLike | None = None
) -> tuple[torch.device, torch.dtype]:
    """CUDA + bfloat16 when available, else CPU + float32; either may be given explicitly. dtype "auto"
    (with the checkpoint's `ckpt_dir`) is the fastest dtype that loses nothing the weights hold
    (`fast_dtype`)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        if ckpt_dir is None:
            raise ValueError('dtype="auto" needs the checkpoint folder (ckpt_dir) whose weights it reads')
        dtype = fast_dtype(device, ckpt_dir)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def fast_dtype(device: torch.device, ckpt_dir: str | os.PathLike) -> torch.dtype:
    """bfloat16 on a GPU; on a CPU, bfloat16 for weights stored in bfloat16 where this CPU multiplies
    bf16 natively and `multitoken.kernels` run (AVX-512 BF16: eager decoding of the shipped model
    at twice float32's speed, and self-speculation still exact to the bit), else float32. The
    kernels are built on first use (~10 s, once)."""
    from multitoken import kernels
    from multitoken.checkpoint import stored_dtype

    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and stored_dtype(ckpt_dir) == torch.bfloat16 and kernels.available():
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str | os.PathLike,
        tokenizer_path: str | os.PathLike,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: int | None = None,
        seed: int = 1,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        compile: bool = False,
    ) -> Llama:
        """Load a checkpoint and its tokenizer. `model_parallel_size` is accepted for compatibility with
        the release: shards are merged on load, so one process runs a checkpoint of any MP size.
        `compile=True` decodes with compiled fixed-shape steps (see `Llama.compile`). `dtype` defaults to
        bfloat16 on a GPU and float32 on a CPU; "auto" keeps bf16 weights bf16 where the CPU computes
        them natively (`fast_dtype`)."""
        torch.manual_seed(seed)
        device, dtype = default_device_and_dtype(device, dtype, ckpt_dir)
        tokenizer = load_tokenizer(tokenizer_path)
        params_vocab = read_params(ckpt_dir).get("vocab_size", -1)
        # A larger embedding table than the tokenizer is common (padded vocabularies); a smaller one
        # would leave token ids without embeddings.
        if params_vocab != -1 and tokenizer.n_words > params_vocab:
            raise ValueError(
                f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the checkpoint's vocab_size is "
                f"{params_vocab}: use the tokenizer the model was trained with"
            )
        model = load_model(
            ckpt_dir, device=device, dtype=dtype, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
            vocab_size=tokenizer.n_words if params_vocab == -1 else None,
        )
        llama = Llama(model, tokenizer)
        return llama.compile() if compile else llama

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        if not model.has_caches:
            raise ValueError("the model needs KV caches for generation: call model.setup_caches(batch, seq_len)")
        self.model = model
        self.tokenizer = tokenizer
        self.last_stats: SpeculativeStats | None = None  # of the last speculative generate call
        self.steps = DecodeSteps(model)

    def compile(self, mode: str | None = None, rowwise: bool | None = None, fuse: bool | None = None,
                freeze: bool | None = None, cpu_kernels: bool | None = None, flex: bool = False) -> Llama:
        """Decode with torch.compile'd fixed-shape steps (`multitoken.steps`): one compilation per
        batch size and step length (and on a GPU per cache span: 512 slots, then doubling as a text
        grows; on a CPU one for every span short of the whole cache and one for the whole cache), on
        the first call that needs it (a minute or more on a CPU; `with llama.steps.spanning(s):` around
        a short generation compiles span s ahead), then no per-step Python work that grows with the model.
        `mode` is torch.compile's ("reduce-overhead": CUDA graphs on a GPU). Outputs are those of eager decoding up to the
        compiler's floating-point reassociation. Greedy tree steps compile too (tree.greedy_tree_step).
        Self-speculative rows that finish leave the batch (`DecodeSteps.batch_size`): on a CPU a batch
        of B then also compiles its steps for the powers of two below B as it shrinks
        (`self.steps.retire_rows = False` keeps batches whole, as draft_heads="auto" does compiled).
        `rowwise`, `fuse`, `freeze`, `cpu_kernels` and `flex`: see DecodeSteps."""
        self.steps = DecodeSteps(self.model, compile=True, mode=mode, rowwise=rowwise, fuse=fuse, freeze=freeze,
                                 cpu_kernels=cpu_kernels, flex=flex)
        return self

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        on_token: Callable[[int, int], None] | None = None,
        speculative: bool = False,
        draft_heads: DraftHeads = None,
        tree: TreeSpec | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Complete a batch of token lists of any lengths; each row stops at its EOS or after
        max_gen_len tokens or at max_seq_len. `on_token(row, token)` sees each generated token as it
        is produced (EOS excluded), for streaming.

        With `speculative=True` the extra heads draft (`draft_heads` of them, default all; "auto"
        verifies each step as many as are expected to decode fastest) and the next-token head
        verifies: the same output (greedy) or output distribution (sampling) as plain decoding, in
        fewer forwards; `self.last_stats` then holds the acceptance statistics.
        `tree` (which implies `speculative`) verifies a tree of candidates per step instead of one
        chain: a node budget for a dynamic tree (the most probable paths under the heads) or a list
        of rank paths for a static one, e.g. [[0], [1], [0, 0]] (see multitoken.tree).
        """
        args = self.model.args
        self._check_prompts(prompt_tokens, args.max_batch_size, args.max_seq_len)
        check_sampling_args(temperature, top_p)
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        if tree is not None:
            if draft_heads == "auto":
                raise ValueError('draft_heads="auto" chooses the chain\'s draft count; a tree\'s depth is fixed: '
                                 "give draft_heads as an int, or leave it out for every head")
            tokens, lps, self.last_stats = tree_generate(
                self.model, prompt_tokens, max_gen_len, self.tokenizer.eos_id, tree=tree, temperature=temperature,
                top_p=top_p, draft_heads=draft_heads, logprobs=logprobs, echo=echo, on_token=on_token,
                steps=self.steps,
            )
            return tokens, lps
        if speculative:
            tokens, lps, self.last_stats = speculative_generate(
                self.model, prompt_tokens, max_gen_len, self.tokenizer.eos_id, temperature=temperature, top_p=top_p,
                draft_heads=draft_heads, logprobs=logprobs, echo=echo, on_token=on_token, steps=self.steps,
            )
            return tokens, lps
        bsz = len(prompt_tokens)
        prompt_lens = [len(t) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
        total_len = min(args.max_seq_len, max_gen_len + max_prompt_len)
        device = self.model.tok_embeddings.weight.device

        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
        is_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
        for i, t in enumerate(prompt_tokens):
            n = min(len(t), total_len)
            tokens[i, :n] = torch.tensor(t[:n], dtype=torch.long, device=device)
            is_prompt[i, :n] = True
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if logprobs else None

        # Decode from the shortest prompt's end; rows with longer prompts take their own prompt token
        # until it runs out, so every row sees exactly its own prefix (no padding is ever attended).
        prev_pos = 0
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)
        if min_prompt_len == total_len and logprobs:
            logits = self.model(tokens, 0).squeeze(2)
            token_logprobs[:, 1:] = -F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        # On a GPU, reading eos_reached on the host would wait for the step just queued and leave the
        # device idle while Python queues the next: copy each step's flag to pinned memory instead and
        # read it after the next step is queued (so at most one step runs after every row is done).
        lagged = device.type == "cuda"
        if lagged:
            flags = [torch.zeros((), dtype=torch.bool, pin_memory=True) for _ in range(2)]
            flagged = [torch.cuda.Event(), torch.cuda.Event()]
        for i, cur_pos in enumerate(range(min_prompt_len, total_len)):
            if self.steps.compiled and cur_pos - prev_pos == 1:  # every step after the prefill
                # A contiguous copy: a column of `tokens` has its length as stride, and the compiled step,
                # which guards on strides, would compile again for every prompt + max_gen_len.
                column = tokens[:, prev_pos:cur_pos].clone(memory_format=torch.contiguous_format)
                _, logits = self.steps.step(column, torch.full((bsz,), prev_pos, device=device),
                                            span=self.steps.span(cur_pos))
            else:
                logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos).squeeze(2)
            next_token = sample(logits[:, -1], temperature, top_p)
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none"
                )
            generated = ~is_prompt[:, cur_pos]
            if on_token is not None:
                for row in (generated & ~eos_reached & (next_token != self.tokenizer.eos_id)).nonzero().flatten().tolist():
                    on_token(row, int(next_token[row]))
            eos_reached |= generated & (next_token == self.tokenizer.eos_id)
            prev_pos = cur_pos
            if lagged:
                flags[i % 2].copy_(eos_reached.all(), non_blocking=True)
                flagged[i % 2].record()
                if i > 0:
                    flagged[(i - 1) % 2].synchronize()
                    if bool(flags[(i - 1) % 2]):
                        break
            elif bool(eos_reached.all()):
                break

        out_tokens, out_logprobs = [], []
        all_tokens = tokens.tolist()
        all_logprobs = token_logprobs.tolist() if logprobs else None
        for i, row in enumerate(all_tokens):
            start = 0 if echo else prompt_lens[i]
            # Positions past an early stop are unfilled, but every row then holds an EOS before them.
            end = min(prompt_lens[i] + max_gen_len, total_len)
            gen = row[prompt_lens[i] : end]
            if self.tokenizer.eos_id in gen:  # cut at the first generated EOS (never inside the prompt)
                end = prompt_lens[i] + gen.index(self.tokenizer.eos_id)
            out_tokens.append(row[start:end])
            if logprobs:
                out_logprobs.append(all_logprobs[i][start:end])
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: Sequence[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        speculative: bool = False,
        draft_heads: DraftHeads = None,
        tree: TreeSpec | None = None,
    ) -> list[CompletionPrediction]:
        if max_gen_len is None:
            max_gen_len = self.model.args.max_seq_len - 1
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo,
            speculative=speculative, draft_heads=draft_heads, tree=tree,
        )
        if logprobs:
            return [
                {
                    "generation": self.tokenizer.decode(t),
                    "tokens": [self.tokenizer.decode([x]) for x in t],
                    "logprobs": lp,
                }
                for t, lp in zip(generation_tokens, generation_logprobs)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in generation_tokens]

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], max_batch_size: int, max_seq_len: int) -> None:
        if len(prompt_tokens) == 0:
            raise ValueError("no prompts given: pass a non-empty list of prompts")
        if len(prompt_tokens) > max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size={max_batch_size}: "
                f"build with a larger max_batch_size or pass fewer prompts at a time"
            )
        vocab = self.model.args.vocab_size
        for i, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
            if len(t) > max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(t)} tokens, more than max_seq_len={max_seq_len}: "
                    f"shorten it or build with a larger max_seq_len"
                )
            bad = [x for x in t if not 0 <= x < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
