#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (a GPU session's time is short):
#   1. the runtime's CUDA tests (precision on the GPU; DDP and sync_dist on two gloo ranks sharing the GPU);
#   2. bench_gpu.py: bf16-mixed per-step overhead and throughput vs a hand-written loop and Lightning,
#      with the GPU synchronizations each variant makes, then the same at 32-true.
# Usage: tests/benchmarks/gpu_checks.sh OUT_DIR   (from the repository root; runtime/ and launcher/ importable)
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
$py -m pytest -q -p no:cacheprovider -rs tests/runtime/test_precision.py tests/runtime/test_distributed.py \
    tests/runtime/test_cuda_sync.py -k "cuda or gpu" 2>&1 | tee "$out/pytest.txt" | tail -n 25
$py tests/benchmarks/bench_gpu.py --precision bf16-mixed --steps 600 --rounds 8 --sync-debug \
    --json "$out/bf16.json" 2>&1 | tee "$out/bf16.txt"
$py tests/benchmarks/bench_gpu.py --precision 32-true --steps 80 --rounds 3 \
    --json "$out/fp32.json" 2>&1 | tee "$out/fp32.txt"
