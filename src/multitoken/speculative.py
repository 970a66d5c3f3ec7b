"""Self-speculative decoding: the extra heads draft, the next-token head verifies.

One forward per step feeds [last token, d_1 .. d_k] through the trunk and the next-token head, keeps
the longest prefix of drafts that head agrees with plus one token of its own, and then runs the
extra heads at that last accepted position alone to draft the next step (their keys and values are
cached for every fed token, so their caches stay complete). Lossless: greedy output equals plain
greedy decoding token for token; at temperature > 0 drafts pass speculative rejection sampling
(Leviathan et al. 2023), so the output follows the plain sampling distribution exactly.

Each row of a batch sits at its own position and accepts its own number of drafts; per-row
attention masks hide the stale cache entries that rejected drafts leave behind. Rows end at different
steps, and a row that has ended leaves the batch (`Outputs.shrink`): the steps after it run the rows
still going, which on a CPU costs less than running the whole batch until its slowest row ends.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from multitoken import kernels
from multitoken.model import Positions, Transformer
from multitoken.sampling import draw, greedy as greedy_tokens, probs_from_logits
from multitoken.steps import DecodeSteps, StepTimes, draft_logits, leading_true


@dataclass
class SpeculativeStats:
    """Counts of one speculative `generate` call, summed over the rows of the batch."""

    forwards: int = 0  # row-forwards: each active row in each forward, prefill included
    tokens: int = 0  # tokens returned (EOS and anything past a row's end excluded)
    proposed: list[int] = field(default_factory=list)  # per draft position: drafts verified
    accepted: list[int] = field(default_factory=list)  # per draft position: drafts accepted

    @property
    def tokens_per_forward(self) -> float:
        """tau, as the paper counts it: accepted drafts plus the next-token head's own token."""
        return self.tokens / max(self.forwards, 1)

    @property
    def acceptance(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    def summary(self) -> str:
        rates = ", ".join(f"{r:.0%}" for r in self.acceptance)
        return f"tokens per forward {self.tokens_per_forward:.2f}, acceptance by draft position [{rates}]"


DraftHeads = int | Literal["auto"] | None  # a fixed count, "auto" (chosen per step) or None (all)


def check_draft_heads(model: Transformer, draft_heads: int | None) -> int:
    n = model.n_future_tokens
    if n < 2:
        raise ValueError(
            "self-speculative decoding needs extra prediction heads, but this model has n_future_tokens=1: "
            "decode without speculation, or add heads (multitoken train --add-heads K)"
        )
    if draft_heads is None:
        return n - 1
    if isinstance(draft_heads, bool) or not isinstance(draft_heads, int):
        raise TypeError(f"draft_heads must be an int between 1 and {n - 1}, got {draft_heads!r}")
    if not 1 <= draft_heads <= n - 1:
        raise ValueError(f"draft_heads must be between 1 and {n - 1} (n_future_tokens - 1), got {draft_heads}")
    return draft_heads


def accept_drafts(p_draft: torch.Tensor, q_draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Speculative rejection sampling's test: draft x passes with probability min(1, p(x) / q(x)).
    Arguments are p and q at the drafted tokens and uniform draws, all (batch, k)."""
    return u * q_draft < p_draft


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)): what a rejected draft's position samples from, so that the token
    there follows p exactly. Where p == q nothing is ever rejected; fall back to p."""
    r = (p - q).clamp_min(0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-30), p)


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor, u_next: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sampled self-speculative step's acceptance: given the target's distributions p (batch, j + 1, vocab)
    at each row's last token and its j drafts (batch, j), the drafts' distributions q (batch, j, vocab),
    uniforms u (batch, j) float32 for the tests and u_next (batch,) float64 for the next token. Returns the
    accepted counts (batch,), the next tokens (batch,), drawn from the residual at the first rejection or
    from p after all j, and the step's tokens (batch, j + 1): the accepted drafts, the next token, then
    the rest of the drafts (and a zero). In one kernel call where `kernels.sampling_runs` (~0.2 ms of
    ATen calls less a step here), the same ids."""
    if kernels.sampling_runs(p):
        return torch.ops.multitoken.accept_sampled.default(p, q, drafts, u, u_next)
    j = drafts.shape[1]
    rows = torch.arange(p.shape[0], device=p.device)
    d = drafts[..., None]
    n_acc = leading_true(accept_drafts(p[:, :j].gather(-1, d)[..., 0], q.gather(-1, d)[..., 0], u))
    # At a rejection, max(0, p - q) unnormalised (draw draws in proportion); where it is all zeros, p.
    q_pad = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)
    p_at, q_at = p[rows, n_acc], q_pad[rows, n_acc]
    r = (p_at - q_at).clamp_min(0)
    nxt = draw(torch.where((r > 0).any(-1, keepdim=True), r, p_at), u_next)
    tokens = torch.cat([drafts, torch.zeros_like(nxt[:, None])], dim=1)
    tokens[rows, n_acc] = nxt
    return n_acc, nxt, tokens


class DraftCount:
    """`draft_heads="auto"`: how many drafts the next step verifies, the count j of most expected tokens
    per second. A step verifying j drafts yields E(j) = 1 + sum over i <= j of a_1 * .. * a_i tokens
    per row, a_i being draft position i's acceptance given that the drafts before it passed, and costs
    what steps verifying (and drafting) j took at this batch size (`cost`). Fewer drafts pay where
    they are rarely accepted or where extra tokens are not nearly free (large batches on a CPU).
    Greedy output is the same for every j; sampling keeps its distribution (j never depends on the
    step's draws).

    Acceptance counts decay each step toward an optimistic prior (every draft accepted), so a position
    left unverified for a while is tried again. Step times live in `times` (`DecodeSteps.step_times`,
    shared across calls); a count is tried until it has a time (the first, which includes compiling,
    does not count), and its cost is the least of its recent times: noise on a shared machine only
    ever adds time. The count changes only for a gain of more than `margin`: a change costs an eager
    step where steps are compiled (one graph per count, verifying as many drafts as it drafts)."""

    def __init__(self, k: int, batch: int, times: dict[tuple[int, int], StepTimes], decay: float = 0.95,
                 margin: float = 0.05):
        self.k, self.batch, self.times, self.decay, self.margin = k, batch, times, decay, margin
        self.tested = [0.0] * k
        self.accepted = [0.0] * k
        self.current: int | None = None

    def expected_tokens(self, j: int) -> float:
        total, run = 1.0, 1.0
        for i in range(j):
            run *= (self.accepted[i] + 1) / (self.tested[i] + 1)
            total += run
        return total

    def cost(self, j: int) -> float | None:
        """What a step verifying j drafts costs at this batch size, or else at the nearest larger one
        timed: a batch that finished rows have left (`Outputs.shrink`) costs no more than it did, and
        trying every count again at each size (an eager batch passes through every size as its rows
        end) would spend its last steps on trials."""
        timed = [(b, t.cost) for (b, jj), t in self.times.items()
                 if jj == j and b >= self.batch and t.cost is not None]
        return min(timed)[1] if timed else None

    def choose(self) -> int:
        """The draft count for the next step."""
        rates = {}
        for j in range(self.k, 0, -1):
            cost = self.cost(j)
            if cost is None:
                self.current = j  # not timed yet
                return j
            rates[j] = self.expected_tokens(j) / cost
        best = max(rates, key=rates.get)
        if self.current is None or rates[best] > (1 + self.margin) * rates[self.current]:
            self.current = best
        return self.current

    def observe(self, j: int, n_acc: list[int], seconds: float | None) -> None:
        """A step verified j drafts, its active rows accepted n_acc, and it took `seconds` (None: a step
        that is no sample of j's cost, e.g. one that drafted another count)."""
        self.tested = [t * self.decay for t in self.tested]
        self.accepted = [a * self.decay for a in self.accepted]
        for n in n_acc:
            for i in range(min(n + 1, j)):  # position i was tested when every draft before it passed
                self.tested[i] += 1
                self.accepted[i] += i < n
        if seconds is not None:
            self.times.setdefault((self.batch, j), StepTimes()).add(seconds)


class Outputs:
    """Each row's generated tokens (and logprobs) and its end: EOS (excluded) or its length limit."""

    def __init__(self, model: Transformer, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, eos_id: int,
                 stats: SpeculativeStats, on_token: Callable[[int, int], None] | None):
        self.prompt_tokens = prompt_tokens
        self.eos_id = eos_id
        self.stats = stats
        self.on_token = on_token
        self.max_new = [min(max_gen_len, model.args.max_seq_len - len(t)) for t in prompt_tokens]
        self.tokens: list[list[int]] = [[] for _ in prompt_tokens]
        self.logprobs: list[list[float]] = [[] for _ in prompt_tokens]
        self.done = [m <= 0 for m in self.max_new]
        self.positions = [len(t) for t in prompt_tokens]  # each row's next cache slot, as of the steps read
        self.model = model
        # The row each batch slot (and KV cache row) holds; None: an empty slot (see `shrink`).
        self.slots: list[int | None] = list(range(len(prompt_tokens)))
        self._running: tuple[list[int | None], torch.Tensor | None] = ([], None)

    def emit(self, b: int, tokens: list[int], lps: list[float]) -> None:
        """Append row b's new tokens, stopping at EOS (excluded) and at the row's length limit."""
        for t, lp in zip(tokens, lps):
            if t == self.eos_id:
                self.done[b] = True
                return
            self.tokens[b].append(t)
            self.logprobs[b].append(lp)
            self.stats.tokens += 1
            if self.on_token is not None:
                self.on_token(b, t)
            if len(self.tokens[b]) >= self.max_new[b]:
                self.done[b] = True
                return

    def running(self, device: torch.device) -> tuple[list[int | None], torch.Tensor]:
        """The row the next step decodes in each batch slot (None: a finished row or an empty slot,
        riding along), and which slots decode, as a bool tensor on `device`; the tensor is made again
        only when a row has finished (otherwise it would be a host-to-device copy every step)."""
        rows = [r if r is not None and not self.done[r] else None for r in self.slots]
        if rows != self._running[0]:
            self._running = (rows, torch.tensor([r is not None for r in rows]).to(device, non_blocking=True))
        return self._running

    def shrink(self, batch_size: Callable[[int], int | None], in_flight: Sequence[QueuedStep] = ()
               ) -> torch.Tensor | None:
        """Retire finished rows when the rows still running fit a smaller batch (`batch_size(n)` slots
        for n rows; None: keep the batch): a batch otherwise runs at full size until its slowest row
        ends, and on a CPU a step's cost grows with its rows. Moves the running rows' KV caches to the
        first slots and returns, for each new slot, the old slot whose per-row state it takes (the
        caller gathers its tensors with it; slots past the running rows repeat one and ride along);
        None if the batch stays. `in_flight`: the steps queued and not read yet."""
        live = [s for s, r in enumerate(self.slots) if r is not None and not self.done[r]]
        size = batch_size(len(live)) if live else None
        if size is None or size >= len(self.slots):
            return None
        device = self.model.tok_embeddings.weight.device
        # Only the rows that move, and only the slots written so far (queued steps included): a batch of
        # 16 copied whole caches of 512 slots each time a row finished, 17% of its decoding time.
        moved = [(s, d) for d, s in enumerate(live) if s != d]
        if moved:
            src, dst = zip(*moved)
            self.model.copy_cache_rows(torch.tensor(src, device=device), torch.tensor(dst, device=device),
                                       end=self.furthest(in_flight))
        self.slots = [self.slots[s] for s in live] + [None] * (size - len(live))
        return torch.tensor(live + live[:1] * (size - len(live)), device=device)

    def furthest(self, in_flight: Sequence[QueuedStep]) -> int:
        """The furthest next slot of a running row, counting the queued steps not read yet: each may
        have moved a row it decodes by up to its j + 1."""
        return max(self.positions[b] + sum(s.j + 1 for s in in_flight if b in s.rows)
                   for b, done in enumerate(self.done) if not done)

    def add_step(self, rows: list[int | None], tokens: list[list[int]], n_acc: list[int], drafted: list[int],
                 lps: list[list[float]] | None) -> list[int]:
        """Take a verify step's output for the rows it decoded (`rows`, the row in each batch slot or
        None): the row in slot s accepted n_acc[s] of its drafted[s] drafts, and emits
        tokens[s][:n_acc[s] + 1]. Moves each row's host-side position on, counts the statistics and
        returns the accepted counts of the rows still running (a row that finished in an earlier step,
        which a queued step ran ahead of, is skipped)."""
        accepted = []
        for s, b in enumerate(rows):
            if b is None:
                continue
            self.positions[b] += n_acc[s] + 1
            if self.done[b]:
                continue
            self.stats.forwards += 1
            for i in range(drafted[s]):
                self.stats.proposed[i] += 1
                self.stats.accepted[i] += i < n_acc[s]
            n = n_acc[s] + 1
            self.emit(b, tokens[s][:n], lps[s][:n] if lps is not None else [0.0] * n)
            accepted.append(n_acc[s])
        return accepted

    def result(self, echo: bool, prompt_logprobs: list[list[float]] | None
               ) -> tuple[list[list[int]], list[list[float]] | None]:
        """`Llama.generate`'s return value: per row the (echoed prompt and) generated tokens, and logprobs."""
        tokens, lps = [], [] if prompt_logprobs is not None else None
        for b, prompt in enumerate(self.prompt_tokens):
            tokens.append((list(prompt) if echo else []) + self.tokens[b])
            if lps is not None:
                head = ([0.0] + prompt_logprobs[b][: len(prompt) - 1]) if echo else []
                lps.append(head + self.logprobs[b])
        return tokens, lps


def prefill(model: Transformer, prompt_tokens: Sequence[Sequence[int]], logprobs: bool
            ) -> tuple[torch.Tensor, Positions, torch.Tensor, torch.Tensor, list[list[float]] | None]:
    """Run the prompts, right-padded: padding sits past each row's end, where later steps overwrite it
    before any query can see it. Returns the trunk output h, its positions, each row's last prompt index,
    the next-token head's logits there (batch, vocab) and, with `logprobs`, the prompt's logprobs.
    Every head runs later on h, so every head's cache holds the prompt."""
    device = model.tok_embeddings.weight.device
    bsz = len(prompt_tokens)
    lens = torch.tensor([len(t) for t in prompt_tokens], device=device)
    padded = torch.zeros(bsz, int(lens.max()), dtype=torch.long, device=device)
    for i, t in enumerate(prompt_tokens):
        padded[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
    pos = model.positions(torch.zeros(bsz, dtype=torch.long, device=device), *padded.shape)
    h = model.forward_trunk(padded, pos)
    last = lens - 1
    prompt_logprobs = None
    if logprobs:
        all_logits = model.logits(model.forward_head(0, h, pos))
        prompt_logprobs = torch.log_softmax(all_logits[:, :-1], -1).gather(-1, padded[:, 1:, None])[..., 0].tolist()
        logits0 = all_logits[torch.arange(bsz, device=device), last]
    else:
        logits0 = model.logits(model.forward_head(0, h, pos, last))[:, 0]
    return h, pos, last, logits0, prompt_logprobs


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at `tokens`: logits (..., vocab), tokens (...)."""
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


@dataclass
class QueuedStep:
    """A step the device has been given and whose results the host has not read yet."""

    j: int  # the most drafts it accepts
    rows: list[int | None]  # the row it decodes in each batch slot (None: none)
    results: list[torch.Tensor]  # tokens (batch, j + 1), accepted counts (batch,), ...
    ready: torch.cuda.Event | None  # on a GPU: when `results` have reached host memory
    k_next: int = 0  # drafts it proposes for the next step (chain)
    queued_at: float = 0.0


def default_lag(device: torch.device) -> int:
    """Steps queued ahead of their reading: one on a GPU, so it never waits for the host's reading;
    none elsewhere, where the host runs the step itself."""
    return 1 if device.type == "cuda" else 0


def to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Host copies of device tensors, started without waiting for the device, and an event that marks
    them complete (on a CPU: the tensors themselves, and None)."""
    if tensors[0].device.type != "cuda":
        return tensors, None
    host = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def from_host(results: list[torch.Tensor], ready: torch.cuda.Event | None) -> list[list]:
    """`to_host`'s copies as lists, once they are complete."""
    if ready is not None:
        ready.synchronize()
    return [r.tolist() for r in results]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_tokens: Sequence[Sequence[int]],
    max_gen_len: int,
    eos_id: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    draft_heads: DraftHeads = None,
    logprobs: bool = False,
    echo: bool = False,
    on_token: Callable[[int, int], None] | None = None,
    steps: DecodeSteps | None = None,
    lag: int | None = None,
) -> tuple[list[list[int]], list[list[float]] | None, SpeculativeStats]:
    """Self-speculative `generate` with the semantics of `Llama.generate` (prompts already checked).
    `steps` runs the verify and draft forwards (default: eager); the prefill is always eager.
    `draft_heads="auto"` verifies, each step, the number of drafts expected to be fastest (DraftCount).

    `lag` steps are queued ahead of the host's reading of their results (default: 1 on a GPU, 0
    elsewhere). A step's inputs come from the previous step's outputs on the device, so the host can
    queue step t + 1 before it reads step t: a GPU then never waits while the host reads accepted
    tokens and keeps its books. A row that finished in an unread step is decoded once more, and its
    output ignored; near the end of the cache the host reads first, so positions stay in bounds."""
    auto = draft_heads == "auto"
    k = check_draft_heads(model, None if auto else draft_heads)
    steps = steps or DecodeSteps(model)
    # Compiled steps cover one shape per batch size and draft count (a step verifies as many drafts as
    # it drafts); the others, the last steps before max_seq_len (fewer drafts fit) and "auto"'s
    # changes of count, run eagerly rather than compile a shape for each.
    eager = DecodeSteps(model, fuse=steps.fused) if steps.compiled else steps
    greedy = temperature == 0
    device = model.tok_embeddings.weight.device
    lag = default_lag(device) if lag is None else lag
    max_seq_len = model.args.max_seq_len
    bsz = len(prompt_tokens)
    stats = SpeculativeStats(proposed=[0] * k, accepted=[0] * k)
    outputs = Outputs(model, prompt_tokens, max_gen_len, eos_id, stats, on_token)
    rows = torch.arange(bsz, device=device)
    counter = DraftCount(k, bsz, steps.step_times) if auto else None

    slot_rows = rows  # the row in each batch slot, on the device (an empty slot: any)

    def uniforms(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Uniform draws (slots, *shape) that do not depend on which rows have left the batch: drawn
        for every row of the batch as it began, then taken for the rows in the slots. Queued steps
        learn of a finished row a step later and retire it later (`Outputs.shrink`); the same draws
        then give the same tokens."""
        return torch.rand(bsz, *shape, dtype=dtype, device=device)[slot_rows]

    def pick(logits: torch.Tensor) -> torch.Tensor:
        """Tokens for (batch, vocab) logits."""
        if greedy:
            return greedy_tokens(logits)
        return draw(probs_from_logits(logits, temperature, top_p), uniforms())

    def draft(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts (batch, j) from the extra heads' logits (batch, j, vocab), and their distributions."""
        if greedy:
            return greedy_tokens(logits), None
        probs = probs_from_logits(logits, temperature, top_p)
        return draw(probs, uniforms(probs.shape[1])), probs

    h, pos, last, logits0, prompt_logprobs = prefill(model, prompt_tokens, logprobs)
    x0 = pick(logits0)
    drafts, q = draft(draft_logits(model, h, pos, last, counter.choose() if counter else k))

    first_lp = token_logprobs(logits0, x0).tolist() if logprobs else [0.0] * bsz
    x0_list = x0.tolist()
    for b in range(bsz):
        if not outputs.done[b]:
            stats.forwards += 1
            outputs.emit(b, [x0_list[b]], [first_lp[b]])

    cur = last + 1  # position of each row's last produced token x0, not yet fed
    in_flight: deque[QueuedStep] = deque()
    last_read = 0.0

    def read(step: QueuedStep) -> None:
        """Emit a queued step's tokens and count its statistics, waiting for its results if need be."""
        nonlocal last_read
        tokens_list, n_acc_list, *lp = from_host(step.results, step.ready)
        accepted = outputs.add_step(step.rows, tokens_list, n_acc_list, [step.j] * len(step.rows),
                                    lp[0] if logprobs else None)
        now = time.perf_counter()
        if counter is not None:
            # A step's time: from its queueing, or from the previous read when it was queued before that
            # (then the two overlapped, and the interval between reads is what it cost).
            counter.observe(step.j, accepted, now - max(step.queued_at, last_read) if step.j == step.k_next else None)
        last_read = now

    # Under compile, "auto" keeps the batch whole: each count at each batch size would be a graph of its
    # own, compiled in the middle of decoding (a benchmark at batch 16 spent most of its time compiling).
    batch_size = (lambda n: None) if auto and steps.compiled else steps.batch_size
    while not all(outputs.done):
        keep = outputs.shrink(batch_size, in_flight)
        if keep is not None:  # finished rows left the batch
            x0, drafts, cur, rows, slot_rows = x0[keep], drafts[keep], cur[keep], rows[: len(keep)], slot_rows[keep]
            q = None if q is None else q[keep]
            if counter is not None:
                counter.batch = len(keep)
        queued_at = time.perf_counter()
        # A step writes positions cur .. cur + j; near the end of the cache, verify fewer drafts. Steps
        # not read yet may have moved a row by up to their j + 1.
        furthest = outputs.furthest(in_flight)
        j = min(drafts.shape[1], max_seq_len - 1 - furthest)
        if in_flight and j < drafts.shape[1]:
            read(in_flight.popleft())  # read first: the true positions may leave room for every draft
            continue
        active_list, active = outputs.running(device)
        k_next = counter.choose() if counter else k  # drafts for the next step
        # Finished rows ride along at position 0 so the batch keeps its shape; their output is final.
        start = torch.where(active, cur, torch.zeros_like(cur))
        inp = torch.cat([x0[:, None], drafts[:, :j]], dim=1)
        inp = torch.where(active[:, None], inp, torch.zeros_like(inp))
        step = steps if j == k_next else eager
        span = step.span(furthest + j + 1)
        if greedy and not logprobs:
            # One fused forward: verify, accept, and draft the next step at the accepted position.
            step_tokens, n_acc, drafts = step.greedy(inp, start, k_next, span=span)
            nxt = step_tokens[rows, n_acc]
        else:
            h, logits0 = step.step(inp, start, span=span)  # logits0: (batch, j + 1, vocab)
            if greedy:
                step_tokens = greedy_tokens(logits0)  # accepted drafts equal the head's tokens
                n_acc = leading_true(step_tokens[:, :j] == drafts[:, :j])
                nxt = step_tokens[rows, n_acc]
            else:
                # A rejection resamples from the residual there; all accepted: a bonus token from p.
                n_acc, nxt, step_tokens = accept_sampled(probs_from_logits(logits0, temperature, top_p), q[:, :j],
                                                         drafts[:, :j], uniforms(j, dtype=torch.float32), uniforms())
            drafts, q = draft(step.draft(h, start, n_acc, k_next, span=span))

        results = [step_tokens, n_acc] + ([token_logprobs(logits0, step_tokens)] if logprobs else [])
        in_flight.append(QueuedStep(j, active_list, *to_host(results), k_next=k_next, queued_at=queued_at))
        cur = cur + n_acc + 1
        x0 = nxt
        while len(in_flight) > lag:
            read(in_flight.popleft())

    tokens, lps = outputs.result(echo, prompt_logprobs)
    return tokens, lps, stats
