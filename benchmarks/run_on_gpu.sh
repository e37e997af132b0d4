#!/usr/bin/env bash
# On the GPU machine, after FA4 is staged (/tmp/fa4-env.sh sourced):
# install the package, run the GPU tests, then the benchmark. Results go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip install -e . failed"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
FA4_GPU_RESULTS=$OUT/gpu_results.jsonl python3 -m pytest -q -x tests/test_gpu.py "${@:2}" 2>&1 | tee $OUT/gpu_tests.log | tail -25
[ "${1:-tests+bench}" = "tests" ] && exit 0
python3 benchmarks/bench_attention.py --out $OUT/bench ${BENCH_ARGS:-} 2>&1 | tee $OUT/bench.log | grep -v "^{" 
