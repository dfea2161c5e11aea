#!/usr/bin/env bash
# One prepared device session (about 8 minutes after the machine starts; issue 16): the GPU tests,
# then SFT/PSFT throughput of a Qwen2.5-0.5B-sized model, eager and compiled x the three output-head
# paths (fused, logits kept, recomputed) x 16 and 32 x 1024 tokens, then minipsft vs TRL's
# SFTTrainer on the same GPU. Each part has its own time limit; each log lands under $OUT.
# Wheels for what the GPU image lacks (trl, datasets, liger-kernel, dill, multiprocess) in .whl/.
# Run from the repository root: bash benchmarks/gpu_session.sh
set -o pipefail  # "rc" below is python's exit status, not tee's
export PYTHONPATH=.:benchmarks HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "${PYTHON:-python}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"${PYTHON:-python}" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
"${PYTHON:-python}" -c "import trl, datasets, liger_kernel; print('trl', trl.__version__, 'datasets', datasets.__version__)"
} > $OUT/env.log 2>&1
cat $OUT/env.log
quiet() { grep -Ev "^[WI][0-9]{4} |Warn|warn"; }
timeout 150 "${PYTHON:-python}" -m pytest -q -p no:cacheprovider tests/test_gpu.py > $OUT/test_gpu.log 2>&1
echo "pytest rc $?" >> $OUT/test_gpu.log; tail -3 $OUT/test_gpu.log
timeout ${THROUGHPUT_S:-300} "${PYTHON:-python}" benchmarks/gpu_throughput.py --matrix --seq-len 1024 --batches 2 \
  2>&1 | quiet | tee $OUT/throughput_matrix.log; echo "rc $?" >> $OUT/throughput_matrix.log
timeout ${TRL_S:-140} "${PYTHON:-python}" benchmarks/vs_trl_gpu.py --seq-len 1024 --minibatch 16 --batches 2 \
  2>&1 | quiet | tee $OUT/vs_trl_gpu.log | tail -8
