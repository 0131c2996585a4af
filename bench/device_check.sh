#!/usr/bin/env bash
# One call on a lent GPU machine (H200, no network), under 8 minutes in all:
#   1. build fastlm._C for sm_90 with the image's own torch/triton (no downloads),
#   2. run the GPU tests, strict (FASTLM_STRICT=1: any fallback to the reference is an error),
#   3. benchmark the ops, then the models (their torch.compile baselines are the slow part),
#   4. leave JSON, markdown, logs and junit XML under $OUT (else bench/results/local) and print a
#      summary last.
# Every stage gets min(its own limit, what is left of the overall deadline) and is stopped with
# SIGINT first, so pytest still writes its summary and junit XML, and the next stage still runs;
# test results also stream into the logs line by line (-v), so a cut stage keeps what it did.
# Knobs: DEADLINE (seconds for the whole check, default 430), SKIP_BUILD=1 (use the current
# build), PYTHON (default python3), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-430}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
status=()
export FASTLM_STRICT=1

GRACE=20  # seconds between SIGINT and SIGKILL, kept free before the deadline
# limit WANT: seconds this stage may run (its own limit, cut to the deadline; at least 5)
limit() { local left=$(( DEADLINE - GRACE - ($(date +%s) - t0) )); local w=$1; (( w > left )) && w=$left; (( w < 5 )) && w=5; echo $w; }
# run_stage NAME WANT LOG CMD...: SIGINT at the limit (pytest then writes its summary and junit
# XML), SIGKILL GRACE s later
run_stage() {
  local name=$1 want=$2 log=$3; shift 3
  local lim; lim=$(limit "$want")
  stamp "$name (limit ${lim}s)"
  timeout -s INT -k "$GRACE" "$lim" "$@" > "$log" 2>&1
  local rc=$?
  local note=""; [ "$rc" = 124 ] || [ "$rc" = 130 ] || [ "$rc" = 137 ] && note=" (cut at ${lim}s)"
  status+=("$name: rc=$rc$note ($(grep -E 'passed|failed|error' "$log" | tail -1 | tr -s ' ' | cut -c1-150))")
  return $rc
}

stamp "environment"
"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch, triton, transformers, platform, subprocess
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", round(p.total_memory / 2**30), "GiB")
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv"],
                         capture_output=True, text=True).stdout)
except FileNotFoundError:
    print("no nvidia-smi")
PY

if [ "${SKIP_BUILD:-0}" = 1 ]; then
  status+=("build: skipped (SKIP_BUILD=1)")
