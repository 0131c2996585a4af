#!/usr/bin/env bash
# int8_dynamic speed before / after issue 23.3, engines alternating, each in its own process.
#   bench/int8dyn_speed.sh BEFORE_REPO [MODEL] [ROUNDS]
# BEFORE_REPO: a checkout (with its fastlm/_C*.so) of the code before the change, e.g. /work/main.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
before="$1"; model="${2:-minilm}"; rounds="${3:-3}"
py="${PYTHON:-python}"
for r in $(seq "$rounds"); do
  PYTHONPATH="$before" "$py" "$here/bench/int8dyn_speed.py" --model "$model" --label "r$r before int8_dynamic"
  PYTHONPATH="$here" "$py" "$here/bench/int8dyn_speed.py" --model "$model" --label "r$r after int8_dynamic (auto)"
  PYTHONPATH="$here" "$py" "$here/bench/int8dyn_speed.py" --model "$model" --outliers max \
    --label "r$r after int8_dynamic (max outliers)"
  PYTHONPATH="$here" "$py" "$here/bench/int8dyn_speed.py" --model "$model" --mode fp32 --label "r$r fp32"
done
