#!/usr/bin/env bash
# The whole pipeline on CPU, end to end (make quickstart runs this). Data: `--data DIR`, else
# $VPMOE_DATA, else ../shared/data beside the checkout, else the small default shipped in the package
# (megatron_vpmoe/data/default: Shakespeare, 300 GSM8K problems, a few multiple-choice sets), so a
# clone anywhere runs it. The teacher's o200k ranks: $TIKTOKEN_ENCODINGS_BASE, ../shared/tokenizers,
# else tiktoken's cache or download.
#   1. tokenizers: a BPE 8k and a Length-MAX 8k student tokenizer, compared (tokens/char, params)
#   2. preprocess: Shakespeare + Gutenberg text into Megatron shards, one set per tokenizer
#   3. pretrain: a tiny VPMoE with 2 processes (torchrun) on the BPE shards
#   4. distill phase 1: a toy Harmony teacher served over HTTP writes GSM8K answers; they become
#      chat shards with assistant-only loss masks, blended with the text corpus; the student trains
#   5. distill phase 2: on-policy GRPO steps scored by the teacher
#   6. convert the student to Hugging Face format and evaluate it (bits per byte, COPA, PIQA)
# Every step is resumable: re-running skips what is finished. QUICKSTART_SCALE=small shrinks the
# step counts (what the test suite runs). Outputs: runs/quickstart/.
#   usage: examples/quickstart.sh [--data DIR]
set -euo pipefail
DATA_ARG=()
case "${1:-}" in
  --data) [ $# -eq 2 ] || { echo "usage: $0 [--data DIR]" >&2; exit 2; }; DATA_ARG=(--data "$(cd "$2" 2>/dev/null && pwd || echo "$2")");;
  "") ;;
  *) echo "usage: $0 [--data DIR]" >&2; exit 2;;
esac
cd "$(dirname "$0")/.."
VPMOE=${VPMOE:-.venv/bin/vpmoe}
PY=${PY:-.venv/bin/python}
QS=${QS:-runs/quickstart}
DATA=$($PY -m megatron_vpmoe.utils.paths "${DATA_ARG[@]}")   # the one data lookup (utils/paths.py)
export VPMOE_DATA=$DATA   # every command below reads the same folder
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CORPORA=("$DATA/corpora/tinyshakespeare.txt")
[ -d "$DATA/corpora/gutenberg_en" ] && CORPORA+=("$DATA/corpora/gutenberg_en/*.txt")
if [ "${QUICKSTART_SCALE:-full}" = small ]; then
  PRETRAIN_STEPS=20; KD_LIMIT=8; PHASE1_STEPS=10; ONPOLICY_STEPS=2; EVAL_LIMIT=10; TOK_BYTES=300000
else
  PRETRAIN_STEPS=300; KD_LIMIT=64; PHASE1_STEPS=60; ONPOLICY_STEPS=6; EVAL_LIMIT=100; TOK_BYTES=3000000
fi
step() { printf '\n== %s\n' "$*"; }
mkdir -p "$QS"
printf 'data: %s\n' "$DATA"

step "1. tokenizers"
for spec in "bpe bpe-8k" "lengthmax lengthmax-8k"; do
  set -- $spec
  [ -d "$QS/tokenizers/$2" ] || $VPMOE tokenizer train --kind "$1" --vocab-size 8192 \
      --input "${CORPORA[@]}" \
      --max-bytes "$TOK_BYTES" --output "$QS/tokenizers/$2"
done
[ -f "$QS/tokenizer-report/report.json" ] || $VPMOE tokenizer eval \
    --tokenizers "$QS/tokenizers/bpe-8k" "$QS/tokenizers/lengthmax-8k" \
    --input "$DATA/eval/mc/lambada_openai.jsonl:context" --max-bytes 200000 --hidden-size 128 \
    --report "$QS/tokenizer-report"   # held-out English text (tokenizers are compared, never trained, on it)

step "2. preprocess (one pass, both tokenizers)"
$VPMOE preprocess --input "${CORPORA[@]}" \
    --txt-blocks --output-prefix "$QS/shards/corpus" \
    --tokenizer "$QS/tokenizers/bpe-8k" "$QS/tokenizers/lengthmax-8k" --workers 2

