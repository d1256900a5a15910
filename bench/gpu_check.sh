#!/usr/bin/env bash
# The GPU checks in one run, for a machine lent for a few minutes: the device tests, then the
# speed benchmark's GPU section and a short streaming-memory run. Results go to $OUT (default
# /tmp/apt_viz_gpu): tests.log, speed-gpu.md, memory-gpu.md. Each step has its own time limit,
# so one slow step cannot starve the others; the whole run stays under about 9 minutes.
#
#     OUT=/tmp/gpu bash bench/gpu_check.sh
#
# It uses the Python that already has a CUDA torch (PYTHON, default python3) with the checkout on
# PYTHONPATH, and needs no network: the speed shapes are synthetic, and the tests that need the
# offline SmolLM2 are not among the device tests. DEVICE=cpu QUICK=1 rehearses the script on CPU
# with small shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/apt_viz_gpu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
fail() { [ "$1" -eq 0 ] || { echo "gpu_check: $2 exited with $1"; status=1; }; }

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name())" \
        || exit 1
fi
if [ "${QUICK:-0}" = 1 ]; then
    tests=(tests/test_solvers.py -k joint_coefficients) speed_args=(--quick --repeats 1)
    memory_args=(--layers 2 --hidden 64 --intermediate 128 --vocab 128 --nsamples 2 --seqlen 16)
else
    # The test files whose tests take the device fixture.
    tests=(tests/test_solvers.py tests/test_runner.py tests/test_faults.py tests/test_sensitivity.py tests/test_streaming.py)
    speed_args=(--repeats 3)
    # Six blocks of the 1.1B shape: enough for steady per-block peaks, in a minute or two.
    memory_args=(--layers 6)
fi

timeout 150 "$PY" -m pytest -q -p no:cacheprovider --device "$DEVICE" "${tests[@]}" 2>&1 | tee "$OUT/tests.log" | tail -n 25
fail "${PIPESTATUS[0]}" tests

timeout 240 "$PY" bench/speed.py --device "$DEVICE" "${speed_args[@]}" --out "$OUT/speed-gpu.md" 2>&1 | tail -n 90
fail "${PIPESTATUS[0]}" bench/speed.py

timeout 120 "$PY" bench/memory.py --device "$DEVICE" "${memory_args[@]}" --out "$OUT/memory-gpu.md" 2>&1 | tail -n 30
fail "${PIPESTATUS[0]}" bench/memory.py

echo "gpu_check: exit status $status"
exit $status
