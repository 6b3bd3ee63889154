#!/usr/bin/env bash
# Issue 20's GPU measurements as one prepared run for a lent GPU machine (device `run`); the parts' time limits add
# up to 510 s, within one device call:
#   1. tests/test_gpu_packing.py: varlen, FlexAttention and (where installed) Liger against row-by-row sdpa;
#   2. bench/finetune_gpu.py on the Qwen2.5-7B shape: transformers.Trainer, TRL padding-free and emgate with each
#      attention (auto = varlen on the GPU, rows), with Liger's fused cross-entropy when liger-kernel imports,
#      and a torch.profiler trace of emgate's first run (the per-micro-batch host work); then emgate with flex alone;
#   3. the 32B shape, emgate only, gradient checkpointing on and packs of 2048 tokens, as paper.yaml trains it (its
#      bf16 weights alone are 61 GiB; README: the paper-scale memory plan).
# Results (JSON, logs, the trace) go to $OUT (default bench/out); each run's line is logged as it ends, and each
# benchmark has a time limit (transformers compiles FlexAttention per new pack length, which may run long), so a
# slow part still leaves the others' numbers. --dry-run: the same steps on a CPU with the tiny shape.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=components${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if [ "${1:-}" = "--dry-run" ]; then
  device=(--device cpu) shape7=tiny shape32=tiny steps=(--warmup 1 --steps 2) attention=auto,rows,varlen
else
  device=() shape7=7b shape32=32b steps=(--warmup 2 --steps 8) attention=auto,rows
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
fused=()
"$PY" -c "import liger_kernel" 2>/dev/null && [ "${1:-}" != "--dry-run" ] && fused=(--fused-cross-entropy)
"$PY" -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)" | tee "$OUT/versions.txt" || exit 2
rc=0
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_packing.py 2>&1 | tee "$OUT/test_gpu_packing.log"
tested=${PIPESTATUS[0]}
# 5: the module skipped itself (no CUDA GPU), which only a dry run expects
[ "$tested" -eq 0 ] || { [ "$tested" -eq 5 ] && [ "${1:-}" = "--dry-run" ]; } || rc=1
timeout 230 "$PY" bench/finetune_gpu.py "${device[@]}" --shape "$shape7" "${steps[@]}" --attention "$attention" "${fused[@]}" \
  --profile "$OUT/profile" --out "$OUT/finetune_$shape7.json" 2>&1 | tee "$OUT/finetune_$shape7.log" || rc=1
# FlexAttention on its own: transformers compiles it per new pack length (max-autotune), which may not finish in time
[ "${1:-}" = "--dry-run" ] || timeout 80 "$PY" bench/finetune_gpu.py --shape 7b "${steps[@]}" --baselines '' \
  --attention flex --out "$OUT/finetune_7b_flex.json" 2>&1 | tee "$OUT/finetune_7b_flex.log" || rc=1
timeout 110 "$PY" bench/finetune_gpu.py "${device[@]}" --shape "$shape32" "${steps[@]}" --baselines '' --attention auto \
  --gradient-checkpointing --pack-length 2048 --out "$OUT/finetune_${shape32}_checkpointed.json" 2>&1 \
  | tee "$OUT/finetune_${shape32}_checkpointed.log" || rc=1
exit $rc
