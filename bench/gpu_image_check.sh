#!/usr/bin/env bash
# The GPU image's stack, rebuilt on a CPU machine (no GPU needed; not in CI, ~10 min the first
# time: the CUDA torch wheel and its nvidia-* wheels are a few GB; later runs reuse the venv):
#   1. a venv like the GPU image: torch==2.11.0 (the CUDA 13 build, pulls triton 3.6), numpy<2.4
#      (triton 3.6's interpreter breaks on numpy >= 2.4);
#   2. build fastlm._C for sm_90 against it, with CUDA_HOME set to the real toolkit (the `nvcc`
#      on PATH may be a wrapper script, and torch then guesses the wrong root), in a copy of the
#      tree (the checkout's own CPU-built fastlm/_C*.so stays as it is);
#   3. import it, check that the fastlm ops have CUDA kernels registered (dispatch keys);
#   4. run the ahead-of-time check (tests/test_aot.py: every Triton configuration compiles with
#      triton 3.6 for sm_80/86/89/90, no spills, shared memory within each arch's limit).
# Run it before you stop whenever csrc/, kernels/ or setup.py changed, and quote the last line.
#   bench/gpu_image_check.sh [--venv-only]
# Knobs: GPU_IMAGE_VENV (default /tmp/fastlm-gpu-image-venv), CUDA_HOME, MAX_JOBS (default 2).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${GPU_IMAGE_VENV:-/tmp/fastlm-gpu-image-venv}
WORK=${GPU_IMAGE_WORK:-/tmp/fastlm-gpu-image-src}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
fail() { stamp "FAILED: $*"; echo "gpu_image_check: FAILED ($*)"; exit 1; }

if [ -z "${CUDA_HOME:-}" ]; then  # the real toolkit, not the wrapper on PATH
  for d in /usr/local/cuda-13.0 /usr/local/cuda /opt/cuda; do
    if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then CUDA_HOME=$d; break; fi
  done
fi
[ -n "${CUDA_HOME:-}" ] || fail "no CUDA toolkit found: set CUDA_HOME"
export CUDA_HOME

stamp "venv $VENV (torch==2.11.0 CUDA build, triton 3.6, numpy<2.4)"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV" || fail "venv"; fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, triton, numpy; assert torch.__version__.startswith('2.11.0') and torch.version.cuda" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.11.0" "numpy<2.4" setuptools wheel ninja pybind11 pytest safetensors \
    transformers rich matplotlib || fail "pip install"
fi
"$PY" - <<'PY' || fail "versions"
import numpy, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "numpy", numpy.__version__)
assert torch.version.cuda, "torch is not a CUDA build"
PY
[ "${1:-}" = "--venv-only" ] && { stamp "venv ready"; exit 0; }

stamp "copy the tree to $WORK (tracked and untracked files; no built .so)"
rm -rf "$WORK" && mkdir -p "$WORK"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | grep -zv '^fastlm/kernels$' | xargs -0 tar cf -) | (cd "$WORK" && tar xf -) \
  || fail "copy"
ln -sfn ../kernels "$WORK/fastlm/kernels"

stamp "build fastlm._C for sm_90 (CUDA_HOME=$CUDA_HOME)"
cd "$WORK"
if ! FASTLM_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace > build.log 2>&1; then
  tail -30 build.log; fail "build (see $WORK/build.log)"
fi
grep -E "spill|Used [0-9]+ registers" build.log | sort | uniq -c | sort -rn | head -5

stamp "import and CUDA dispatch keys"
PYTHONPATH=$WORK "$PY" - <<'PY' || fail "import / dispatch keys"
import torch
import fastlm
from fastlm import _ext
assert _ext.available() and _ext.cuda_enabled(), f"fastlm._C without CUDA kernels: {_ext.LOAD_ERROR!r}"
missing = []
for op in ("bias_gelu", "ffn_ext", "packed_linear"):  # packed_linear: the int8 weight-only GEMV
    handle = getattr(torch.ops.fastlm, op).default
    if not torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CUDA"):
        missing.append(op)
    print(f"fastlm::{op}: CUDA kernel registered = {op not in missing}")
assert not missing, f"no CUDA kernel for {missing}"
import fastlm.kernels
fastlm.kernels.load_all()
print("fastlm", fastlm.__file__, "imports with", torch.__version__)
PY

stamp "numpy/triton interpreter guard"
PYTHONPATH=$WORK TRITON_INTERPRET=1 "$PY" -c "import fastlm.kernels, fastlm.backend; print('interpreter import ok')" \
  || fail "interpreter import"

stamp "AOT check with this triton (tests/test_aot.py)"
PYTHONPATH=$WORK "$PY" -m pytest -q -p no:cacheprovider tests/test_aot.py 2>&1 | tail -15
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || fail "AOT check rc=$rc"
stamp "done"
echo "gpu_image_check: PASSED (torch $("$PY" -c 'import torch; print(torch.__version__)'), triton $("$PY" -c 'import triton; print(triton.__version__)'), sm_90 build, AOT gate)"
