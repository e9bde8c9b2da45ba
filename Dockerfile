# One image for every role: SuperLink, the coordinator's `flwr run` service, and each partner's
# SuperNode (docker-compose.yml). It holds weft and Flower, never a key: keys are made by the operator
# and each partner beforehand and mounted read-only at run time (docs/DEPLOY.md).
#
#   docker build -t weft:dev .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# CPU build of PyTorch first, so `pip install .` below finds torch satisfied and pulls no CUDA wheels.
# For a GPU partner, build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 (or similar).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" torch

# Only the packages: no .venv, runs/, keys or tests end up in the image.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocols ./protocols
COPY node ./node
COPY coordinator ./coordinator
COPY federation ./federation
RUN pip install . && rm -rf /src

# The operator's config-only Flower App (the FAB `flwr run` sends holds no code; every role imports
# federation.apps from this image).
RUN python -m federation.apps /opt/weft-app

WORKDIR /
