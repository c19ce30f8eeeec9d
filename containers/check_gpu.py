"""Check, without a GPU, that the GPU image can run ONNX Runtime on CUDA beside torch: the CUDA major
versions of the two builds agree, onnxruntime-gpu offers the CUDA execution provider, and that
provider's libraries resolve to the CUDA libraries the torch wheels installed (a missing or
mismatched library fails here, at build time, instead of on the first GPU node). Exit 1 with the
reason otherwise.

    python containers/check_gpu.py        (the last step of the image's deps-gpu stage)
"""

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime.capi import build_and_package_info as ort_build


def problems() -> list[str]:
    found = []
    torch_cuda = torch.version.cuda
    ort_cuda = getattr(ort_build, "cuda_version", None)
    if not torch_cuda:
        found.append(f"torch {torch.__version__} is not a CUDA build")
    if not ort_cuda:
        found.append(f"onnxruntime {ort.__version__} ({ort_build.package_name}) is not a CUDA build")
    if torch_cuda and ort_cuda and torch_cuda.split(".")[0] != ort_cuda.split(".")[0]:
        found.append(f"CUDA majors differ: torch {torch_cuda}, onnxruntime-gpu {ort_cuda}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        found.append(f"onnxruntime offers no CUDAExecutionProvider ({ort.get_available_providers()})")
    if found:
        return found
    # The provider's libraries must all resolve from the nvidia-* wheels, but for the driver's
    # libcuda.so.1, which the GPU node brings (the NVIDIA container toolkit mounts it).
    site = Path(torch.__file__).parents[1]
    libs = sorted({str(p.parent) for p in (site / "nvidia").glob("*/lib/lib*.so*")})
    provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    ldd = subprocess.run(
        ["ldd", str(provider)], env={"LD_LIBRARY_PATH": ":".join(libs)}, capture_output=True, text=True
    )
    missing = [
        line.split()[0]
        for line in ldd.stdout.splitlines()
        if "not found" in line and not line.split()[0].startswith("libcuda.so")
    ]
    if ldd.returncode != 0 or missing:
        found.append(f"the CUDA execution provider's libraries do not resolve: {missing or ldd.stderr}")
    return found


if __name__ == "__main__":
    if errors := problems():
        print("GPU image check failed:\n  " + "\n  ".join(errors), file=sys.stderr)
        sys.exit(1)
    print(
        f"GPU image check: torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}) and onnxruntime-gpu {ort.__version__} (CUDA "
        f"{ort_build.cuda_version}) agree; the CUDA execution provider's libraries resolve (the driver's "
        "libcuda comes from the node)"
    )