else
  stamp "build fastlm._C for sm_90"
  export FASTLM_CUDA_ARCHS=${FASTLM_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  if timeout "$(limit 180)" "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . > "$OUT/build.log" 2>&1; then
    status+=("build: ok (pip -e)")
  else
    # no pip build backend in the image: build in place; fastlm.kernels is the kernels/ folder
    echo "pip install failed; building in place" >> "$OUT/build.log"
    [ -e fastlm/kernels ] || ln -s ../kernels fastlm/kernels
    if timeout "$(limit 180)" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
      status+=("build: ok (in place)")
    else
      status+=("build: FAILED (see build.log)"); tail -40 "$OUT/build.log"
    fi
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m fastlm info > "$OUT/info.txt" 2>&1; tail -20 "$OUT/info.txt"

# GPU tests: the CPU-only checks (AOT, nvcc) ran on CPU already. Results three ways: junit XML
# (written when pytest ends, SIGINT included), a JSON line per test as it finishes
# (results-*.jsonl, survives SIGKILL), and a line per test in the log (-v).
tests=(-p no:cacheprovider -v -rfEs --tb=short tests --deselect tests/test_aot.py --deselect tests/test_compile_cuda.py)
# pytest-xdist (in the image) spreads the Triton JIT compiles over the CPU cores
if "$PY" -c "import xdist" 2>/dev/null && [ "$(nproc)" -ge 8 ]; then tests+=(-n 8); fi
FASTLM_RESULTS_JSONL="$OUT/results-tests.jsonl" run_stage "tests" 120 "$OUT/tests.log" \
  "$PY" -m pytest "${tests[@]}" -m "not sweep" --junitxml="$OUT/junit-tests.xml"
tail -15 "$OUT/tests.log"
FASTLM_RESULTS_JSONL="$OUT/results-sweeps.jsonl" run_stage "sweeps" 30 "$OUT/sweeps.log" \
  "$PY" -m pytest "${tests[@]}" -m sweep -x --junitxml="$OUT/junit-sweeps.xml"

# ops first: the torch.compile baselines of the model suite take the longest and come last
run_stage "bench ops" 75 "$OUT/bench-ops.txt" "$PY" -m fastlm bench --suite ops --out "$OUT" --budget 0.15
[ -f "$OUT/bench-cuda.md" ] && mv "$OUT/bench-cuda.md" "$OUT/bench-cuda-ops.md"
tail -40 "$OUT/bench-ops.txt"
run_stage "bench models" 90 "$OUT/bench-models.txt" "$PY" -m fastlm bench --suite models --out "$OUT" --budget 0.15
[ -f "$OUT/bench-cuda.md" ] && mv "$OUT/bench-cuda.md" "$OUT/bench-cuda-models.md"
tail -30 "$OUT/bench-models.txt"

stamp "done"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
"$PY" - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import glob, json, sys
import xml.etree.ElementTree as ET
import collections
for f in sorted(glob.glob(f"{sys.argv[1]}/junit-*.xml")):  # written when pytest ended (SIGINT too)
    s = ET.parse(f).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    print(f.split("/")[-1], {k: s.get(k) for k in ("tests", "failures", "errors", "skipped", "time")})
for f in sorted(glob.glob(f"{sys.argv[1]}/results-*.jsonl")):  # streamed: survives a killed stage
    recs = [json.loads(line) for line in open(f) if line.strip()]
    print(f.split("/")[-1], dict(collections.Counter(r["outcome"] for r in recs)))
    for r in recs:
        if r["outcome"] == "failed":
            print("  FAILED", r["test"], r["when"])
for f in sorted(glob.glob(f"{sys.argv[1]}/bench-*.json")):  # finished runs, else the partial ones
    res = json.load(open(f))
    rows = {}
    for r in res["rows"]:
        rows.setdefault((r["case"], r["label"]), {})[r["provider"]] = r
    print(f"{f.split('/')[-1]}\n{'case':<14}{'shape':<34}{'fastlm':>12}  best baseline")
    for (case, label), provs in rows.items():
        fr = provs.get("fastlm", {})
        base = [(p, r) for p, r in provs.items() if p != "fastlm" and r.get("ms")]
        best = min(base, key=lambda pr: pr[1]["ms"]) if base else None
        fv = f"{fr['value']:.1f} {fr['unit']}" if fr.get("value") else fr.get("status", "-")
        bv = f"{best[0]} {best[1]['ms']:.3f} ms (fastlm {best[1]['ms'] / fr['ms']:.2f}x)" if best and fr.get("ms") else "-"
        print(f"{case:<14}{label:<34}{fv:>12}  {bv}")
PY
stamp "total"

# The device tool returns few files from $OUT: keep the headline files loose and pack the rest
# (PNGs, logs) into one archive.
if [ -n "${OUT_PACK-1}" ]; then  # OUT_PACK= (empty) keeps every file loose
  (cd "$OUT" && keep='^(summary\.txt|bench-cuda-(ops|models)\.md|bench-cuda-[0-9a-z-]+\.json|tests\.log|results-tests\.jsonl|env\.txt|all\.tar\.gz)$'
   rest=$(ls -A | grep -Ev "$keep")
   if [ -n "$rest" ]; then tar czf all.tar.gz $rest && rm -rf $rest; fi
   ls -la)
fi
