#!/usr/bin/env bash
# Dependency drift, seen before it breaks main: install the newest versions the registry serves
# into a throwaway venv, on a fresh clone of HEAD, and run the README's test command there.
#
#   bench/check_latest.sh [--write-constraints] [-- PYTEST_ARGS...]
#
# - Everything floats to its newest release (pip --upgrade --upgrade-strategy eager) except
#   torch, which stays at the README's CPU build (TORCH_SPEC, default torch==2.13.0): a newer
#   torch from the registry is the multi-GB CUDA build. Set TORCH_SPEC to try another.
# - Prints the versions that differ from constraints.txt (the drift), then the test result.
# - --write-constraints: when the suite passes, rewrite constraints.txt from that venv
#   (.ci/freeze_constraints.py), so the README installs the set just tested. Commit it.
# - Not part of CI (about 30 min on 2 cores: install, build, full suite). Run it before
#   closing a dependency change, when a fresh install fails, and every week or so.
# Knobs: LATEST_DIR (default: a new mktemp -d, removed on success), MAX_JOBS (default 2).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
write=0
if [ "${1:-}" = "--write-constraints" ]; then write=1; shift; fi
[ "${1:-}" = "--" ] && shift
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
DIR=${LATEST_DIR:-$(mktemp -d /tmp/fastlm-latest.XXXXXX)}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
fail() { stamp "check_latest: FAILED ($*)"; exit 1; }

stamp "fresh clone of HEAD in $DIR/src"
rm -rf "$DIR/src" && git clone -q "$ROOT" "$DIR/src" || fail "clone"
cd "$DIR/src" || fail "cd"
python3 -m venv "$DIR/venv" || fail "venv"
# shellcheck disable=SC1091
. "$DIR/venv/bin/activate"
echo "$TORCH_SPEC" > "$DIR/hold-torch.txt"
stamp "install: $TORCH_SPEC held, everything else newest"
pip install -q --upgrade -c "$DIR/hold-torch.txt" torch setuptools wheel ninja pybind11 || fail "pip install torch"
MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation --upgrade --upgrade-strategy eager \
  -c "$DIR/hold-torch.txt" -e ".[dev,peers]" || fail "pip install fastlm[dev,peers]"

stamp "versions that differ from constraints.txt (pinned -> newest)"
pip freeze --all --exclude-editable 2>/dev/null | sed 's/+[^ ]*$//' | sort -f > "$DIR/latest.txt"
grep -v '^#' "$ROOT/constraints.txt" | sort -f > "$DIR/pinned.txt"
python3 - "$DIR/pinned.txt" "$DIR/latest.txt" <<'PY'
import sys
def read(p):
    return {l.split("==")[0].lower(): l.split("==")[1] for l in open(p).read().split() if "==" in l}
old, new = read(sys.argv[1]), read(sys.argv[2])
new.pop("pip", None)
rows = [(n, old.get(n, "-"), new.get(n, "-")) for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]
for n, a, b in rows:
    print(f"  {n}: {a} -> {b}")
print(f"  ({len(rows)} differ)" if rows else "  (none: constraints.txt is the newest set)")
PY

stamp "tests: python -m pytest -q -n 2 --dist loadfile tests $*"
python -m pytest -q -n 2 --dist loadfile tests -p no:cacheprovider -rs "$@" 2>&1 | tee "$DIR/pytest.log" | tail -25
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || fail "tests rc=$rc on the newest versions: see $DIR/pytest.log; pin the breaking package in pyproject.toml (upper bound + reason) or fix the code"
if [ "$write" = 1 ]; then
  python "$ROOT/.ci/freeze_constraints.py" "$ROOT/constraints.txt" \
    --note "Tested by bench/check_latest.sh on $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)." \
    || fail "write constraints"
fi
stamp "check_latest: PASSED ($(python -c 'import torch, transformers, triton; print(f"torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")'))"
[ -z "${LATEST_DIR:-}" ] && rm -rf "$DIR"
exit 0
