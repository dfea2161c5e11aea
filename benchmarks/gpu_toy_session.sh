#!/usr/bin/env bash
# The prepared device session for the toy world: the GPU tests, then the gpu preset's base and main
# comparison, in pieces. A device command may run 10 minutes and a window holds about 15, so the
# comparison runs in calls of at most MINUTES (default 7) that resume one another: each call
# pretrains or loads the base, starts runs until its budget is spent (each finished run is saved
# in RESULTS/runs/ as it ends) and copies RESULTS to $OUT; the next call, with RESULTS carried back
# into the working tree, runs only what remains. rc 0: the folder is complete; rc 3: call again.
#   On the device:   OUT=$OUT bash benchmarks/gpu_toy_session.sh  (then again, until rc 0)
#   Smoke, on a CPU: OUT=/tmp/s PRESET=smoke DEVICE=cpu SKIP_GPU_TESTS=1 bash benchmarks/gpu_toy_session.sh
# Logs in $OUT: env.log, test_gpu.log, reproduce.log, timing.log; RESULTS (default
# results/toy_<preset>/, with its base cache in RESULTS/.cache/) is what to commit, with the GPU
# named, once complete.
set -o pipefail  # "rc" below is python's exit status, not tee's
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the folder for the logs and the results}
PRESET=${PRESET:-gpu}
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-results/toy_$PRESET}
MINUTES=${MINUTES:-7}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no GPU (nvidia-smi not found)"
  "${PYTHON:-python}" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'threads', torch.get_num_threads())"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"
if [ -z "${SKIP_GPU_TESTS:-}" ] && [ ! -d "$RESULTS/runs" ]; then  # the first call only
  timeout 120 "${PYTHON:-python}" -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1
  echo "pytest rc $?" >> "$OUT/test_gpu.log"
  tail -3 "$OUT/test_gpu.log"
fi
start=$(date +%s)
# the budget stops new runs; the hard limit leaves the runs in flight two minutes to finish
timeout $(( ${MINUTES%.*} * 60 + 120 )) "${PYTHON:-python}" -m minipsft reproduce \
  --preset "$PRESET" --device "$DEVICE" --out "$RESULTS" --cache "${CACHE:-$RESULTS/.cache}" \
  --max-minutes "$MINUTES" 2>&1 | tr '\r' '\n' | grep -Ev "it/s\]?$|s/it\]?$" >> "$OUT/reproduce.log"
rc=$?
echo "preset $PRESET device $DEVICE: reproduce rc $rc, wall $(( $(date +%s) - start )) s" \
  | tee -a "$OUT/timing.log"
grep -E "runs done|remain" "$OUT/reproduce.log" | tail -3
mkdir -p "$OUT/$(basename "$RESULTS")" && cp -r "$RESULTS"/. "$OUT/$(basename "$RESULTS")"/
[ "$rc" = 3 ] && echo "not complete yet: carry $RESULTS back and run this script again"
exit $rc
