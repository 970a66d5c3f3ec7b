#!/usr/bin/env bash
# The shipped model's extra heads, self-distilled: the model greedily continues 2000 snippets of the
# standard library it was trained on, and its 3 extra heads are trained on that text with everything
# else frozen (embeddings, trunk, next-token head, norm, output): plain decoding is bit for bit what it
# was, and the heads learn what this model says next rather than what the corpus says (Medusa-2's
# self-distillation), which is what self-speculative verification accepts.
#
#   bash recipes/default-model-heads/run.sh      # ~25 minutes on the 2-core CPU (docs/default_model.md)
set -euo pipefail
OUT=${OUT:-runs/default-model-heads}
STEPS=${STEPS:-300}
HERE=$(dirname "$0")
# The shipped heads came from the n=4 run's checkpoint (MODEL_CARD.md: n4/step-001200, converted to bf16);
# the shipped model itself has the same trunk, so it distills the same text, but its heads start distilled.
BASE=${BASE:-$(python -c "from multitoken.checkpoint import default_ckpt_dir; print(default_ckpt_dir())")}
mkdir -p "$OUT"

[ -f "$OUT/prompts.txt" ] || python "$HERE/prompts.py" "$OUT/prompts.txt"
[ -f "$OUT/distill.jsonl" ] || multitoken distill --ckpt-dir "$BASE" --prompts-file "$OUT/prompts.txt" \
    --out "$OUT/distill.jsonl" --temperature 0 --max-gen-len 192 --batch-size 16
multitoken train --from "$BASE" --freeze-trunk --data "$OUT/distill.jsonl" --val-fraction 0.05 \
    --out "$OUT/run" --steps "$STEPS" --batch-size 16 --seq-len 256 --lr 1e-3 --warmup 20 --bf16 \
    --eval-every 100 --save-every 100 --seed 0 --resume
CKPT=$(ls -d "$OUT"/run/step-* | tail -1)
multitoken convert --from-meta "$CKPT" --dtype bfloat16 --out "$OUT/model"
cp "$BASE/tokenizer.model" "$OUT/model/"
python benchmarks/bench_tree.py --ckpt-dir "$BASE" --prompts 16 --trees 8 16 --new-tokens 128 --threads 2
python benchmarks/bench_tree.py --ckpt-dir "$OUT/model" --prompts 16 --trees 8 16 --new-tokens 128 --threads 2
