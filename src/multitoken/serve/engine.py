"""The continuous-batching decode engine: requests in, tokens out; no HTTP, no asyncio.

The model's KV caches hold `max_batch_size` rows. Running requests occupy rows 0 .. n - 1, and one
step advances all of them with one forward: plain decoding feeds each row's last token; with
self-speculation (k draft heads) it feeds [last token, k drafts], keeps each row's verified prefix
and drafts the next k, every row at its own position (the per-row masks of `Transformer.positions`).
A new request is prefilled into the next free row and joins at the next step; a finished or cancelled
request's row is taken by the last running row, so the batch stays dense and attends to no idle row.
Plain decoding is the same step with k = 0.

Sampling is per request: its own temperature, top_p and torch.Generator. Every forward draws the same
number of uniforms (2k + 1) from a sampled row's generator and every row always drafts k tokens (the
caches keep k spare positions for the last ones), so a seed gives the same tokens whatever the request
is batched with. Draws use the inverse CDF of the distributions plain sampling uses
(`probs_from_logits`) and drafts pass speculative rejection sampling: lossless at any temperature.

One thread runs `run()`; any thread may `submit` and `Request.cancel`. Outputs reach the caller
through the request's `on_output` callback, called on the engine thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from multitoken.model import Positions, Transformer
from multitoken.sampling import check_sampling_args, draw, greedy as greedy_tokens, probs_from_logits
from multitoken.speculative import SpeculativeStats, accept_sampled, check_draft_heads
from multitoken.steps import draft_logits, leading_true

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than the engine's queue allows: the caller should answer 429."""


