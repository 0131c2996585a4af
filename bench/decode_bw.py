"""GPT-2 small decode, fp32 vs bf16: ms/token and streamed GB/s against the read bandwidth, in ONE process.

    THP_MEM_ALLOC_ENABLE=1 python bench/decode_bw.py [--rounds 8] [--threads 1,2] [--isa auto|avx2]
        [--variant NAME=knob:value,...] [--seconds 150]

Loads one random-weight GPT-2 small twice (float32 panels and bfloat16 pair panels) and alternates,
round after round: the read bandwidth of a 384 MB fp32 buffer summed by the same threads (the
yardstick), then each engine x thread count x --variant (bf16 knobs of torch.ops.fastlm.bf16_gemv_knob,
or path:NAME for torch.ops.fastlm.bf16_gemv_path). Every sample records the pool's stalls and
back-off jobs (torch.ops.fastlm.cpu_pool_stats) and the share of the 2 CPUs that OTHER processes used
during it (/proc/stat busy ticks minus this process's): on a shared machine the "quiet" columns keep
only samples where others used < 15%. Also prints how much of each model's panels sit on transparent
huge pages (/proc/self/smaps AnonHugePages of the mappings holding them). Issues 25 and 19.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

HZ = os.sysconf("SC_CLK_TCK")


def _ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    with open("/proc/self/stat") as f:
        s = f.read()
    own = s[s.rindex(")") + 2:].split()
    return busy, int(own[11]) + int(own[12])


def measure(fn):
    """(fn's result, share of all CPUs that other processes used meanwhile)."""
    b0, o0 = _ticks()
    t0 = time.perf_counter()
    r = fn()
    wall = time.perf_counter() - t0
    b1, o1 = _ticks()
    return r, max(0.0, ((b1 - b0) - (o1 - o0)) / (HZ * wall * os.cpu_count()))


def read_bw(x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    x.sum()
    return x.numel() * 4 / (time.perf_counter() - t0) / 1e9


def ms_per_token(m, ids, n: int) -> float:
    t0 = time.perf_counter()
    m.generate(ids, max_new_tokens=1)
    t1 = time.perf_counter()
    m.generate(ids, max_new_tokens=n + 1)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / n * 1e3


def panel_bytes(m) -> int:
    return sum(lin.packed.numel() * lin.packed.element_size() for lin in m.decode_linears())


def huge_share(m) -> float:
    """Share of the model's panel bytes in mappings backed by AnonHugePages (per mapping, rough)."""
    maps, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            h = line.split()
            if len(h) >= 5 and "-" in h[0] and not h[0].endswith(":"):
                a, b = (int(v, 16) for v in h[0].split("-"))
                cur = [a, b, 0]
                maps.append(cur)
            elif h[0] == "AnonHugePages:" and cur is not None:
                cur[2] = int(h[1]) * 1024
    huge = tot = 0
    for lin in m.decode_linears():
        p, n = lin.packed.data_ptr(), lin.packed.numel() * lin.packed.element_size()
        tot += n
        for a, b, hp in maps:
            if a <= p < b:
                huge += min(n, hp * n / (b - a)) if b - a > 0 else 0
    return huge / tot


def apply(spec: str) -> None:
    torch.ops.fastlm.bf16_gemv_path("auto")
    for k, v in DEFAULTS.items():
        torch.ops.fastlm.bf16_gemv_knob(k, v)
    for kv in filter(None, spec.split(",")):
        k, v = kv.split(":")
        if k == "path":
            torch.ops.fastlm.bf16_gemv_path(v)
        else:
            torch.ops.fastlm.bf16_gemv_knob(k, int(v))


DEFAULTS: dict[str, int] = {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/decode_bw.py")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=150.0, help="stop starting rounds after this long")
    p.add_argument("--threads", default="2")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--isa", default="auto")
    p.add_argument("--engines", default="fp32,bf16")
    p.add_argument("--variant", action="append", default=[], help="NAME=knob:value,... (bf16 rows)")
    a = p.parse_args(argv)
    import transformers as tf

    import fastlm

    isa = torch.ops.fastlm.cpu_isa(a.isa)
    for k in ("prefetch", "chunk_kb", "tail_kb", "avx2_tile1"):
        DEFAULTS[k] = torch.ops.fastlm.bf16_gemv_knob(k)
    d = "/tmp/fastlm-decode-bw-gpt2"
    if not os.path.exists(os.path.join(d, "config.json")):
        torch.manual_seed(0)
        cfg = tf.GPT2Config()
        cfg.eos_token_id = None
        tf.GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    buf = torch.ones(384 * 2**20 // 4)
    buf.sum()
    engines = a.engines.split(",")
    models = {e: fastlm.from_pretrained(d, device="cpu", **({"dtype": torch.bfloat16} if e == "bf16" else {}))
              for e in engines}
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    threads = [int(t) for t in a.threads.split(",")]
    variants = [v.split("=", 1) for v in a.variant] or [["default", ""]]
    rows = []
    for e in engines:
        for t in threads:
            for vn, vs in (variants if e == "bf16" else [["", ""]]):
                rows.append((f"{e} {t}T {vn}".strip(), e, t, vs))
    for m in models.values():
        m.generate(ids, max_new_tokens=4)
    samples: dict[str, list] = {r[0]: [] for r in rows}
    bw: dict[int, list] = {t: [] for t in threads}
    start = time.perf_counter()
    for _ in range(a.rounds):
        if time.perf_counter() - start > a.seconds:
            break
        for t in threads:
            torch.set_num_threads(t)
            bw[t].append(measure(lambda: read_bw(buf)))
        for name, e, t, vs in rows:
            torch.set_num_threads(t)
            apply(vs)
            s0 = torch.ops.fastlm.cpu_pool_stats()
            ms, others = measure(lambda: ms_per_token(models[e], ids, a.tokens))  # noqa: B023
            s1 = torch.ops.fastlm.cpu_pool_stats()
            samples[name].append((ms, others, s1[4] - s0[4], s1[5] - s0[5], s1[3] - s0[3]))
        apply("")
    torch.set_num_threads(max(threads))
    nbytes = {e: panel_bytes(m) for e, m in models.items()}
    print(f"fastlm kernels {isa}, bf16 path {torch.ops.fastlm.bf16_gemv_path('')}, {len(bw[threads[0]])} rounds, "
          f"1-min load {os.getloadavg()[0]:.1f}; panels on huge pages: "
          + ", ".join(f"{e} {100 * huge_share(m):.0f}%" for e, m in models.items()))
    print()
    print("| row | ms/token median (min-max) | GB/s | quiet samples: n, ms median | others' CPU share (median) "
          "| pool stalls / back-off jobs / shared jobs per run (median) |")
    print("|---|---|---|---|---|---|")
    for t in threads:
        v = [s[0] for s in bw[t]]
        q = [s[0] for s in bw[t] if s[1] < 0.15]
        print(f"| read bandwidth {t}T, 384 MB sum | | {statistics.median(v):.1f} (max {max(v):.1f}) | "
              f"{len(q)}, {statistics.median(q) if q else float('nan'):.1f} GB/s | "
              f"{statistics.median(s[1] for s in bw[t]):.2f} | |")
    for name, e, _t, _vs in rows:
        s = samples[name]
        ms = [x[0] for x in s]
        q = [x[0] for x in s if x[1] < 0.15]
        med = statistics.median(ms)
        qs = f"{len(q)}, {statistics.median(q):.2f}" if q else "0, -"
        print(f"| {name} | {med:.2f} ({min(ms):.2f}-{max(ms):.2f}) | {nbytes[e] / med / 1e6:.1f} | {qs} | "
              f"{statistics.median(x[1] for x in s):.2f} | {statistics.median(x[2] for x in s):.0f} / "
              f"{statistics.median(x[3] for x in s):.0f} / {statistics.median(x[4] for x in s):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
