#!/usr/bin/env bash
# .wheels-gpu/: the wheels benchmarks/device/run.sh installs on the device tool's GPU machine, which reaches no
# package registry. Run here (`make device-wheels`), then carry the folder: cp312 manylinux wheels of
# benchmarks/device/requirements.txt, and the three it has only as sdists built into pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
list=benchmarks/device/requirements.txt
rm -rf .wheels-gpu && mkdir .wheels-gpu
binary=$(mktemp) && built=$(mktemp) && trap 'rm -f "$binary" "$built"' EXIT
grep -v -e '^#' -e 'sdist only' "$list" > "$binary"
grep 'sdist only' "$list" | sed 's/ *#.*//' > "$built"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .wheels-gpu -r "$binary"
"$PYTHON" -m pip wheel -q --no-deps -w .wheels-gpu -r "$built"
echo ".wheels-gpu: $(ls .wheels-gpu | wc -l) wheels, $(du -sh .wheels-gpu | cut -f1)"
