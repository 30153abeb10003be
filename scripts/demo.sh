#!/usr/bin/env bash
# Set up (idempotent), then run hsae's main job on the embedded default into runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec hsae demo --out "${1:-runs/demo}"
