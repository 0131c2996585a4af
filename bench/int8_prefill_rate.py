"""Single-thread rate of packed_linear at prefill row counts: int8 pair panels vs fp32 panels vs torch.

    python bench/int8_prefill_rate.py [--m 16,17,24,...] [--shapes 768x2304,768x3072,3072x768] [--rounds 5]

One thread, timed by the thread's CPU time (time.thread_time: time another process takes from this
core is not counted). For each K x N and row count M the kernels alternate round by round in one
process: packed_linear on int8 pair panels (pack_int8_panels, what Int8Linear runs on CPU), on fp32
panels (pack_panels) of the dequantised weight, and F.linear on the dequantised weight. Prints the
best G MAC/s per kernel and the ratio int8 / fp32 panels (> 1: int8 faster). The ISA is the process's
(FASTLM_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 caps it).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/int8_prefill_rate.py")
    p.add_argument("--m", default="16,17,24,32,48,64,95,96,128,256")
    p.add_argument("--shapes", default="768x2304,768x3072,3072x768")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--target-ms", type=float, default=40.0, help="CPU time per measurement")
    p.add_argument("--kernels", default="int8,fp32,torch")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import fastlm  # noqa: F401  (loads fastlm._C)
    from fastlm.linear import pack_int8_panels, pack_panels, quantize_int8

    ops = torch.ops.fastlm
    kinds = a.kernels.split(",")
    print(f"packed_linear, 1 thread, thread CPU time, best of {a.rounds} alternating rounds; isa {ops.cpu_isa()}; "
          f"fastlm._C {fastlm._C.__file__}; 1-minute load {os.getloadavg()[0]:.1f}")
    print()
    print("| K x N | M | " + " | ".join(f"{k} G MAC/s" for k in kinds) + " | int8 / fp32 rate |")
    print("|---|---|" + "---|" * len(kinds) + "---|")
    for shape in a.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        q, s = quantize_int8(torch.randn(N, K))
        wd = q.float() * s[:, None]
        pairs, f32 = pack_int8_panels(q), pack_panels(q.float())
        for M in (int(v) for v in a.m.split(",")):
            x = torch.randn(M, K)
            fns = {
                "int8": lambda x=x, w=pairs, N=N, s=s: ops.packed_linear(x, w, N, s, None, None, "none"),
                "fp32": lambda x=x, w=f32, N=N, s=s: ops.packed_linear(x, w, N, s, None, None, "none"),
                "torch": lambda x=x, w=wd: F.linear(x, w),
            }
            # calls per measurement from one timed call
            t0 = time.thread_time()
            for _ in range(3):
                fns["fp32"]()
            per = (time.thread_time() - t0) / 3
            calls = max(2, int(a.target_ms / 1e3 / max(per, 1e-6)))
            best = {k: float("inf") for k in kinds}
            for _ in range(a.rounds):
                for k in kinds:
                    fns[k]()
                    t0 = time.thread_time()
                    for _ in range(calls):
                        fns[k]()
                    best[k] = min(best[k], (time.thread_time() - t0) / calls)
            rates = {k: M * K * N / best[k] / 1e9 for k in kinds}
            ratio = rates["int8"] / rates["fp32"] if "int8" in rates and "fp32" in rates else float("nan")
            print(f"| {K} x {N} | {M} | " + " | ".join(f"{rates[k]:.1f}" for k in kinds) + f" | {ratio:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
