#!/usr/bin/env bash
# #24's GPU checks in one call of the device tool, on its 'cuda' image (python3 holds torch there):
#   here:   make device-wheels
#   device: run(command="bash benchmarks/device/run.sh", carry=[".wheels-gpu"], timeout_s=600)
# It installs the carried wheels and saesweep (no network there), runs the tests that need a GPU (the batched
# step against the per-member one for every architecture with no host sync; the resident read through
# page-locked staging), then benchmarks/gpu.py (`make bench-gpu`, 3-5 minutes on an H200). Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/saesweep-device}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
python3 -m pip install -q --no-index --no-deps .wheels-gpu/*.whl 2>&1 | tail -3
python3 -m pip install -q --no-index --no-deps --no-build-isolation . 2>&1 | tail -3
python3 -m pip check 2>&1 | grep -v -i "not supported\|no broken" | head -20 > "$OUT/pip-check.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_batched.py \
    tests/test_store.py::test_resident_rows_reach_the_gpu_through_small_page_locked_buffers 2>&1 \
    | tee "$OUT/tests.log" | tail -5
python3 benchmarks/gpu.py 2>&1 | tee "$OUT/gpu.log" | grep -v -i "warn" | tail -25
