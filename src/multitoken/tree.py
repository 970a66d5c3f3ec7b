"""Tree drafting: verify several candidates per draft position in one forward (Medusa, EAGLE-2, SpecInfer)
with the multi-token prediction heads.

The chain (speculative.py) drafts one token per extra head. Here extra head d offers its best candidates
(rank 0 first) and a tree of paths through them is verified in one forward. Node 0 is the root, the
last token produced and not yet fed; a node at depth d holds a candidate of head d. Every head reads the
same trunk state, so head d's candidates are the same under every parent: a tree is a topology of ranks,
filled with each row's tokens.

- Topology: static, from a list of rank paths (Medusa's "choices"); or dynamic, per row, the chain
  (every head's best candidate) and then the nodes of highest joint probability under the heads up
  to a `budget` of nodes (EAGLE-2's reranking, here a product of the independent per-head
  probabilities). Nodes are in topological order, parents first.
- Verify: the trunk and the next-token head run over all nodes at once. Node i is cached in slot
  cur + i but rotated as position cur + depth(i), and sees the cache prefix and its own ancestors only.
- Accept, greedy: the deepest node whose every ancestor-or-self token is the next-token head's argmax
  at its parent, then that head's token after it: exactly plain greedy decoding.
- Compact: the accepted path's trunk and next-token-head keys/values move from slots cur + path[j] to
  cur + j; the rest stay behind past the row's end, where masks hide them until they are overwritten.
- Extra heads never see the tree. After acceptance they run on the accepted path's trunk states at
  positions cur .. cur + n_acc (keys/values cached for every path token, as in the chain) and their full
  forward and unembedding at the last accepted token alone, which drafts the next tree.

Sampling (temperature > 0) is lossless by recursive rejection sampling over siblings (SpecInfer; the
without-replacement form of Jeon et al. 2024). Head d's candidates are an ordered sample without
replacement from its processed distribution q_d (Gumbel-top-k), one sample per depth shared by the nodes
of that depth (only one node per depth is ever visited, so sharing costs no independence). At a visited
node with target p, children are tried in rank order: child x passes with probability min(1, p(x)/q(x));
on rejection p <- normalize(max(0, p - q)) and x leaves q (q <- normalize(q without x)), because the next
child is a draw from q without the candidates already tried. Each try is thus an ordinary speculative
sampling step from the current p and q, so by induction the node's token follows the original p. If no
child passes, the token is drawn from the final p. Topologies are fixed before the draws (a dynamic
tree scores the sorted probabilities of q, not the drawn tokens), so which children exist never depends
on what they hold; siblings always hold consecutive ranks, so no draw is skipped.

Eagerly on a CPU with `multitoken.kernels`, the bookkeeping between forwards (choosing a dynamic tree,
its positions and mask, greedy acceptance, moving cache entries) is a kernel call each (`csrc/tree.cpp`,
where `kernels.tree_ops`): in ATen it is tens of operator calls on a few dozen numbers, about as long
as the trunk's extra work for the tree's tokens. The functions here are the same computations in ATen:
the reference, and what compiled steps and GPUs run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from multitoken import kernels
from multitoken.model import Positions, Transformer
from multitoken.sampling import draw, greedy as greedy_tokens, probs_from_logits
from multitoken.steps import DecodeSteps, draft_logits, span_length
from multitoken.speculative import (
    Outputs,
    QueuedStep,
    SpeculativeStats,
    accept_drafts,
    check_draft_heads,
    default_lag,
    from_host,
    prefill,
    residual,
    to_host,
    token_logprobs,
)

TreeSpec = int | Sequence[Sequence[int]]  # a node budget (dynamic tree) or rank paths (static tree)


@dataclass
class Tree:
    """Draft trees of a batch, all (batch, nodes), nodes in topological order with node 0 the root."""

    parent: torch.Tensor  # the root is its own parent
    depth: torch.Tensor  # 0 at the root; a node at depth d holds a candidate of head d
    rank: torch.Tensor  # which of its head's candidates the node holds
    tokens: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.parent.shape[1]

    def truncate(self, n: int) -> Tree:
        """The first n nodes: still a tree, since parents come first (and lower-ranked siblings too);
        for a dynamic tree, the best tree of n nodes, the chain first."""
        return Tree(self.parent[:, :n], self.depth[:, :n], self.rank[:, :n],
                    None if self.tokens is None else self.tokens[:, :n])

    def ancestors(self, max_depth: int | None = None) -> torch.Tensor:
        """(batch, nodes, nodes) bool: [b, i, j] is True when node j is node i or one of its ancestors.
        `max_depth` bounds the depth without reading it from the device (as a compiled step needs)."""
        bsz, n = self.parent.shape
        anc = torch.zeros(bsz, n, n, dtype=torch.bool, device=self.parent.device)
        node = torch.arange(n, device=self.parent.device).expand(bsz, n)
        climbs = int(self.depth.max()) + 1 if max_depth is None else max_depth + 1
        for _ in range(climbs):  # climb to the root, marking every node passed
            anc.scatter_(2, node[..., None], True)
            node = self.parent.gather(1, node)
        return anc

    def children(self, n_ranks: int) -> torch.Tensor:
        """(batch, nodes, n_ranks): the child of each node holding each rank, or -1."""
        bsz, n = self.parent.shape
        child = torch.full((bsz, n, n_ranks), -1, dtype=torch.long, device=self.parent.device)
        rows = torch.arange(bsz, device=self.parent.device)[:, None]
        nodes = torch.arange(1, n, device=self.parent.device).expand(bsz, n - 1)
        child[rows, self.parent[:, 1:], self.rank[:, 1:]] = nodes
        return child


def close_paths(paths: Sequence[Sequence[int]], max_depth: int) -> list[tuple[int, ...]]:
    """A static tree's paths closed under prefixes and lower-ranked siblings, in topological order.

    A path (r1, r2, ...) is head 1's candidate r1, then head 2's candidate r2, ... Closing under
    lower ranks keeps every candidate count a prefix of its head's ranking (sampling needs that)."""
    closed = set()
    for path in paths:
        path = tuple(path)
        if not path or any(not isinstance(r, int) or r < 0 for r in path):
            raise ValueError(f"a tree path is a non-empty sequence of ranks >= 0, got {list(path)}")
        if len(path) > max_depth:
            raise ValueError(f"tree path {list(path)} is deeper than the {max_depth} draft heads")
        for i, r in enumerate(path):
            closed.update(path[:i] + (lower,) for lower in range(r + 1))
    return sorted(closed, key=lambda p: (len(p), p))


