"""Prompts for self-distilling the shipped model's heads: 2000 six-line snippets from random places in
the standard library modules it was trained on (held-out modules excluded), one per line with "\\n"
for newlines, as `multitoken distill --prompts-file` reads them. Deterministic (seed 0).

    python recipes/default-model-heads/prompts.py OUT.txt [N] [PER_FILE]

N prompts (default 2000), PER_FILE places drawn in each module (default 3; more for a larger N: there
are ~715 modules). The defaults give the prompts the first distillation used, unchanged.
"""

import os
import random
import sys
from pathlib import Path

from multitoken.train.data import HELD_OUT_MODULES


def main(out: Path, n: int = 2000, per_file: int = 3, seed: int = 0) -> None:
    root = Path(os.__file__).parent
    held_out = set(HELD_OUT_MODULES)
    files = sorted(p for p in root.rglob("*.py")
                   if not {"test", "idle_test", "site-packages"} & set(p.parts)
                   and not (p.parent == root and p.stem in held_out))
    rng = random.Random(seed)
    prompts = []
    for f in files:
        try:
            lines = f.read_text("utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        if len(lines) < 12:
            continue
        for _ in range(per_file):
            i = rng.randrange(0, max(1, len(lines) - 8))
            text = "".join(lines[i:i + 6])
            if 20 < len(text) < 400:
                prompts.append(text.replace("\n", "\\n"))
    rng.shuffle(prompts)
    out.write_text("\n".join(prompts[:n]) + "\n")
    print(f"wrote {out}: {min(n, len(prompts))} prompts from {len(files)} modules")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *map(int, sys.argv[2:4]))
