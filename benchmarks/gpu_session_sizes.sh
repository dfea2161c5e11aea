#!/usr/bin/env bash
# One prepared device session (about 9 minutes after the machine starts): the GPU tests, then
# issue 17's peak memory of a Qwen2.5-0.5B-shaped model (full vs LoRA, SFT vs PSFT), issue 13's
# dress rehearsal of notebook 06 (benchmarks/gsm8k_rehearsal.py) and what the gpu preset costs
# (benchmarks/gpu_preset_probe.py). Each part has its own time limit; each log lands under $OUT.
# Wheels for what the GPU image lacks (datasets, dill, multiprocess) in .whl/.
# Run from the repository root: bash benchmarks/gpu_session_sizes.sh
set -o pipefail
export PYTHONPATH=.:benchmarks HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "${PYTHON:-python}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"${PYTHON:-python}" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)"
} > $OUT/env.log 2>&1
cat $OUT/env.log
quiet() { grep -Ev '^[WI][0-9]{4} |Warn|warn|it/s\]$|s/it\]$'; }
timed() {  # timed SECONDS NAME command...: run, keep the log, record the wall time and status
  local limit=$1 name=$2; shift 2; local t0=$SECONDS
  timeout $limit "$@" 2>&1 | quiet > $OUT/$name.log
  echo "rc ${PIPESTATUS[0]} wall $((SECONDS - t0)) s" >> $OUT/$name.log; tail -4 $OUT/$name.log
}
timed ${TESTS_S:-45} test_gpu "${PYTHON:-python}" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  -k "not compiled and not fused"
timed ${LORA_S:-90} lora_memory_qwen05b "${PYTHON:-python}" benchmarks/lora_memory.py --qwen-0.5b --device cuda
timed ${REHEARSAL_S:-170} gsm8k_rehearsal "${PYTHON:-python}" benchmarks/gsm8k_rehearsal.py --out /tmp/rehearsal
timed ${PROBE_S:-200} gpu_preset_probe "${PYTHON:-python}" benchmarks/gpu_preset_probe.py --cache /tmp/bases \
  --workers 1 4 8
