#!/usr/bin/env bash
# The prepared GPU check, run on a lent CUDA machine from the repository root (under 8 minutes on an H200):
#   1. every Triton kernel case (tests/kernels/test_kernels_triton_cases.py, long ones too) compiled on the GPU
#      against the PyTorch references;
#   2. training steps with the planner's prediction beside them (benchmarks/device_step.py), before/after in
#      one call: bf16 weights over the fp32 master (bf16) against the old autocast path (bf16-autocast,
#      train.master_weights=false): the medium config (also bf16 with the reference ops, fp32; then
#      micro-batch 16), and an 8-layer slice of vpmoe-6b.yaml at its real widths (hidden 1024, 256
#      experts, vocab 201,088, seq 4096);
#   3. torch.profiler tables of two bf16 steps of each (log.profile_steps);
#   4. kernel timings, Triton vs reference vs naive PyTorch in bf16 (benchmarks/kernels.py --merge), only when
#      VPMOE_KERNEL_TIMINGS=1 (recorded in benchmarks/results/kernels.md; it keeps the check under 8 minutes).
# Each part has its own time limit and the next runs whatever the last did; results go to $OUT
# (default /tmp/vpmoe-device-check) under the names benchmarks/results/ uses. Wheels the GPU image
# lacks (megatron-core, zstandard) travel in .whl/ (docs/kernels.md) and are installed to /tmp/site.
set -u
OUT=${OUT:-/tmp/vpmoe-device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
step() { echo "== $(date +%T) $*"; }
SLICE=(--config examples/configs/vpmoe-6b.yaml --set model.num_layers=8 --set parallel.expert=1 --set parallel.pipeline=1
       --set checkpoint.async_save=false --set log.tensorboard=false --set train.schedule.warmup_steps=1 --set data.tokenizer=null)

step "host"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

step "1/4 Triton kernels vs references on CUDA"
VPMOE_KERNEL_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
  -m "long or not long" --timeout 150 -rfE --durations 10 tests/kernels/test_kernels_triton_cases.py > "$OUT/kernels_cuda.log" 2>&1
echo "rc=$?"; tail -n 3 "$OUT/kernels_cuda.log"

step "2/4 training steps"
timeout 180 python3 benchmarks/device_step.py --variants bf16,bf16-autocast,bf16-reference,fp32 --timeout 60 --out "$OUT" \
  2>&1 | grep -A12 '^| variant'
timeout 210 python3 benchmarks/device_step.py "${SLICE[@]}" --name device_step_6b_slice --steps 8 --seq 4096 --gbs 8 --mbs 2 \
  --variants bf16,bf16-autocast,bf16-reference --timeout 80 --out "$OUT" 2>&1 | grep -A12 '^| variant'
timeout 60 python3 benchmarks/device_step.py --name device_step_mb16 --gbs 32 --mbs 16 --steps 8 --variants bf16 \
  --timeout 55 --out "$OUT" 2>&1 | grep -A6 '^| variant'

step "3/4 profiles"
COMMON=(--set data.mock=true --set train.eval_interval=0 --set checkpoint.interval=0 --set log.progress_bar=false
        --set train.precision=bf16)
timeout 80 python3 -m megatron_vpmoe.cli train --config examples/configs/medium-cpu.yaml "${COMMON[@]}" --set run.dir=/tmp/prof-m \
  --set data.seq_length=2048 --set train.steps=6 --set train.global_batch_size=16 --set train.micro_batch_size=4 \
  --set "log.profile_steps=[5,6]" 2>&1 | tail -n 1
cp /tmp/prof-m/profile/rank_0.txt "$OUT/profile_medium_bf16_cuda.txt"
timeout 120 python3 -m megatron_vpmoe.cli train "${SLICE[@]}" "${COMMON[@]}" --set run.dir=/tmp/prof-s --set data.seq_length=4096 \
  --set train.steps=5 --set train.global_batch_size=8 --set train.micro_batch_size=2 --set "log.profile_steps=[4,5]" 2>&1 | tail -n 1
cp /tmp/prof-s/profile/rank_0.txt "$OUT/profile_6b_slice_bf16_cuda.txt"

if [ "${VPMOE_KERNEL_TIMINGS:-0}" = 1 ]; then
  step "4/4 kernel timings"
  cp benchmarks/results/kernels.json "$OUT/"
  timeout 90 python3 benchmarks/kernels.py --devices cuda --merge --repeats 20 --skip-memory --out "$OUT" 2>&1 | grep -A10 '^## cuda'
fi
step "done"
