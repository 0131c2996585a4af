"""Single-thread compute rate of the int8 decode GEMV (issue 19), robust to a loaded machine.

    python bench/int8_gemv_rate.py [--n 1024] [--k 768] [--calls 400] [--rounds 7]

One thread, one row (M = 1), an N x K int8 weight small enough to stay in L2 (768 x 1024 = 786 KB),
timed by the thread's CPU time (time.thread_time: time another process takes from this core is not
counted). Kernels alternate round by round in one process; prints the median G weights/s per kernel:
the old (K, 16) int8 panels with fp32 activations (pack_panels) and the pair panels
(pack_int8_panels) with int16 activations (int8_gemv_mode 2: VNNI, 1: vpmaddwd), each on the
AVX-512 and the AVX2 path where the CPU runs them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/int8_gemv_rate.py")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import fastlm  # noqa: F401  (loads fastlm._C)
    from fastlm.linear import pack_int8_panels, pack_panels, quantize_int8

    ops = torch.ops.fastlm
    q, s = quantize_int8(torch.randn(a.n, a.k))
    old, new = pack_panels(q), pack_int8_panels(q)
    x = torch.randn(1, a.k)
    best = ops.cpu_isa("auto")
    isas = ["avx512", "avx2"] if best == "avx512" else [best]
    kernels = []
    for isa in isas:
        kernels.append((f"old panels, fp32 activations, {isa}", isa, 2, old))
        if isa == "avx512":
            kernels.append((f"pair panels, int16, {isa} VNNI (mode 2)", isa, 2, new))
        kernels.append((f"pair panels, int16, {isa} vpmaddwd (mode 1)", isa, 1, new))
    rates: dict[str, list[float]] = {k[0]: [] for k in kernels}
    for _ in range(a.rounds):
        for name, isa, mode, w in kernels:
            ops.cpu_isa(isa)
            ops.int8_gemv_mode(mode)
            for _ in range(20):
                ops.packed_linear(x, w, a.n, s, None, None, "none")
            t0 = time.thread_time()
            for _ in range(a.calls):
                ops.packed_linear(x, w, a.n, s, None, None, "none")
            rates[name].append(a.n * a.k * a.calls / (time.thread_time() - t0) / 1e9)
    ops.cpu_isa("auto")
    ops.int8_gemv_mode(2)
    print(f"int8 GEMV, 1 thread, M = 1, {a.n} x {a.k} int8 ({a.n * a.k / 1e3:.0f} KB, in L2), thread CPU time, "
          f"median of {a.rounds} rounds x {a.calls} calls; 1-minute load average {os.getloadavg()[0]:.1f}")
    print()
    print("| kernel | G weights/s (median) | min - max |")
    print("|---|---|---|")
    for name, v in rates.items():
        print(f"| {name} | {statistics.median(v):.1f} | {min(v):.1f} - {max(v):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
