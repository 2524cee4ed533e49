#!/usr/bin/env bash
# The checks that need a GPU, in one go (under 8 minutes on one GPU): the test suite's
# device tests on CUDA, then the benchmarks' quick modes on CUDA. Run from the
# repository root on a machine with CUDA and the project installed (make install,
# with a CUDA build of torch):  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
status=0
run() { echo "+ $*"; "$@" || status=1; }

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
run "$PYTHON" -m pytest -q --device cuda -k "cuda" -p no:cacheprovider
(cd benchmarks &&
  run "$PYTHON" bench_gradmask.py --quick --device cuda &&
  run "$PYTHON" bench_refine.py --quick --device cuda &&
  run "$PYTHON" bench_mc.py --quick --device cuda) || status=1
run "$PYTHON" benchmarks/accuracy_gradmask_methods.py --quick
exit $status
