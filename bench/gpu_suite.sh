#!/usr/bin/env bash
# The GPU suite on a machine with CUDA: build, every GPU test, every GPU benchmark.
#   bash bench/gpu_suite.sh                 # everything, in one go
#   bash bench/gpu_suite.sh tests pool      # some parts: tests pool elastic allocator hf_generate engine
#   bash bench/gpu_suite.sh engine:long_prompt,bursty_slo   # engine workloads by name (bench/engine.py --only)
#   PYTHON=/opt/torch/.venv/bin/python bash bench/gpu_suite.sh   # a Python with CUDA PyTorch not first on PATH
#   PART_SECONDS=240 bash bench/gpu_suite.sh ...   # stop a part that runs longer and go on with the next
# Parts append to bench/results/gpu_suite_<device>_<date>.txt (beside the benchmarks' own JSON files),
# so a suite split over several shorter runs still ends in one file.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests pool elastic allocator hf_generate engine)
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_' || true)
out="bench/results/gpu_suite_${device:-unknown}_$(date +%Y-%m-%d).txt"
mkdir -p bench/results
{
  echo "# torch_ellm GPU suite on ${device:-unknown GPU}, $(date -u +%Y-%m-%dT%H:%MZ): ${parts[*]}"
  "$py" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  "$py" -m pip install -q --no-build-isolation --no-deps -e . || exit 1
  # enable() builds this shim for its hooks (empty_cache, record_stream, OOM as torch.OutOfMemoryError).
  "$py" -c "from torch_ellm import shim; shim.load(cuda=True); print('shim with CUDA hooks: built')" \
    || echo "shim with CUDA hooks: NOT built (needs a CUDA toolkit: CUDA_HOME); the enable() hook tests will fail"
  status=0
  for part in "${parts[@]}"; do
    echo "## $part"
    limit=()  # timeout only where asked: it puts the part in a process group of its own, out of Ctrl-C's reach
    [ "${PART_SECONDS:-0}" != 0 ] && limit=(timeout "$PART_SECONDS")
    case "$part" in
      tests) "${limit[@]}" "$py" -m pytest -m gpu -v -rs tests ;;
      pool|elastic|allocator|engine) "${limit[@]}" "$py" "bench/$part.py" --device cuda ;;
      # Its full shape set (2,048-token generations, two repeats, four caches) is too long for the suite.
      hf_generate) "${limit[@]}" "$py" bench/hf_generate.py --device cuda --quick ;;
      engine:*) "${limit[@]}" "$py" bench/engine.py --device cuda --only $(tr , " " <<<"${part#engine:}") ;;
      *) echo "unknown part '$part': expected tests, pool, elastic, allocator, hf_generate, engine or engine:NAME,..."
         status=2
         continue ;;
    esac
    rc=$?
    [ $rc = 124 ] && [ ${#limit[@]} -gt 0 ] && echo "part $part stopped after PART_SECONDS=$PART_SECONDS"
    [ $rc = 0 ] || status=1
  done
  echo "# exit status $status"
  exit $status
} 2>&1 | tee -a "$out"
