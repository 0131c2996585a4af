"""Compile every registered Triton kernel configuration ahead of time for sm_80 and sm_90,
on any machine (no GPU needed), and report shared memory and whether wgmma / mma appear.

    python -m fastlm.kernels.aot [--json] [--op NAME]

Runs with the Triton interpreter off (it must compile real kernels), so tests call it in a
subprocess. Exit status 1 when any configuration fails to compile or exceeds shared memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("fastlm.kernels.aot: unset TRITON_INTERPRET (it compiles real kernels)", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m fastlm.kernels.aot")
    ap.add_argument("--json", action="store_true", help="one JSON object per configuration")
    ap.add_argument("--op", default=None)
    args = ap.parse_args(argv)

    from fastlm.kernels import load_all
    from fastlm.kernels.utils import AOT_REGISTRY, SMEM_LIMIT, aot_compile

    load_all()
    ops = [args.op] if args.op else sorted(AOT_REGISTRY)
    bad = 0
    for op in ops:
        if op not in AOT_REGISTRY:
            print(f"unknown op {op!r}; registered: {', '.join(sorted(AOT_REGISTRY))}", file=sys.stderr)
            return 2
        for cfg in AOT_REGISTRY[op]():
            t0 = time.perf_counter()
            rec = {"op": op, "name": cfg.name, "cap": cfg.cap, "uses_dot": cfg.uses_dot,
                   "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            try:
                k = aot_compile(cfg)
                ptx = k.asm["ptx"]
                rec.update(ok=True, shared=int(k.metadata.shared), smem_limit=SMEM_LIMIT[cfg.cap],
                           wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx)
                rec["fits"] = rec["shared"] <= rec["smem_limit"]
            except Exception as e:  # report every failure, not just the first
                rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[-400:]}")
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            bad += not (rec["ok"] and rec["fits"]) if rec["ok"] else 1
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                status = (f"shared {rec['shared']:>6} B / {rec['smem_limit']}  wgmma={rec['wgmma']} mma={rec['mma']}"
                          if rec["ok"] else rec["error"])
                print(f"{'ok ' if rec['ok'] and rec.get('fits') else 'BAD'} {cfg.name}: {status}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
