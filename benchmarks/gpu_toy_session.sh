#!/usr/bin/env bash
# The prepared device session of issue 13: the GPU tests, then the gpu preset's base pretraining and
# main comparison (what notebooks 03 + 04 run on one GPU), timed, into $OUT: env.log, test_gpu.log,
# reproduce.log, timing.log and the results folder toy_<preset>/ (results.json, report.md,
# histories/, figures) to commit as results/toy_gpu/ with the device name.
#   On the device:   OUT=$OUT bash benchmarks/gpu_toy_session.sh
#   Smoke, on a CPU: OUT=/tmp/s PRESET=smoke DEVICE=cpu SKIP_GPU_TESTS=1 bash benchmarks/gpu_toy_session.sh
# REPRODUCE_S bounds the comparison (default 450 s: with the tests and the machine's start, the
# session stays within the 9 minutes the issue allows).
set -o pipefail  # "rc" below is python's exit status, not tee's
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the folder for the logs and the results}
PRESET=${PRESET:-gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no GPU (nvidia-smi not found)"
  "${PYTHON:-python}" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'threads', torch.get_num_threads())"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  timeout 120 "${PYTHON:-python}" -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1
  echo "pytest rc $?" >> "$OUT/test_gpu.log"
  tail -3 "$OUT/test_gpu.log"
fi
start=$(date +%s)
timeout "${REPRODUCE_S:-450}" "${PYTHON:-python}" -m minipsft reproduce --preset "$PRESET" --device "$DEVICE" \
  --out "$OUT/toy_$PRESET" --cache "${CACHE:-/tmp/minipsft_session_cache}" 2>&1 \
  | tr '\r' '\n' | grep -Ev "it/s\]?$|s/it\]?$" > "$OUT/reproduce.log"
rc=$?
echo "preset $PRESET device $DEVICE: reproduce rc $rc, wall $(( $(date +%s) - start )) s" \
  | tee -a "$OUT/timing.log"
tail -2 "$OUT/reproduce.log"
exit $rc
