#!/usr/bin/env bash
# Set up (first run only) and run `weft simulate`; extra arguments are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0
exec .venv/bin/weft simulate "$@"
