#!/usr/bin/env bash
# The CPU table of fastlm against its peers (CTranslate2, transformers, ONNX Runtime, OpenVINO,
# llama.cpp), committed under bench/results/:
#   bench/peers_cpu.sh [DATE] [--isa avx2] [other `fastlm bench` options]
# writes bench/results/cpu-DATE.{md,json,png}; with --isa avx2, bench/results/cpu-DATE-forced-avx2.*:
# every engine's kernels capped at AVX2 as far as it can be (fastlm and torch: FASTLM_CPU_ISA,
# ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY; CTranslate2: CT2_FORCE_CPU_ISA; OpenVINO f32: oneDNN only;
# ONNX Runtime and llama.cpp cannot be capped), named in the table's header with the CPU's own flags,
# so an AVX-512 CPU's forced table is never read as an AVX2 CPU's. Needs `pip install -e ".[dev,peers]"`
# and a built fastlm._C. About 10 minutes on an idle 2-core machine (twice that when the machine is
# shared): each engine runs in its own process, 2 rounds x 3 calls. Run it on an otherwise idle
# machine; the markdown records the 1-minute load average before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
date=$(date -u +%Y-%m-%d)
if [[ $# -gt 0 && $1 != -* ]]; then date=$1; shift; fi
suffix=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --isa) suffix="-forced-${args[i + 1]:-}" ;;
    --isa=*) suffix="-forced-${args[i]#--isa=}" ;;
  esac
done
out=$(mktemp -d)
python -m fastlm bench --suite peers --out "$out" "$@"
cp "$out/bench-cpu.md" "bench/results/cpu-$date$suffix.md"
cp "$(ls "$out"/bench-cpu-*.json | head -n 1)" "bench/results/cpu-$date$suffix.json"
cp "$out/peers_cpu.png" "bench/results/cpu-$date$suffix.png"
rm -rf "$out"
echo "wrote bench/results/cpu-$date$suffix.{md,json,png}"