def static_tree(paths: list[tuple[int, ...]], bsz: int, device) -> Tree:
    """The topology of closed, sorted paths, the same for every row."""
    index = {p: i + 1 for i, p in enumerate(paths)}
    parent = [0] + [index.get(p[:-1], 0) for p in paths]
    depth = [0] + [len(p) for p in paths]
    rank = [0] + [p[-1] for p in paths]
    as_rows = lambda xs: torch.tensor(xs, dtype=torch.long, device=device).expand(bsz, -1)  # noqa: E731
    return Tree(as_rows(parent), as_rows(depth), as_rows(rank))


def best_tree(logp: torch.Tensor, budget: int) -> Tree:
    """Per row, the chain (every head's best candidate, as the paper drafts) and then the nodes of
    highest joint log probability up to `budget` nodes, given each head's candidate log probabilities
    sorted best first, logp (batch, heads, ranks): EAGLE-2's dynamic tree, made to contain the chain.

    The chain comes first because the heads' probabilities are no calibrated acceptance rates: by joint
    probability alone, under-confident heads spend the budget on breadth and the tree can accept less
    than the chain. Depth by depth only the best `budget` nodes can have children worth keeping (a
    child never scores above its parent), so each depth expands the previous depth's best `budget`
    nodes; the chain's node is the best of its depth, since the heads are independent."""
    bsz, n_heads, n_ranks = logp.shape
    device = logp.device
    # Float64 and finite, with a small penalty per rank: a child scores strictly below its parent and a
    # sibling strictly below the ones ranked before it, so the best nodes always form a tree whose
    # siblings hold consecutive ranks, whatever the ties.
    logp = logp.double().clamp_min(-1e4) - 1e-6 * torch.arange(1, n_ranks + 1, device=device)
    beam = torch.zeros(bsz, 1, dtype=torch.float64, device=device)  # the root's score
    beam_id = torch.zeros(bsz, 1, dtype=torch.long, device=device)  # candidate ids: 0 is the root
    scores, parents, depths, ranks = [], [], [], []
    n_ids = 1
    for d in range(n_heads):
        expanded = (beam[:, :, None] + logp[:, d, None, :]).flatten(1)
        beam, idx = expanded.topk(min(budget, expanded.shape[1]), dim=1)  # sorted: parents before children
        scores.append(beam)
        parents.append(beam_id.gather(1, idx // n_ranks))
        ranks.append(idx % n_ranks)
        depths.append(torch.full_like(idx, d + 1))
        beam_id = n_ids + torch.arange(beam.shape[1], device=device).expand(bsz, -1)
        n_ids += beam.shape[1]
    all_scores = torch.cat(scores, 1)
    # The chain's nodes, first of their depths, jump the queue: a node's parent and lower-ranked
    # siblings still always outrank it, so the chosen nodes stay a tree.
    first_of_depth = torch.cat([torch.arange(s.shape[1], device=device) == 0 for s in scores])
    all_scores = all_scores + 1e6 * first_of_depth  # above any joint score (each is >= -1e4 per head)
    n = min(budget, all_scores.shape[1])
    # Best first is a topological order, and any prefix is the best tree of its size (see truncate).
    chosen = all_scores.topk(n, dim=1).indices
    node_of = torch.zeros(bsz, n_ids, dtype=torch.long, device=device)  # candidate id -> node (root -> 0)
    node_of.scatter_(1, 1 + chosen, torch.arange(1, n + 1, device=device).expand(bsz, -1))
    root = torch.zeros(bsz, 1, dtype=torch.long, device=device)
    parent = node_of.gather(1, torch.cat(parents, 1).gather(1, chosen))
    return Tree(torch.cat([root, parent], 1), torch.cat([root, torch.cat(depths, 1).gather(1, chosen)], 1),
                torch.cat([root, torch.cat(ranks, 1).gather(1, chosen)], 1))


class TreeDrafter:
    """Turns the extra heads' logits into one draft tree per row: static paths or a dynamic budget."""

    def __init__(self, tree: TreeSpec, max_depth: int, vocab_size: int):
        if isinstance(tree, bool) or not isinstance(tree, (int, Sequence)) or isinstance(tree, str):
            raise TypeError(f"tree must be a node budget (int) or a list of rank paths, got {tree!r}")
        if isinstance(tree, int):
            if tree < 1:
                raise ValueError(f"a tree needs a budget of at least 1 draft node, got {tree}")
            self.budget, self.paths = tree, None
            self.depth, self.n_ranks = max_depth, min(tree, vocab_size)
        else:
            self.paths = close_paths(tree, max_depth)
            if not self.paths:
                raise ValueError("a static tree needs at least one path")
            self.budget = len(self.paths)
            self.depth = max(map(len, self.paths))
            self.n_ranks = 1 + max(p[-1] for p in self.paths)
            if self.n_ranks > vocab_size:
                raise ValueError(f"tree rank {self.n_ranks - 1} is past the vocabulary of {vocab_size}")

    def __call__(self, logits: torch.Tensor, root: torch.Tensor, temperature: float, top_p: float
                 ) -> tuple[Tree, torch.Tensor | None]:
        """The tree with its tokens for draft logits (batch, depth, vocab) and root tokens (batch,),
        and, when sampling, the heads' processed distributions q (batch, depth, vocab)."""
        dynamic = self.paths is None and kernels.tree_ops(logits)  # in the kernels: best_tree and the gather below
        if temperature == 0 and dynamic:  # and the log probabilities and their best ranks, in one call
            tokens, parent, depth, rank = torch.ops.multitoken.greedy_tree.default(logits.float(), root, self.budget,
                                                                                  self.n_ranks)
            return Tree(parent, depth, rank, tokens), None
        if temperature == 0:
            q = None
            logp, tokens = torch.log_softmax(logits.float(), -1).topk(self.n_ranks, dim=-1)
        else:
            q = probs_from_logits(logits, temperature, top_p)
            logp = q.topk(self.n_ranks, dim=-1).values.log()  # the topology sees probabilities, not draws
            gumbel = -torch.log(-torch.log(torch.rand_like(q).clamp_min(1e-20)))
            tokens = (q.log() + gumbel).topk(self.n_ranks, dim=-1).indices  # ordered, without replacement
        if dynamic:
            tokens, parent, depth, rank = torch.ops.multitoken.best_tree.default(logp, tokens, root, self.budget)
            return Tree(parent, depth, rank, tokens), q
        bsz = root.shape[0]
        tree = static_tree(self.paths, bsz, root.device) if self.paths else best_tree(logp, self.budget)
        index = ((tree.depth - 1).clamp_min(0) * self.n_ranks + tree.rank)
        tree.tokens = tokens.flatten(1).gather(1, index)
        tree.tokens[:, 0] = root
        return tree, q


def tree_positions(model: Transformer, tree: Tree, start: torch.Tensor, max_depth: int | None = None,
                   span: int | None = None) -> Positions:
    """Node i of row b in cache slot start[b] + i, rotated as position start[b] + depth, seeing the
    row's cache before start[b] and its own ancestors. Given `max_depth` (a compiled step), the mask
    spans the cache's first `span` slots (default: all) and nothing is read from the device: the
    caller keeps the tree in bounds."""
    if max_depth is None and kernels.tree_ops(start):  # the same positions in one call
        return Positions(*torch.ops.multitoken.tree_positions.default(tree.parent, tree.depth, start, model.rope))
    bsz, n = tree.parent.shape
    slots = start[:, None] + torch.arange(n, device=start.device)
    end = int(slots.max()) + 1 if max_depth is None else span or model.args.max_seq_len
    rel = torch.arange(end, device=start.device) - start[:, None]  # (batch, end): the node in each slot
    in_tree = (rel >= 0) & (rel < n)
    sees = tree.ancestors(max_depth).gather(2, rel.clamp(0, n - 1)[:, None, :].expand(bsz, n, end))
    mask = (rel < 0)[:, None, :] | (sees & in_tree[:, None, :])
    if max_depth is not None:
        return Positions(slots, model.rope[start[:, None] + tree.depth], mask.unsqueeze(1))
    return model.positions_at(slots, start[:, None] + tree.depth, mask)


def first_moved(path: torch.Tensor, n_acc: torch.Tensor) -> int:
    """The least depth j at which a row's accepted path (batch, depth + 1; n_acc (batch,) drafts) holds
    another node than node j, whose keys/values sit in slot j: the path's entries before it are in
    place already. path.shape[1] if every row's are (read on the host)."""
    return min([j for row, n in zip(path.tolist(), n_acc.tolist()) for j in range(1, n + 1) if row[j] != j],
               default=path.shape[1])


def accept_greedy(tree: Tree, target: torch.Tensor, max_depth: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted path (batch, depth + 1) of node indices, root first, and its draft count
    (batch,), given the next-token head's argmax at every node (batch, nodes). A node passes when
    its token is the argmax at its parent; the deepest node whose whole path passes is kept (siblings
    hold distinct tokens, so it is unique). Past a row's draft count the path repeats padding. The
    depth is the tree's, or `max_depth` if given (then nothing is read from the device)."""
    n = tree.size
    width = int(tree.depth.max()) + 1 if max_depth is None else max_depth + 1
    passes = tree.tokens == target.gather(1, tree.parent)
    passes[:, 0] = True
    # A node is on an accepted path when it and every ancestor pass: AND down the tree, a level a time
    # (the root is its own parent).
    on_path = passes
    for _ in range(width - 1):
        on_path = on_path & on_path.gather(1, tree.parent)
    best = torch.where(on_path, tree.depth, -1).argmax(1, keepdim=True)
    n_acc = tree.depth.gather(1, best)
    # Climb from the deepest accepted node to the root, writing each node at its depth.
    path = torch.full((tree.parent.shape[0], width), n - 1, dtype=torch.long, device=target.device)
    node = best
    for _ in range(width):
        path = path.scatter(1, tree.depth.gather(1, node), node)
        node = tree.parent.gather(1, node)
    return path, n_acc.squeeze(1)


def path_tokens(tree: Tree, path: torch.Tensor, n_acc: torch.Tensor, nxt: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted path cut to the longest row's (batch, 1 + most drafts accepted), and the step's
    tokens, the same shape: each row's accepted drafts, then the token after them, `nxt` (then padding)."""
    path = path[:, : int(n_acc.max()) + 1]
    tokens = torch.cat([tree.tokens.gather(1, path[:, 1:]), torch.zeros_like(nxt[:, None])], 1)
    tokens.scatter_(1, n_acc[:, None], nxt[:, None])
    return path, tokens


def accept_greedy_step(tree: Tree, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An eager greedy step's acceptance given the next-token head's logits at every node (batch, nodes,
    vocab) float32: `accept_greedy`'s path (cut as `path_tokens` cuts it) and draft counts, the
    next-token head's token after each row's path, and the step's tokens."""
    if kernels.tree_ops(logits):  # all of it, the argmax too, in one call
        return torch.ops.multitoken.accept_greedy.default(tree.tokens, tree.parent, tree.depth, logits)
    target = greedy_tokens(logits)
    path, n_acc = accept_greedy(tree, target)
    nxt = target.gather(1, path.gather(1, n_acc[:, None])).squeeze(1)
    path, tokens = path_tokens(tree, path, n_acc, nxt)
    return path, n_acc, nxt, tokens


def _without(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """q (batch, vocab) with token x[b] removed and renormalised: the next draw without replacement."""
    q = q.scatter(1, x[:, None], 0.0)
    return q / q.sum(-1, keepdim=True).clamp_min(1e-30)


def accept_sampled(tree: Tree, p: torch.Tensor, q: torch.Tensor, n_ranks: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recursive rejection sampling down the tree, lossless (see the module docstring). p (batch,
    nodes, vocab): the target at every node; q (batch, depth, vocab): each head's distribution.
    Returns the accepted path (batch, depth + 1), its draft count and the distribution of the token
    after it (batch, vocab)."""
    bsz = p.shape[0]
    rows = torch.arange(bsz, device=p.device)
    child = tree.children(n_ranks)
    child = child[..., : int((child >= 0).sum(-1).max())]  # no node has more children than this
    node = torch.zeros(bsz, dtype=torch.long, device=p.device)
    walking = torch.ones(bsz, dtype=torch.bool, device=p.device)
    dist = torch.empty_like(p[:, 0])
    path = [node]
    # On a CPU the loops stop once no row has a candidate left to try (the rest would change nothing:
    # a batch of one mostly accepts its first or second candidate of each depth); on a GPU reading that
    # would make the host wait for the device every candidate.
    on_cpu = p.device.type == "cpu"
    depth = int(tree.depth.max())
    for d in range(depth):
        if on_cpu and not bool(walking.any()):
            path += [node] * (depth - d)  # every row has stopped: its node to the end
            break
        p_cur, q_cur = p[rows, node], q[:, d]
        nxt = node
        for r in range(child.shape[-1]):
            c = child[rows, node, r]
            x = tree.tokens[rows, c.clamp_min(0)]
            px, qx = p_cur[rows, x], q_cur[rows, x]
            waiting = walking & (nxt == node) & (c >= 0)  # rows with this candidate still to try
            # A candidate with q(x) = 0 is no draw: q's support ran out before the ranks did.
            tried = waiting & (qx > 0)
            if on_cpu and not bool(tried.any()):
                if not bool(waiting.any()):
                    break  # every row accepted a candidate or has none left (candidates come best first)
                continue
            ok = tried & accept_drafts(px, qx, torch.rand(bsz, device=p.device))
            rejected = (tried & ~ok)[:, None]
            p_cur = torch.where(rejected, residual(p_cur, q_cur), p_cur)
            q_cur = torch.where(rejected, _without(q_cur, x), q_cur)
            nxt = torch.where(ok, c, nxt)
        stopped = walking & (nxt == node)
        dist = torch.where(stopped[:, None], p_cur, dist)
        walking = walking & ~stopped
        node = nxt
        path.append(node)
    dist = torch.where(walking[:, None], p[rows, node], dist)  # a leaf: the next-token head's own token
    return torch.stack(path, 1), tree.depth[rows, node], dist


def greedy_tree_step(model: Transformer, drafter: TreeDrafter, tokens: torch.Tensor, parent: torch.Tensor,
                     depth: torch.Tensor, rank: torch.Tensor, start: torch.Tensor,
                     span: int | torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One greedy tree step with every shape fixed by the tree's size and `span` (the cache slots
    attended, default all: `DecodeSteps.span`; compiled, its `window`), for compiling: verify the tree
    (tokens, parent, depth, rank: (batch, nodes)) at slots start[b] onwards, accept, compact the
    accepted path's keys/values, run the extra heads on it and draft the next tree. Returns the
    step's tokens (batch, depth + 1), of which each row emits the first n_acc + 1; n_acc (batch,);
    and the next tree's tokens, parent, depth and rank. Padding past a row's accepted path is
    compacted and fed to the extra heads too, into slots past the row's end, which masks hide until
    later steps overwrite them."""
    width = min(drafter.depth, drafter.budget)  # the deepest a tree of this budget gets
    span = span_length(span) or model.args.max_seq_len
    t = Tree(parent, depth, rank, tokens)
    tpos = tree_positions(model, t, start, max_depth=width, span=span)
    h = model.forward_trunk(tokens, tpos)
    target = greedy_tokens(model.logits(model.forward_head(0, h, tpos)))
    path, n_acc = accept_greedy(t, target, max_depth=width)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    nxt = target[rows, path[rows, n_acc]]
    step_tokens = torch.cat([tokens.gather(1, path[:, 1:]), torch.zeros_like(nxt[:, None])], 1)
    step_tokens[rows, n_acc] = nxt
    slots = torch.arange(width + 1, device=tokens.device)
    model.move_cache_entries(start[:, None] + path, start[:, None] + slots, extra_heads=False)
    h = h.gather(1, path[..., None].expand(-1, -1, h.shape[-1]))
    pos = model.positions(start, tokens.shape[0], width + 1, span=span)
    nt, _ = drafter(draft_logits(model, h, pos, n_acc, drafter.depth), nxt, 0.0, 1.0)
    return step_tokens, n_acc, nt.tokens, nt.parent, nt.depth, nt.rank


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_tokens: Sequence[Sequence[int]],
    max_gen_len: int,
    eos_id: int,
    *,
    tree: TreeSpec,
    temperature: float = 0.0,
    top_p: float = 1.0,
    draft_heads: int | None = None,
    logprobs: bool = False,
    echo: bool = False,
    on_token: Callable[[int, int], None] | None = None,
    steps: DecodeSteps | None = None,
    lag: int | None = None,
) -> tuple[list[list[int]], list[list[float]] | None, SpeculativeStats]:
    """Tree-drafting `generate` with the semantics of `Llama.generate` (prompts already checked).
    `tree` is a node budget (a dynamic tree of that many draft tokens) or a list of rank paths; the
    verify forward feeds the tree's draft tokens plus the root. With compiled `steps`, greedy steps
    without logprobs run as one compiled graph (`greedy_tree_step`) while the whole tree fits in the
    cache; the others, the prefill and sampling run eagerly. Up to `lag` fused steps are queued
    before the host reads their results, as in `speculative.generate` (default: 1 on a GPU, else 0);
    eager steps, and steps near the end of the cache, are read first."""
    drafter = TreeDrafter(tree, check_draft_heads(model, draft_heads), model.args.vocab_size)
    greedy = temperature == 0
    device = model.tok_embeddings.weight.device
    max_seq_len = model.args.max_seq_len
    bsz = len(prompt_tokens)
    rows = torch.arange(bsz, device=device)
    stats = SpeculativeStats(proposed=[0] * drafter.depth, accepted=[0] * drafter.depth)
    outputs = Outputs(model, prompt_tokens, max_gen_len, eos_id, stats, on_token)

    h, pos, index, logits0, prompt_logprobs = prefill(model, prompt_tokens, logprobs)
    x0 = greedy_tokens(logits0) if greedy else draw(probs_from_logits(logits0, temperature, top_p))
    first_lp = token_logprobs(logits0, x0).tolist() if logprobs else [0.0] * bsz
    for b, t in enumerate(x0.tolist()):
        if not outputs.done[b]:
            stats.forwards += 1
            outputs.emit(b, [t], [first_lp[b]])

    fused = (steps.compile_fn(greedy_tree_step) if steps is not None and steps.compiled and greedy and not logprobs
             else None)
    lag = default_lag(device) if lag is None else lag
    width = min(drafter.depth, drafter.budget)  # the most drafts a tree step accepts
    cur = index + 1  # position of each row's last produced token x0, not yet fed
    in_flight: deque[QueuedStep] = deque()  # results: tokens (batch, path), accepted counts, tree depths, [logprobs]
    t, q = drafter(draft_logits(model, h, pos, index, drafter.depth), x0, temperature, top_p)
    full_size = t.size

    def read(step: QueuedStep) -> None:
        """Emit a step's tokens and count its statistics, waiting for its results if need be."""
        tokens_list, n_acc_list, depth_list, *lp = from_host(step.results, step.ready)
        outputs.add_step(step.rows, tokens_list, n_acc_list, depth_list, lp[0] if logprobs else None)

    while not all(outputs.done):
        keep = outputs.shrink(steps.batch_size if steps is not None else lambda n: n, in_flight)  # without steps: eager
        if keep is not None:  # finished rows left the batch
            x0, cur, rows = x0[keep], cur[keep], rows[: len(keep)]
            t = Tree(t.parent[keep], t.depth[keep], t.rank[keep], t.tokens[keep])
            q = None if q is None else q[keep]
        # The tree fills slots cur .. cur + size - 1; near the end of the cache, verify fewer nodes.
        furthest = outputs.furthest(in_flight)
        room = max_seq_len - furthest
        use_fused = fused is not None and room >= full_size
        if in_flight and not use_fused:
            read(in_flight.popleft())  # eager steps, and the end of the cache, need the true positions
            continue
        active_list, active = outputs.running(device)
        t = t.truncate(min(t.size, room))
        # Finished rows ride along at position 0 so the batch keeps its shape; their output is final.
        start = torch.where(active, cur, torch.zeros_like(cur))
        tokens = torch.where(active[:, None], t.tokens, 0)
        depths = t.depth.max(1).values
        if use_fused:
            span = steps.span(furthest + full_size)
            step_tokens, n_acc, *next_tree = fused(model, drafter, tokens, t.parent, t.depth, t.rank, start, span=span)
            nxt = step_tokens[rows, n_acc]
            in_flight.append(QueuedStep(width, active_list, *to_host([step_tokens, n_acc, depths])))
            cur, x0 = cur + n_acc + 1, nxt
            # The fused step compacted the path and drafted the next tree. Copies: under CUDA graphs the next
            # replay overwrites this one's outputs, and the tree is an input of that replay.
            t = Tree(*(x.clone() for x in next_tree[1:]), tokens=next_tree[0])
            while len(in_flight) > lag:
                read(in_flight.popleft())
            continue

        tpos = tree_positions(model, t, start)
        h = model.forward_trunk(tokens, tpos)
        logits0 = model.logits(model.forward_head(0, h, tpos))  # (batch, nodes, vocab)
        if greedy:
            path, n_acc, nxt, emitted = accept_greedy_step(t, logits0)
        else:
            p = probs_from_logits(logits0, temperature, top_p)
            path, n_acc, dist = accept_sampled(t, p, q, drafter.n_ranks)
            nxt = draw(dist)
            path, emitted = path_tokens(t, path, n_acc, nxt)
        n_path = path.shape[1]
        lps = [token_logprobs(logits0[rows[:, None], path], emitted)] if logprobs else []
        read(QueuedStep(width, active_list, [emitted, n_acc, depths, *lps], None))
        cur, x0 = cur + n_acc + 1, nxt
        if all(outputs.done):
            break

        # Keep the accepted path: its keys/values into consecutive slots, its states for the extra heads.
        # Its nodes up to the first off the chain are in their slots already (node j of the chain sits in
        # slot cur + j): most steps accept a stretch of the chain, and an eager move costs some 60
        # operator calls.
        first = first_moved(path, n_acc)
        if first < n_path:
            model.move_cache_entries(start[:, None] + path[:, first:],
                                     start[:, None] + torch.arange(first, n_path, device=device),
                                     extra_heads=False)  # they never saw the tree
        h = h.gather(1, path[..., None].expand(-1, -1, h.shape[-1]))
        pos = kernels.row_positions(model, start, n_path)
        t, q = drafter(draft_logits(model, h, pos, n_acc, drafter.depth), x0, temperature, top_p)

    tokens, lps = outputs.result(echo, prompt_logprobs)
    return tokens, lps, stats
