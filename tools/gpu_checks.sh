#!/usr/bin/env bash
# The GPU checks of the engine and pipelines, correctness first, then timings, in one run.
# Usage (on a machine with a CUDA GPU, from the repository root): bash tools/gpu_checks.sh [OUT_DIR]
# Works without DALI and webdataset installed (their tests skip; the torch backend is used).
set -euo pipefail
out="${1:-gpu-checks}"
mkdir -p "$out"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
# (a) captured teacher/student steps equal eager ones; (b) no host sync in the hot loop; metrics on device
python -m pytest -q -m gpu tests/test_gpu.py tests/test_metrics.py 2>&1 | tee "$out/gpu-tests.txt"
# (c) ResNet-50, 224 px, batch 256, synthetic batches on device: phases x graphs on/off vs the eager baseline
python tools/bench.py engine --arch resnet50 --image-size 224 --batch-size 256 --out "$out/engine.json" | tee "$out/engine.txt"
# loader rates including the torch backend's nvJPEG decode
python tools/bench.py loaders --repeats 5 --out "$out/loaders.json" | tee "$out/loaders.txt"
