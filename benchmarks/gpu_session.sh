#!/usr/bin/env bash
# One prepared device session: GPU tests, then eager vs compiled throughput side by side (16 x 1024),
# each log under $OUT. Run from the repository root: bash benchmarks/gpu_session.sh
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > $OUT/env.log 2>&1
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py > $OUT/test_gpu.log 2>&1; echo "pytest rc $?" >> $OUT/test_gpu.log
tail -3 $OUT/test_gpu.log
timeout 120 python benchmarks/gpu_throughput.py --seq-len 1024 --minibatch 16 > $OUT/throughput_eager.log 2>&1; echo "rc $?" >> $OUT/throughput_eager.log
grep -v Warn $OUT/throughput_eager.log
timeout 270 python benchmarks/gpu_throughput.py --seq-len 1024 --minibatch 16 --compile > $OUT/throughput_compiled.log 2>&1; echo "rc $?" >> $OUT/throughput_compiled.log
grep -v "W1126\|Warn" $OUT/throughput_compiled.log | tail -6
