#!/usr/bin/env bash
# The checks CI cannot run, on a machine with a CUDA GPU: the Triton score kernel compiled for the GPU against
# the torch reference (tests/kernels), training on CUDA (tests/training), and LOOK-M's score memory and time
# at long prompts (`mmrag bench lookm-scores`, dense vs chunked vs Triton).
#
# Needs torch with CUDA, triton, transformers, hypothesis and pytest, and mmrag importable (vLLM, Ray and
# Milvus are not used): on a machine that has the first ones, `pip install --no-deps .` plus pydantic.
#
#   bash scripts/gpu_check.sh OUT_DIR [LENGTHS]
#
# Writes OUT_DIR/gpu-tests.log and OUT_DIR/lookm-scores-cuda.{json,png}; exits non-zero if a test fails.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [LENGTHS]}
lengths=${2:-4096,8192,16384,32768}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  || exit 1
python3 -m mmrag.serving.cli bench lookm-scores --lengths "$lengths" --out "$out/lookm-scores-cuda.json" 2>&1 \
  | tee "$out/lookm-scores.log"
bench=$?
python3 -m pytest -q -p no:cacheprovider tests/kernels \
  "tests/training/test_train_tiny.py::test_trains_on_cuda_and_writes_a_cpu_checkpoint" 2>&1 | tee "$out/gpu-tests.log"
tests=$?
exit $((bench || tests))
