"""Compile every registered Triton kernel configuration ahead of time for each arch in AOT_CAPS
(sm_80, sm_86, sm_89, sm_90), on any machine (no GPU needed), specialised the way the JIT
specialises the models' calls, and report what the compiled kernel uses.

    python -m fastlm.kernels.aot [--json FILE] [--op NAME] [--jobs N] [--no-cache]

One record per configuration: name, op, cap, dtype, ok, shared_bytes (Triton's metadata),
registers, spill_bytes (spill stores + loads), stack_bytes (ptxas -v on the kernel's PTX, as
Triton runs it), smem_limit, fits, wgmma / mma (in the PTX), offsets64 (program ids widened to
64 bits before stride math, from the TTIR), seconds, error. `--json FILE` writes the list;
without it a table is printed. Exit status 1 when any configuration fails to compile or exceeds
its arch's shared memory.

Runs with the Triton interpreter off (it compiles real kernels), so tests call it in a
subprocess. Records are cached on disk (FASTLM_AOT_CACHE, default ~/.cache/fastlm/aot) keyed by
triton's version, the kernel's source hash, the specialisation, options and arch: unchanged
kernels are not compiled again.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def _setup_env() -> None:
    # Before triton is imported: always run ptxas (its -v log is where registers and spills come
    # from; a triton cache hit would skip it) and print that log.
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)


def _configs():
    from fastlm.kernels import load_all
    from fastlm.kernels.utils import AOT_REGISTRY

    load_all()
    return {op: AOT_REGISTRY[op]() for op in sorted(AOT_REGISTRY)}


def _cache_key(cfg) -> str:
    import triton

    from fastlm.kernels.utils import _jit_function, jit_specialization

    sig, ce, attrs = jit_specialization(cfg)
    key = json.dumps([triton.__version__, _jit_function(cfg.kernel).cache_key, sig, {k: repr(v) for k, v in ce.items()},
                      {str(k): v for k, v in attrs.items()}, cfg.num_warps, cfg.num_stages, cfg.cap, _RECORD_VERSION],
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


_RECORD_VERSION = 2  # bump when the record's fields change


def _parse_ptxas(log: str) -> dict:
    def num(pattern: str) -> int:
        found = [int(x) for x in re.findall(pattern, log)]
        return max(found) if found else 0

    if "Used" not in log:
        return {}
    stores = num(r"(\d+) bytes spill stores")
    loads = num(r"(\d+) bytes spill loads")
    return {"registers": num(r"Used (\d+) registers"), "spill_bytes": stores + loads, "spill_stores": stores,
            "stack_bytes": num(r"(\d+) bytes stack frame")}


_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)? = ([\w.]+)\b(.*)$")
_FOR = re.compile(r"scf\.for (%[\w.#]+) = (%[\w.#]+) to (%[\w.#]+)")
_NAME = re.compile(r"%[\w.#]+")


def _result_type(rest: str) -> str:
    body = rest.split(" loc(")[0]
    typ = body.rsplit(" : ", 1)[-1] if " : " in body else ""
    for sep in (" -> ", " to "):
        if sep in typ:
            typ = typ.rsplit(sep, 1)[-1]
    return typ.strip()


def offsets64(ttir: str) -> bool:
    """True when no 32-bit multiply combines a program-id-derived value with a runtime stride
    argument (`stride_*`), i.e. every pid * stride offset is formed in 64 bits (the kernel
    widens program ids with .to(tl.int64) first). Index math that stays within a sequence
    (pid * BLOCK_M compared with lengths) is fine in 32 bits and not flagged."""
    pid, stride = set(), set()
    for arg in re.finditer(r"(%stride\w*): i32", ttir):
        stride.add(arg.group(1))
    for line in ttir.splitlines():
        f = _FOR.search(line)
        if f and (f.group(2) in pid or f.group(3) in pid):
            pid.add(f.group(1))
        m = _DEF.match(line)
        if not m:
            continue
        var, opname, rest = m.groups()
        operands = set(_NAME.findall(rest.split(" loc(")[0]))
        rtype = _result_type(rest)
        if opname == "tt.get_program_id":
            pid.add(var)
            continue
        is_i32 = rtype == "i32" or rtype.endswith("xi32>")
        if not is_i32:
            continue
        if opname == "arith.muli" and operands & pid and operands & stride:
            return False
        if operands & pid:
            pid.add(var)
        if opname in ("tt.splat", "tt.broadcast", "tt.expand_dims") and operands & stride:
            stride.add(var)
    return True


def _compile_one(task: tuple[str, int, str | None]) -> dict:
    op, idx, cache_dir = task
    from fastlm.kernels.utils import aot_compile, smem_limit

    cfg = _configs()[op][idx]
    rec = {"op": op, "name": cfg.name, "cap": cfg.cap, "dtype": cfg.dtype, "uses_dot": cfg.uses_dot,
           "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "smem_limit": smem_limit(cfg.cap)}
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, _cache_key(cfg) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                cached = json.load(f)
            cached.update(rec, cached=True)
            return cached
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = aot_compile(cfg)
        ptx = k.asm["ptx"]
        res = _parse_ptxas(log.getvalue())
        rec.update(ok=bool(res), shared_bytes=int(k.metadata.shared), wgmma="wgmma.mma_async" in ptx,
                   mma="mma.sync" in ptx, offsets64=offsets64(k.asm["ttir"]), **res)
        if not res:
            rec["error"] = "no ptxas -v log captured (registers / spills unknown)"
        rec["fits"] = rec["shared_bytes"] <= rec["smem_limit"]
    except Exception as e:  # noqa: BLE001 - report every failure, not just the first
        rec.update(ok=False, fits=False, error=f"{type(e).__name__}: {str(e)[-600:]}")
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if path and rec["ok"]:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, path)  # atomic: parallel runs never read half a record
    rec["cached"] = False
    return rec


def run(ops=None, jobs: int = 2, cache: bool = True) -> list[dict]:
    """Compile (or read from the cache) every configuration of `ops` (default all); records in
    registry order."""
    _setup_env()
    allcfg = _configs()
    unknown = [op for op in ops or [] if op not in allcfg]
    if unknown:
        raise SystemExit(f"unknown op {unknown}; registered: {', '.join(allcfg)}")
    cache_dir = None
    if cache:
        cache_dir = os.environ.get("FASTLM_AOT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastlm",
                                                                       "aot")
    tasks = [(op, i, cache_dir) for op in (ops or allcfg) for i in range(len(allcfg[op]))]
    if jobs <= 1:
        return [_compile_one(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, tasks, chunksize=4))


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("fastlm.kernels.aot: unset TRITON_INTERPRET (it compiles real kernels)", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m fastlm.kernels.aot")
    ap.add_argument("--json", metavar="FILE", default=None, help="write the records as a JSON list to FILE")
    ap.add_argument("--op", action="append", default=None, help="only this op (repeatable)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("FASTLM_AOT_JOBS", min(2, os.cpu_count() or 1))))
    ap.add_argument("--no-cache", action="store_true", help="compile everything again")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    recs = run(args.op, args.jobs, not args.no_cache)
    bad = [r for r in recs if not (r["ok"] and r["fits"])]
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(recs, f, indent=1)
        os.replace(tmp, args.json)
    for r in recs:
        if r["ok"]:
            status = (f"shared {r['shared_bytes']:>6} B / {r['smem_limit']}  regs {r['registers']:>3}  "
                      f"spill {r['spill_bytes']:>4} B  wgmma={r['wgmma']} mma={r['mma']} off64={r['offsets64']}")
        else:
            status = r["error"]
        print(f"{'ok ' if r['ok'] and r['fits'] else 'BAD'} {r['name']}: {status}")
    cached = sum(r.get("cached", False) for r in recs)
    print(f"{len(recs)} configurations ({cached} from the cache), {len(bad)} bad, "
          f"{time.perf_counter() - t0:.0f} s with {args.jobs} jobs", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
