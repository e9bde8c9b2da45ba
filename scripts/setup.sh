#!/usr/bin/env bash
# Create .venv and install weft with the right PyTorch build. Idempotent; safe to run every time.
#
#  - GPU machine (nvidia-smi works): torch from PyPI, which is a CUDA build.
#  - CPU-only machine: a CPU build, so no multi-gigabyte CUDA packages are pulled. A local CPU wheel
#    (pip find-links) is used when there is one, else PyTorch's CPU index ($WEFT_TORCH_CPU_INDEX).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${WEFT_TORCH_VERSION:-2.13.0}
CPU_INDEX=${WEFT_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing a CUDA build of torch"
    # find-links may hold a CPU wheel; a GPU machine must take the index's CUDA build
    PIP_FIND_LINKS="" "${PIP[@]}" "torch>=2.4"
    .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      || echo "setup: WARNING: torch installed but CUDA is not available; check the driver and the torch build" >&2
  else
    echo "setup: no GPU, installing the CPU build of torch $TORCH_VERSION"
    # A local CPU wheel (pip find-links) first, then its dependencies from the usual index;
    # otherwise PyTorch's CPU index, whose +cpu build pip prefers over PyPI's CUDA build.
    if "${PIP[@]}" --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
      "${PIP[@]}" "torch==$TORCH_VERSION" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    else
      "${PIP[@]}" --retries 2 --timeout 30 "torch==$TORCH_VERSION" --extra-index-url "$CPU_INDEX"
    fi
  fi
fi

if ! .venv/bin/python -c "import federation, flwr, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.weft-installed ]; then
  echo "setup: installing weft and its dependencies into .venv"
  "${PIP[@]}" -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  .venv/bin/python -c "import federation, flwr, torch" # fail loudly if the install did not work
  touch .venv/.weft-installed
fi
.venv/bin/python -c "import torch, flwr; print(f'setup: ready (torch {torch.__version__}, flwr {flwr.__version__}, cuda {torch.cuda.is_available()})')"