class ContextLengthError(ValueError):
    """The prompt and max_tokens do not fit in the context."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    logprobs: int | None = None  # None: no logprobs; N: the chosen token's and the N most likely ones


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float  # of the chosen token, under the model's raw distribution (no temperature, no top-p)
    top: list[tuple[int, float]]  # (token, logprob) of the most likely tokens, most likely first


@dataclass(frozen=True)
class Output:
    """What a request receives after a forward that produced tokens for it (EOS never included)."""

    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None  # "stop" (EOS), "length" (max_tokens), "error", "shutdown"; None: more to come


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None]
    n_generated: int = 0
    cancelled: bool = False  # set from any thread; the engine frees the row before its next forward
    finished: bool = False
    generator: torch.Generator = field(default_factory=torch.Generator, repr=False)

    def __post_init__(self) -> None:
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0


class Engine:
    def __init__(
        self,
        model: Transformer,
        eos_id: int,
        *,
        max_batch_size: int = 8,
        max_seq_len: int = 2048,
        speculative: bool = True,
        draft_heads: int | None = None,
        max_queue: int = 256,
    ):
        if max_batch_size < 1 or max_seq_len < 2 or max_queue < 0:
            raise ValueError(f"need max_batch_size >= 1, max_seq_len >= 2, max_queue >= 0; "
                             f"got {max_batch_size}, {max_seq_len}, {max_queue}")
        self.model = model.eval()
        self.eos_id = eos_id
        self.k = check_draft_heads(model, draft_heads) if speculative else 0
        self.max_batch_size, self.max_seq_len, self.max_queue = max_batch_size, max_seq_len, max_queue
        # k spare positions: a row whose last token sits at max_seq_len - 1 still feeds k drafts.
        model.setup_caches(max_batch_size, max_seq_len + self.k)
        self.device = dev = model.tok_embeddings.weight.device
        b, k, vocab = max_batch_size, self.k, model.args.vocab_size
        # Per-row decoding state; row i belongs to self.running[i].
        self.cur = torch.zeros(b, dtype=torch.long, device=dev)  # position of the last token, not yet fed
        self.last = torch.zeros(b, dtype=torch.long, device=dev)  # that token
        self.drafts = torch.zeros(b, k, dtype=torch.long, device=dev)
        self.q = torch.zeros(b, k, vocab, device=dev)  # the drafts' distributions (sampled rows)
        self.temperature = torch.ones(b, 1, 1, device=dev)  # 1 in greedy rows: their probs go unused
        self.top_p = torch.ones(b, 1, 1, device=dev)
        self.greedy = torch.ones(b, dtype=torch.bool, device=dev)
        self._state = (self.cur, self.last, self.drafts, self.q, self.temperature, self.top_p, self.greedy)

        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        self.stats = SpeculativeStats(proposed=[0] * k, accepted=[0] * k)
        self._cond = threading.Condition()
        self._stopping = False

    # --- any thread ---------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine cannot run."""
        check_sampling_args(params.temperature, params.top_p)
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.args.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab})")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_seq_len} tokens, but {len(prompt)} prompt "
                f"tokens and max_tokens={params.max_tokens} need {len(prompt) + params.max_tokens}: "
                f"shorten the prompt or lower max_tokens"
            )
        if params.logprobs is not None and not 0 <= params.logprobs <= vocab:
            raise ValueError(f"logprobs must be between 0 and {vocab}, got {params.logprobs}")

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests, all or none: QueueFull when the queue has no room for all of them."""
        for r in requests:
            self.check(r.prompt, r.params)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"no room for {len(requests)} more completions: {len(self.waiting)} of the queue's "
                                f"{self.max_queue} places are taken; retry later")
            self.waiting.extend(requests)
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="multitoken-engine", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Make `run` return after its current step; requests still queued or running end with "shutdown"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # --- the engine thread --------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.running or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:  # a bug or out of memory: fail these requests, keep serving the next ones
                log.exception("decode step failed")
                self._abort("error")
        self._abort("shutdown")

    @torch.inference_mode()
    def step(self) -> None:
        """Free cancelled rows, prefill waiting requests into free rows, then advance every running row."""
        self._free([i for i, r in enumerate(self.running) if r.cancelled])
        self._admit()
        if self.running:
            self._decode()

    def _abort(self, reason: str) -> None:
        with self._cond:
            requests = [*self.running, *self.waiting]
            self.running.clear()
            self.waiting.clear()
        for r in requests:
            if not r.finished:
                r.finished = True
                r.on_output(Output([], None, reason))

    def _admit(self) -> None:
        new: list[Request] = []
        with self._cond:
            while self.waiting and len(self.running) + len(new) < self.max_batch_size:
                r = self.waiting.popleft()
                if not r.cancelled:
                    new.append(r)
        if not new:
            return
        n0, m, dev = len(self.running), len(new), self.device
        rows = slice(n0, n0 + m)
        self.running.extend(new)
        self.greedy[rows] = torch.tensor([r.greedy for r in new], device=dev)
        self.temperature[rows, 0, 0] = torch.tensor([r.params.temperature or 1.0 for r in new], device=dev)
        self.top_p[rows, 0, 0] = torch.tensor([r.params.top_p for r in new], device=dev)

        # Right-padded prefill of the new rows only: the padding sits past each row's end, where later
        # steps overwrite it before any query can see it. Every head runs, so every cache holds the prompt.
        lens = torch.tensor([len(r.prompt) for r in new], device=dev)
        tokens = torch.zeros(m, int(lens.max()), dtype=torch.long, device=dev)
        for i, r in enumerate(new):
            tokens[i, : len(r.prompt)] = torch.tensor(r.prompt, device=dev)
        pos = self.model.positions(torch.zeros_like(lens), *tokens.shape, rows=torch.arange(n0, n0 + m, device=dev))
        h = self.model.forward_trunk(tokens, pos)
        end = lens - 1
        logits = self.model.logits(self.model.forward_head(0, h, pos, end))  # (m, 1, vocab)
        u = self._uniforms(new)
        first = self._pick(logits, u[:, :1], rows)[0][:, 0]
        self._draft(h, pos, end, u[:, self.k + 1 :], rows)
        self.cur[rows], self.last[rows] = lens, first
        self.stats.forwards += m
        self._emit(rows, first[:, None], torch.zeros_like(first), logits)

    def _decode(self) -> None:
        n, k = len(self.running), self.k
        rows, idx = slice(0, n), torch.arange(n, device=self.device)
        drafts, greedy = self.drafts[rows], self.greedy[rows]
        pos = self.model.positions(self.cur[rows], n, k + 1)
        h = self.model.forward_trunk(torch.cat([self.last[rows, None], drafts], dim=1), pos)
        logits = self.model.logits(self.model.forward_head(0, h, pos))  # (n, k + 1, vocab)
        target = greedy_tokens(logits)
        ok = target[:, :k] == drafts
        u = self._uniforms(self.running)
        if bool(greedy.all()):
            n_acc = leading_true(ok)
            nxt = target[idx, n_acc]
        else:
            # Sampled rows: the speculative acceptance (a rejection resamples from the residual there; all
            # accepted, a bonus token from p). Greedy rows' distributions are not used.
            p = probs_from_logits(logits, self.temperature[rows], self.top_p[rows])
            n_sampled, nxt_sampled, _ = accept_sampled(p, self.q[rows], drafts, u[:, :k], u[:, k].double())
            n_acc = torch.where(greedy, leading_true(ok), n_sampled)
            nxt = torch.where(greedy, target[idx, n_acc], nxt_sampled)
        tokens = torch.cat([drafts, nxt[:, None]], dim=1)
        tokens[idx, n_acc] = nxt  # (n, k + 1): the accepted drafts, then nxt
        self._draft(h, pos, n_acc, u[:, k + 1 :], rows)
        self.cur[rows] += n_acc + 1
        self.last[rows] = nxt

        self.stats.forwards += n
        accepted = (n_acc[:, None] > torch.arange(k, device=self.device)).sum(0).tolist()  # per draft position
        for j in range(k):
            self.stats.proposed[j] += n
            self.stats.accepted[j] += accepted[j]
        self._emit(rows, tokens, n_acc, logits)

    def _draft(self, h: torch.Tensor, pos: Positions, index: torch.Tensor, u: torch.Tensor, rows: slice) -> None:
        """The extra heads at token `index` of each row draft the next k tokens (and keep their distributions)."""
        if self.k == 0:
            return
        self.drafts[rows], q = self._pick(draft_logits(self.model, h, pos, index, self.k), u, rows)
        if q is not None:
            self.q[rows] = q

    def _pick(self, logits: torch.Tensor, u: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens for logits (n, m, vocab): argmax in greedy rows, else drawn with u (n, m); and the
        distributions of the sampled rows (None when every row is greedy)."""
        greedy = self.greedy[rows]
        tokens = greedy_tokens(logits)
        if bool(greedy.all()):
            return tokens, None
        probs = probs_from_logits(logits, self.temperature[rows], self.top_p[rows])
        return torch.where(greedy[:, None], tokens, draw(probs, u)), probs

    def _uniforms(self, requests: Sequence[Request]) -> torch.Tensor:
        """(n, 2k + 1) uniforms per forward from each sampled row's own generator: k for the acceptance
        tests, one for the next token, k for the drafts; used or not, so the count never varies."""
        u = torch.zeros(len(requests), 2 * self.k + 1)
        for i, r in enumerate(requests):
            if not r.greedy:
                u[i] = torch.rand(2 * self.k + 1, generator=r.generator)
        return u.to(self.device)

    def _emit(self, rows: slice, tokens: torch.Tensor, n_acc: torch.Tensor, logits: torch.Tensor) -> None:
        """Hand each row its first n_acc + 1 tokens (stopping at EOS and max_tokens), then free finished rows."""
        requests = self.running[rows]
        top_n = max((r.params.logprobs for r in requests if r.params.logprobs is not None), default=None)
        if top_n is not None:
            logprobs = torch.log_softmax(logits, -1)
            chosen = logprobs.gather(-1, tokens[..., None])[..., 0].tolist()
            top_lp, top_id = (x.tolist() for x in logprobs.topk(top_n, dim=-1))
        finished = []
        for i, (r, row, n) in enumerate(zip(requests, tokens.tolist(), n_acc.tolist())):
            out, lps, reason = [], [] if r.params.logprobs is not None else None, None
            for j, t in enumerate(row[: n + 1]):
                if t == self.eos_id:
                    reason = "stop"
                    break
                out.append(t)
                if lps is not None:
                    top = list(zip(top_id[i][j][: r.params.logprobs], top_lp[i][j][: r.params.logprobs]))
                    lps.append(TokenLogprob(chosen[i][j], top))
                r.n_generated += 1
                if r.n_generated == r.params.max_tokens:
                    reason = "length"
                    break
            self.stats.tokens += len(out)
            if reason is not None:
                r.finished = True
                finished.append(rows.start + i)
            if not r.cancelled:
                r.on_output(Output(out, lps, reason))
        self._free(finished)

    def _free(self, done: list[int]) -> None:
        """Free rows, moving the last running rows into the holes so rows 0 .. n - 1 stay the running ones."""
        for i in sorted(done, reverse=True):  # the last row is never a hole still to fill
            last = len(self.running) - 1
            if i != last:
                for t in self._state:
                    t[i] = t[last]
                self.model.copy_cache_rows(torch.tensor([last], device=self.device), torch.tensor([i], device=self.device))
                self.running[i] = self.running[last]
            self.running.pop()