step "3. pretrain a tiny VPMoE on 2 processes"
TINY_DATA=(--set "data.tokenizer=$QS/tokenizers/bpe-8k" --set "data.blend=[[1.0, $QS/shards/corpus.bpe-8k_text_document]]")
$VPMOE launch local --nproc 2 --config examples/configs/tiny-cpu.yaml "${TINY_DATA[@]}" \
    --set "run.dir=$QS/pretrain" --set "train.steps=$PRETRAIN_STEPS" --set log.progress_bar=false \
    --set "train.eval_interval=$PRETRAIN_STEPS" --set "checkpoint.interval=$PRETRAIN_STEPS"

step "4. distillation phase 1: teacher text -> chat shards -> student"
[ -d "$QS/teacher" ] || $VPMOE distill toy-teacher --out "$QS/teacher"
PORT=${QUICKSTART_PORT:-18231}
$VPMOE serve "$QS/teacher" --port "$PORT" > "$QS/teacher-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { cat "$QS/teacher-server.log"; exit 1; }
  sleep 0.5
done
$VPMOE distill generate --teacher "http://127.0.0.1:$PORT" --prompts "$DATA/kd/gsm8k_train.jsonl" \
    --limit "$KD_LIMIT" --samples 2 --temperature 0.8 --max-tokens 256 --seed 1 --concurrency 8 \
    --out "$QS/kd/gen" --no-progress
$VPMOE distill build-corpus --generated "$QS/kd/gen" --out "$QS/kd/corpus" --tokenizer "$QS/tokenizers/bpe-8k" \
    --mid-training "0.3:$QS/shards/corpus.{variant}_text_document" --distill-weight 0.7
# starts from the pretrained weights (a fresh optimizer); skipped once it has finished
[ -f "$QS/phase1/checkpoints/latest" ] || $VPMOE train --config examples/configs/distill-phase1.yaml \
    --set "run.dir=$QS/phase1" --set "data.tokenizer=$QS/tokenizers/bpe-8k" \
    --set "data.blend=[[0.7, $QS/kd/corpus/kd.bpe-8k_messages_document], [0.3, $QS/shards/corpus.bpe-8k_text_document]]" \
    --set "data.split=100,0,0" --set "train.steps=$PHASE1_STEPS" --set train.eval_interval=0 \
    --set "checkpoint.load=$QS/pretrain/checkpoints" --set checkpoint.load_optimizer=false \
    --set log.progress_bar=false

step "5. distillation phase 2: on-policy, teacher-scored"
# a few fixed prompts, revisited every pass (2 steps), so the first and last passes score the same
# prompts: the printed change is the policy's, not the prompts' (a different prompt every step swung
# the first-vs-last score by more than 6 steps move it)
# The student starts from phase 1 with a fresh AdamW, whose first update moves every weight by about
# the full learning rate: at 3e-4 that step alone put the policy 118 nats of KL from the reference and
# the teacher's score fell; a 2-step warm-up to 1e-4 keeps the first updates small.
head -n 4 "$DATA/kd/gsm8k_train.jsonl" > "$QS/onpolicy-prompts.jsonl"
$VPMOE distill onpolicy --config examples/configs/distill-onpolicy.yaml \
    --set "run.dir=$QS/onpolicy" --set "data.tokenizer=$QS/tokenizers/bpe-8k" \
    --set "checkpoint.load=$QS/phase1/checkpoints" --set "distill.onpolicy.reference=$QS/phase1/checkpoints" \
    --set "distill.teacher_url=http://127.0.0.1:$PORT" --set "train.steps=$ONPOLICY_STEPS" \
    --set "distill.onpolicy.teacher_tokenizer=$QS/teacher" \
    --set "distill.onpolicy.prompts=[$QS/onpolicy-prompts.jsonl]" \
    --set distill.onpolicy.max_new_tokens=48 --set distill.onpolicy.prompts_per_step=2 \
    --set distill.onpolicy.samples_per_prompt=2 --set log.progress_bar=false \
    --set train.schedule.warmup_steps=2 --set train.optimizer.lr=0.0001 --set train.optimizer.min_lr=0.0001
kill $SERVER 2>/dev/null || true

step "6. convert to Hugging Face and evaluate"
[ -f "$QS/hf/config.json" ] || $VPMOE convert to-hf "$QS/onpolicy/checkpoints" "$QS/hf" \
    --tokenizer "$QS/tokenizers/bpe-8k"
$VPMOE eval "$QS/hf" --tasks bpb,copa,piqa --limit "$EVAL_LIMIT" --out "$QS/eval"
printf '\nquickstart done: %s (tokenizer report: %s/tokenizer-report, eval: %s/eval/results.md)\n' "$QS" "$QS" "$QS"
