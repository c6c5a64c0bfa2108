#!/usr/bin/env bash
# Recipe for the bundled model (qwen35/assets/model): data and tokenizer from the Python standard library,
# pretraining, chat fine-tuning, then evaluation and packaging. Runs on a 2-core CPU in about 30 minutes.
#   scripts/train_bundled.sh [WORK_DIR]        (default build/bundled; resumable: rerun after an interruption)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-build/bundled}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-900}
CHAT_STEPS=${CHAT_STEPS:-300}
mkdir -p "$W"
[ -f "$W/tokenizer.json" ] || python scripts/bundled_data.py "$W"
resume=(); [ -f "$W/base/trainer_state.pt" ] && resume=(--resume)
qwen35 train --config scripts/bundled_config.json --tokenizer "$W" --data $(cat "$W/train_files.txt") \
  --eval-data $(cat "$W/heldout_files.txt") --out "$W/base" --steps "$PRETRAIN_STEPS" --seq-len 256 \
  --batch-size 8 --lr 3e-3 --warmup 50 --bf16 --log-every 25 --save-every 100 --mtp-weight 0.3 "${resume[@]}"
resume=(); [ -f "$W/chat/trainer_state.pt" ] && resume=(--resume)
qwen35 train --init-from "$W/base" --tokenizer "$W" --data "$W/chat.jsonl" --out "$W/chat" \
  --steps "$CHAT_STEPS" --seq-len 512 --batch-size 4 --lr 1e-3 --warmup 20 --bf16 --log-every 25 \
  --save-every 100 --mtp-weight 0.3 "${resume[@]}"
python scripts/bundle_model.py "$W"
