#!/usr/bin/env bash
# The prepared device session for the toy world: the GPU tests, then the gpu preset's base and main
# comparison, in pieces. A device command may run 10 minutes and a window holds about 15, so the
# comparison runs in calls of about MINUTES (default 8) that resume one another: each call
# pretrains or loads the base, starts runs until its budget is spent (each finished run is saved
# in RESULTS/runs/ as it ends) and packs RESULTS into $OUT/<name>.tar.gz; the next call, with
# RESULTS unpacked and carried back into the working tree, runs only what remains (the base is
# pretrained again unless the device is still warm). rc 0: complete; rc 3: call again.
#   On the device:   OUT=$OUT bash benchmarks/gpu_toy_session.sh  (then again, until rc 0)
#   Smoke, on a CPU: OUT=/tmp/s PRESET=smoke DEVICE=cpu SKIP_GPU_TESTS=1 bash benchmarks/gpu_toy_session.sh
# In $OUT: env.log, test_gpu.log, reproduce.log, timing.log and RESULTS packed (default
# results/toy_<preset>/), what to commit, with the GPU named, once complete.
set -o pipefail  # "rc" below is python's exit status, not tee's
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the folder for the logs and the results}
PRESET=${PRESET:-gpu}
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-results/toy_$PRESET}
MINUTES=${MINUTES:-8}  # the whole call, GPU tests included
CACHE=${CACHE:-/tmp/minipsft_session_cache}  # kept while the device stays warm
script_start=$(date +%s)
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
# the budget counts from the script's start; the hard limit leaves the runs in flight 90 s more
left=$(( ${MINUTES%.*} * 60 - ($(date +%s) - script_start) ))
left=$(( left > 0 ? left : 0 ))
start=$(date +%s)
timeout "${HARD_S:-$(( left + 90 ))}" "${PYTHON:-python}" -m minipsft reproduce \
  --preset "$PRESET" --device "$DEVICE" --out "$RESULTS" --cache "$CACHE" \
  --max-minutes "$(( left / 60 )).$(( left % 60 * 10 / 60 ))" 2>&1 | tr '\r' '\n' \
  | grep -Ev "it/s\]?$|s/it\]?$" >> "$OUT/reproduce.log"
rc=$?
[ "$rc" = 124 ] && rc=3  # stopped by the hard limit: the runs saved so far are kept
echo "preset $PRESET device $DEVICE: reproduce rc $rc, wall $(( $(date +%s) - start )) s" \
  | tee -a "$OUT/timing.log"
grep -E "runs done|remain" "$OUT/reproduce.log" | tail -3
# one file back (the device returns a few files): the results folder with its saved runs
tar -czf "$OUT/$(basename "$RESULTS").tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
[ "$rc" = 3 ] && echo "not complete yet: unpack $(basename "$RESULTS").tar.gz into" \
  "$(dirname "$RESULTS")/, carry it back and run this script again"
exit $rc
