#!/usr/bin/env bash
# The GPU suite, in one go on a machine with CUDA: build, every GPU test, every GPU benchmark.
# Writes bench/results/gpu_suite_<device>_<date>.txt beside the benchmarks' own JSON files.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_' || true)
out="bench/results/gpu_suite_${device:-unknown}_$(date +%Y-%m-%d).txt"
mkdir -p bench/results
{
  echo "# torch_ellm GPU suite on ${device:-unknown GPU}, $(date -u +%Y-%m-%dT%H:%MZ)"
  python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  python -m pip install -q --no-build-isolation --no-deps -e . || exit 1
  status=0
  python -m pytest -m gpu -v -rs tests || status=1
  for bench in pool elastic allocator hf_generate engine; do
    echo "## bench/$bench.py"
    python "bench/$bench.py" --device cuda || status=1
  done
  echo "# suite exit status $status"
  exit $status
} 2>&1 | tee "$out"
