#!/usr/bin/env bash
# One call on a lent GPU machine (H200, no network), under 8 minutes:
#   1. build fastlm._C for sm_90 with the image's own torch/triton (no downloads),
#   2. run the GPU tests (the CPU-only checks, AOT and nvcc, ran on CPU already),
#   3. run the full benchmark suite,
#   4. leave JSON, PNGs, markdown and logs under $OUT (else bench/results/local) and print a summary last.
# Each stage has its own time limit; a failing stage is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
status=()

stamp "environment"
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, transformers, platform, subprocess
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", round(p.total_memory / 2**30), "GiB")
print(subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv"],
                     capture_output=True, text=True).stdout)
PY

stamp "build fastlm._C for sm_90"
export FASTLM_CUDA_ARCHS=${FASTLM_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if timeout 200 python3 -m pip install --no-deps --no-build-isolation --no-index -e . > "$OUT/build.log" 2>&1; then
  status+=("build: ok (pip -e)")
else
  # no pip build backend in the image: build in place; fastlm.kernels is the kernels/ folder
  echo "pip install failed; building in place" >> "$OUT/build.log"
  [ -e fastlm/kernels ] || ln -s ../kernels fastlm/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if timeout 200 python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
    status+=("build: ok (in place)")
  else
    status+=("build: FAILED (see build.log)"); tail -40 "$OUT/build.log"
  fi
fi
python3 -m fastlm info | tee "$OUT/info.txt"

stamp "GPU tests (every kernel, models, generation, optimize)"
tests=(-p no:cacheprovider -q -rs tests --deselect tests/test_aot.py --deselect tests/test_compile_cuda.py)
# pytest-xdist (in the image) spreads the Triton JIT compiles over the CPU cores
if python3 -c "import xdist" 2>/dev/null; then tests+=(-n 8); fi
timeout 130 python3 -m pytest "${tests[@]}" -m "not sweep" > "$OUT/tests.log" 2>&1
rc=$?; status+=("tests: rc=$rc ($(tail -1 "$OUT/tests.log"))"); tail -15 "$OUT/tests.log"

stamp "GPU sweeps (cut at 45 s; Triton JIT compiles dominate)"
timeout 45 python3 -m pytest "${tests[@]}" -m sweep -x > "$OUT/sweeps.log" 2>&1
rc=$?; status+=("sweeps: rc=$rc ($(tail -1 "$OUT/sweeps.log"))")

stamp "benchmark"
timeout 160 python3 -m fastlm bench --out "$OUT" --budget 0.15 > "$OUT/bench.txt" 2>&1
rc=$?; status+=("bench: rc=$rc")
tail -80 "$OUT/bench.txt"

stamp "attention in bf16"
mkdir -p "$OUT/bf16"
timeout 35 python3 -m fastlm bench --only attention --dtype bf16 --no-plots --budget 0.1 --out "$OUT/bf16" \
  > "$OUT/bench-bf16.txt" 2>&1
rc=$?; status+=("bench bf16 attention: rc=$rc")

stamp "done"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
python3 - "$OUT" <<'PY'
import glob, json, sys
files = sorted(glob.glob(f"{sys.argv[1]}/bench-cuda-*.json"))  # the finished run, else the partial one
if files:
    res = json.load(open(files[-1]))
    rows = {}
    for r in res["rows"]:
        rows.setdefault((r["case"], r["label"]), {})[r["provider"]] = r
    print(f"{'case':<14}{'shape':<34}{'fastlm':>12}  best baseline")
    for (case, label), provs in rows.items():
        f = provs.get("fastlm", {})
        base = [(p, r) for p, r in provs.items() if p != "fastlm" and r.get("ms")]
        best = min(base, key=lambda pr: pr[1]["ms"]) if base else None
        fv = f"{f['value']:.1f} {f['unit']}" if f.get("value") else f.get("status", "-")
        bv = f"{best[0]} {best[1]['ms']:.3f} ms (fastlm {best[1]['ms'] / f['ms']:.2f}x)" if best and f.get("ms") else "-"
        print(f"{case:<14}{label:<34}{fv:>12}  {bv}")
PY

# The device tool returns at most 8 files from $OUT: keep the headline files loose and pack the
# rest (PNGs, logs, the bf16 pass) into one archive.
if [ -n "${OUT_PACK-1}" ]; then  # OUT_PACK= (empty) keeps every file loose
  (cd "$OUT" && keep='^(summary\.txt|bench-cuda\.md|bench-cuda-[0-9a-z-]+\.json|tests\.log|env\.txt|all\.tar\.gz)$'
   rest=$(ls -A | grep -Ev "$keep")
   if [ -n "$rest" ]; then tar czf all.tar.gz $rest && rm -rf $rest; fi
   ls -la)
fi
