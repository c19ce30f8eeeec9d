#!/usr/bin/env bash
# The GPU measurements of issue 17 in one prepared run (about 6 minutes on one H100/H200); only run
# by hand when a GPU machine is lent, never in CI. Writes its output under $OUT (default
# benchmarks/gpu-results/) and prints it; the numbers go into benchmarks/README.md.
#
#   OUT=/tmp/gpu benchmarks/gpu.sh            # PYTHON=... to choose the interpreter (torch with CUDA)
#
# 1. extraction, model-only vs end-to-end, torch bf16 and ONNX Runtime's CUDA provider:
#    ResNet50@layer3 (CLAM's), EfficientNet-Lite0, and a ViT-L/16 (UNI's architecture, random weights);
# 2. one fine-tuning run of ResNet50@layer3 on 6 bags of 64 tiles: tiles/s per epoch;
# 3. the foundation models (issue 18): tiles/s in bf16 at the batch that fits, mid-block cut vs full;
# 4. the CUDA-path tests (marker `cuda`), which skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
OUT=${OUT:-benchmarks/gpu-results}
mkdir -p "$OUT"
"$PYTHON" - <<'PY' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch: this script is for a GPU machine"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError:
    print("onnxruntime missing")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/device.txt"
timed() { local name=$1; shift; local start=$SECONDS; "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.txt";
          echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"; }
timed extract "$PYTHON" benchmarks/bench_extract.py --device cuda --pieces 12 \
    --encoder resnet50@layer3+random --encoder efficientnet_lite0+random --encoder uni+random
timed finetune "$PYTHON" benchmarks/bench_finetune.py --device cuda --encoder resnet50@layer3+random \
    --k 64 --slides 6 --epochs 3
timed models "$PYTHON" benchmarks/bench_models.py --device cuda --seconds 4
timed cuda-tests "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider
