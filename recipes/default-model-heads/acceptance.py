"""How well extra heads draft for self-speculation, measured without decoding: the expected acceptance
of each head's draft on fixed text, so that two sets of heads on one trunk compare without the noise of
sampled decodings (a decoding's tau over 16 prompts moved by +-0.1 between checkpoints of one run).

    python recipes/default-model-heads/acceptance.py CKPT [CKPT ...] [--temperatures 0 0.6 0.8]

The text: the first checkpoint's own continuations (128 tokens, top_p 0.9, seed 0) of 48 held-out
windows (3 places in each of the 16 held-out modules, 64 tokens each), one text per temperature, so
every checkpoint is scored on the same text. At each continuation position t, head j's draft (token
t + 1 + j) is verified by the next-token head at t + j: it passes with probability
a_j = sum_x min(p(x), q(x)) when sampling (p, q: the two heads' distributions after temperature and
top-p, as speculative sampling uses them), and a_j = [argmax q = argmax p] when greedy. The chain's
tokens per forward are then about 1 + E[a_1 + a_1 a_2 + a_1 a_2 a_3] (each draft given that the text so far
was drafted; decoding's own tau is lower, since its drafts are only verified where earlier ones passed).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from multitoken import Llama, load_model
from multitoken.sampling import probs_from_logits
from multitoken.tokenizer import load_tokenizer
from multitoken.train.data import HELD_OUT_MODULES

PROMPT_LEN, NEW_TOKENS, TOP_P = 64, 128, 0.9


def held_out_windows(tokenizer) -> list[list[int]]:
    """Three 64-token windows of each held-out module: its opening, a third and two thirds in."""
    root, windows = Path(os.__file__).parent, []
    for module in HELD_OUT_MODULES:
        ids = tokenizer.encode((root / f"{module}.py").read_text(), bos=True, eos=False)
        windows.append(ids[:PROMPT_LEN])
        windows += [[tokenizer.bos_id] + ids[o : o + PROMPT_LEN - 1] for o in (len(ids) // 3, 2 * len(ids) // 3)]
    return windows


def acceptance(model, text: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    """a_j (rows, positions) for each extra head j over the continuation part of `text` (rows, length)."""
    with torch.no_grad():
        logits = model(text, return_all_heads=True).float()  # (rows, length, n, vocab)
    n = model.n_future_tokens
    lo, hi = PROMPT_LEN - 1, text.shape[1] - n  # draft positions whose every verifier lies in the text
    rates = []
    for j in range(1, n):
        q, p = logits[:, lo:hi, j], logits[:, lo + j : hi + j, 0]
        if temperature == 0:
            rates.append((q.argmax(-1) == p.argmax(-1)).float())
        else:
            p, q = probs_from_logits(p, temperature, TOP_P), probs_from_logits(q, temperature, TOP_P)
            rates.append(torch.minimum(p, q).sum(-1))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dirs", nargs="+", type=Path, help="checkpoints sharing one trunk and tokenizer")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.6, 0.8])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.ckpt_dirs[0] / "tokenizer.model")
    windows = held_out_windows(tokenizer)
    first = Llama(load_model(args.ckpt_dirs[0], dtype=torch.bfloat16, max_seq_len=PROMPT_LEN + NEW_TOKENS,
                             max_batch_size=len(windows)), tokenizer)
    texts = {}
    for t in args.temperatures:
        torch.manual_seed(0)
        out, _ = first.generate(windows, NEW_TOKENS, temperature=t, top_p=TOP_P)
        length = min(len(w) + len(o) for w, o in zip(windows, out))  # rows that stopped early are cut
        texts[t] = torch.tensor([(w + o)[:length] for w, o in zip(windows, out)])
    print(f"{len(windows)} held-out windows; per temperature: tau estimate, then a_j of each extra head")
    for ckpt in args.ckpt_dirs:
        model = load_model(ckpt, dtype=torch.float32, max_seq_len=PROMPT_LEN + NEW_TOKENS, max_batch_size=len(windows))
        cells = []
        for t, text in texts.items():
            a = acceptance(model, text, t)
            chain = torch.stack(a).cumprod(0).sum(0)  # a_1 + a_1 a_2 + a_1 a_2 a_3 at each position
            cells.append(f"T={t:g}: {1 + chain.mean().item():.3f} (" + " ".join(f"{r.mean().item():.3f}" for r in a) + ")")
        print(f"{str(ckpt):34s} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
