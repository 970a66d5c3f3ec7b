#!/usr/bin/env bash
# The shipped model's extra heads, self-distilled: the model greedily continues 8000 snippets of the
# standard library it was trained on, and its 3 extra heads are trained on that text with everything
# else frozen (embeddings, trunk, next-token head, norm, output): plain decoding is bit for bit what it
# was, and the heads learn what this model says next rather than what the corpus says (Medusa-2's
# self-distillation), which is what self-speculative verification accepts.
#
#   bash recipes/default-model-heads/run.sh      # ~45 + 20 minutes on the 2-core CPU (docs/default_model.md)
#
# The shipped heads are the third such distillation (2026-12-04): half the target is the next-token
# head's whole distribution over the token each head predicts (--soft-targets 0.5), half the text's
# token; 600 steps on the second distillation's text, from its heads. The second (2026-12-03): the
# text's tokens, 8000 snippets continued in bf16, 900 steps from the first one's heads; the first
# (2026-11-27): prompts.py's 2000 default snippets, duplicates kept, continued in float32, 300 steps,
# from the pretraining run's heads.
set -euo pipefail
OUT=${OUT:-runs/default-model-heads}
PROMPTS=${PROMPTS:-8000}
PER_FILE=${PER_FILE:-14}
DTYPE=${DTYPE:-bfloat16}
STEPS=${STEPS:-600}
SOFT=${SOFT:-0.5}
WARMUP=${WARMUP:-30}
EVERY=${EVERY:-300}
HERE=$(dirname "$0")
# The distilled text depends only on the trunk and the next-token head, which every version of the
# shipped model shares; training starts from the shipped (already distilled) heads.
BASE=${BASE:-$(python -c "from multitoken.checkpoint import default_ckpt_dir; print(default_ckpt_dir())")}
mkdir -p "$OUT"

if [ ! -f "$OUT/prompts.txt" ]; then
    # Snippets from PER_FILE places per module, duplicates dropped (overlapping places), the first PROMPTS.
    python "$HERE/prompts.py" "$OUT/all-prompts.txt" $((PROMPTS * 9 / 8)) "$PER_FILE"
    awk '!seen[$0]++' "$OUT/all-prompts.txt" | head -n "$PROMPTS" > "$OUT/prompts.txt"
fi
[ -f "$OUT/distill.jsonl" ] || multitoken distill --ckpt-dir "$BASE" --prompts-file "$OUT/prompts.txt" \
    --out "$OUT/distill.jsonl" --temperature 0 --max-gen-len 192 --batch-size 16 --dtype "$DTYPE" --device cpu
multitoken train --from "$BASE" --freeze-trunk --soft-targets "$SOFT" --data "$OUT/distill.jsonl" --val-fraction 0.05 \
    --out "$OUT/run" --steps "$STEPS" --batch-size 16 --seq-len 256 --lr 1e-3 --warmup "$WARMUP" --bf16 \
    --eval-every "$EVERY" --save-every "$EVERY" --seed 0 --resume
CKPT=$(ls -d "$OUT"/run/step-* | tail -1)
multitoken convert --from-meta "$CKPT" --dtype bfloat16 --out "$OUT/model"
cp "$BASE/tokenizer.model" "$OUT/model/"
# The heads before and after: expected acceptance on the same text (greedy and sampled), then decoding.
python "$HERE/acceptance.py" "$BASE" "$OUT/model" --threads 2
python benchmarks/bench_tree.py --ckpt-dir "$BASE" --prompts 16 --trees 8 16 --new-tokens 128 --threads 2
python benchmarks/bench_tree.py --ckpt-dir "$OUT/model" --prompts 16 --trees 8 16 --new-tokens 128 --threads 2
