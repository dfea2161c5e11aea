#!/usr/bin/env bash
# One prepared device session (about 6 minutes of GPU time after the machine starts): the GPU tests, then
# compiled SFT/PSFT throughput side by side: the vocabulary chunks recomputed in backward (the behaviour
# before keep_logits) vs kept (the default when they fit), at 16 x 1024, then kept at 32 x 1024.
# Each log lands under $OUT. Run from the repository root: bash benchmarks/gpu_session.sh
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > $OUT/env.log 2>&1
cat $OUT/env.log
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py > $OUT/test_gpu.log 2>&1; echo "pytest rc $?" >> $OUT/test_gpu.log
tail -3 $OUT/test_gpu.log
run() {  # run NAME ARGS...: one throughput benchmark, its log in $OUT/throughput_NAME.log
  local name=$1; shift
  timeout 150 python benchmarks/gpu_throughput.py --compile "$@" > $OUT/throughput_$name.log 2>&1
  echo "rc $?" >> $OUT/throughput_$name.log
  echo "== $name"; grep -Ev "^[WI][0-9]{4} |Warn" $OUT/throughput_$name.log | tail -5
}
run 16x1024_recompute --seq-len 1024 --minibatch 16 --keep-logits no
run 16x1024_keep --seq-len 1024 --minibatch 16 --keep-logits auto
run 32x1024_keep --seq-len 1024 --minibatch 32 --keep-logits auto
