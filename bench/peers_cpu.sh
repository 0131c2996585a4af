#!/usr/bin/env bash
# The CPU table of fastlm against CTranslate2 and transformers, committed under bench/results/:
#   bench/peers_cpu.sh [DATE]      (DATE defaults to today, UTC)
# writes bench/results/cpu-DATE.{md,json,png}. Needs `pip install -e ".[dev,peers]"` and a built
# fastlm._C. About 10 minutes on an idle 2-core machine (twice that when the machine is shared):
# each engine runs in its own process, 2 rounds x 3 calls. Run it on an otherwise idle machine;
# the markdown records the 1-minute load average before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
date=${1:-$(date -u +%Y-%m-%d)}
out=$(mktemp -d)
python -m fastlm bench --suite peers --out "$out" "${@:2}"
cp "$out/bench-cpu.md" "bench/results/cpu-$date.md"
cp "$(ls "$out"/bench-cpu-*.json | head -n 1)" "bench/results/cpu-$date.json"
cp "$out/peers_cpu.png" "bench/results/cpu-$date.png"
rm -rf "$out"
echo "wrote bench/results/cpu-$date.{md,json,png}"
