"""GPT-2 small B = 1 decode under CPU contention: 2 threads / 1 thread for several builds or knobs, alternating.

    PYTHONPATH=. python bench/contention_ab.py [--precision int8] [--rounds 3] [--reps 4] [--competitors 1]
        [--variant NAME=PATH[;ENV=VALUE...] ...]

Each variant is a fastlm build (the directory put first on PYTHONPATH, e.g. /work/main for the old one) plus
environment variables for its worker (FASTLM_AB_SCHED=S sets torch.ops.fastlm.gemv_sched(S) in the builds that still
have that knob, before its removal). Per round, idle and loaded blocks alternate (loaded = --competitors Python busy
loops, default 1, pinned to the same cores, bench/contention.py's competitor), and in each block every variant runs
one worker process (variant order alternating between rounds). A worker loads a random-weight GPT-2 small once, then
alternates 1 and 2 threads (torch.set_num_threads) --reps times, 32 new tokens from a 16-token prompt, timing the C++
decode step (gpt2_decode_profile: no prefill, no Python loop); its cell is the best rep, and the median over the reps
of 2T / 1T of adjacent reps (less sensitive to other jobs' load drifting). The pool's counters
(torch.ops.fastlm.cpu_pool_stats) over the 2-thread reps are printed too.

Prints per variant: 2T/1T idle and loaded (best of the rounds; the ratio that counts, both threads
counts measured in the same process), loaded/idle per thread count, and every variant against the first
per cell. Wall-clock numbers on a shared machine are indicative only; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "/tmp/fastlm-decode-profile-gpt2"


def competitor(cores: list[int]) -> subprocess.Popen:
    """One CPU-bound process (a Python busy loop) pinned to `cores`; it stops itself after 10 min."""
    code = (f"import os, time\nos.sched_setaffinity(0, {cores!r})\n"
            "t = time.time() + 600\nwhile time.time() < t: pass\n")
    return subprocess.Popen([sys.executable, "-c", code])


def worker(precision: str, reps: int, tokens: int) -> None:
    import torch
    import transformers as tf

    import fastlm

    ops = torch.ops.fastlm
    if "FASTLM_AB_SCHED" in os.environ and hasattr(ops, "gemv_sched"):
        ops.gemv_sched(int(os.environ["FASTLM_AB_SCHED"]))
    torch.manual_seed(0)
    if not os.path.exists(os.path.join(MODEL, "config.json")):
        cfg = tf.GPT2Config()
        cfg.eos_token_id = None
        tf.GPT2LMHeadModel(cfg).eval().save_pretrained(MODEL)
    m = fastlm.from_pretrained(MODEL, device="cpu", **({"quantize": "int8"} if precision == "int8" else {}))
    ids = torch.randint(0, m.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    pr = ops.gpt2_decode_profile

    def step_ms() -> float:
        pr("reset")
        pr("on")
        m.generate(ids, max_new_tokens=tokens)
        pr("off")
        v = pr("")
        return sum(v[1:]) / v[0] / 1e6

    for t in (1, 2):  # warm-up
        torch.set_num_threads(t)
        step_ms()
    best = {1: float("inf"), 2: float("inf")}
    pairs = []
    # over the 2-thread reps: shared jobs, stalls, jobs run alone, busy back-offs (builds that have them)
    stats = [0, 0, 0, 0]
    for _ in range(reps):
        ms = {}
        for t in (1, 2):
            torch.set_num_threads(t)
            s0 = list(ops.cpu_pool_stats())
            ms[t] = step_ms()
            best[t] = min(best[t], ms[t])
            s1 = list(ops.cpu_pool_stats())
            if t == 2:
                for i, j in enumerate((3, 4, 5, 7)):
                    if j < len(s1):
                        stats[i] += s1[j] - s0[j]
        pairs.append(ms[2] / ms[1])
    print(json.dumps({"ms1": best[1], "ms2": best[2], "pair": statistics.median(pairs), "stats": stats,
                      "so": fastlm._C.__file__}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--competitors", type=int, default=1, help="CPU-bound processes in the loaded blocks")
    p.add_argument("--variant", action="append", default=None, help="NAME=PATH[;ENV=VALUE...]")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.precision, a.reps, a.tokens)
        return 0
    variants = []
    for v in a.variant or [f"this={os.path.dirname(HERE)}"]:
        name, _, spec = v.partition("=")
        path, *envs = spec.split(";")
        variants.append((name, os.path.abspath(path), dict(e.split("=", 1) for e in envs)))
    cores = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, cores)  # the workers inherit it
    print(f"cores {cores}; load average {os.getloadavg()[0]:.2f}; {a.precision}; {a.competitors} competitor(s) "
          "when loaded; variants: "
          + "; ".join(f"{n}={p} {e}" for n, p, e in variants), flush=True)
    best: dict[tuple[str, str, int], float] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the competitor
    pair: dict[tuple[str, str], list[float]] = {}
    print("round | load | variant | 1T ms | 2T ms | 2T/1T best | 2T/1T median of pairs | 2T pool: shared jobs, "
          "stalls, jobs alone, busy back-offs")
    for rnd in range(a.rounds):
        for load in (("idle", "loaded") if rnd % 2 == 0 else ("loaded", "idle")):
            comps = [competitor(cores) for _ in range(a.competitors)] if load == "loaded" else []
            try:
                time.sleep(0.5 if comps else 0)
                for name, path, envs in (variants if rnd % 2 == 0 else variants[::-1]):
                    env = dict(os.environ, PYTHONPATH=path + os.pathsep + HERE, **envs)
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--precision",
                                          a.precision, "--reps", str(a.reps), "--tokens", str(a.tokens)],
                                         env=env, capture_output=True, text=True, timeout=600)
                    if out.returncode != 0:
                        print(f"{rnd + 1} | {load} | {name} | failed: {out.stderr[-2000:]}", flush=True)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    assert r["so"].startswith(path), (r["so"], path)
                    for t in (1, 2):
                        key = (name, load, t)
                        best[key] = min(best.get(key, float("inf")), r[f"ms{t}"])
                    pair.setdefault((name, load), []).append(r["pair"])
                    print(f"{rnd + 1} | {load} | {name} | {r['ms1']:.2f} | {r['ms2']:.2f} | "
                          f"{r['ms2'] / r['ms1']:.3f} | {r['pair']:.3f} | {', '.join(map(str, r['stats']))}",
                          flush=True)
            finally:
                for comp in comps:
                    comp.kill()
                    comp.wait()
    print("\nbest of the rounds per cell (ms/token), ratios:")
    first = variants[0][0]
    for name, _, _ in variants:
        g = lambda load, t, n=name: best.get((n, load, t), float("nan"))  # noqa: E731
        line = (f"  {name}: 2T/1T idle {g('idle', 2) / g('idle', 1):.3f}, "
                f"loaded {g('loaded', 2) / g('loaded', 1):.3f}; "
                f"loaded/idle 1T {g('loaded', 1) / g('idle', 1):.2f}, 2T {g('loaded', 2) / g('idle', 2):.2f}")
        line += ("; 2T/1T median of the rounds' pair medians: idle "
                 f"{statistics.median(pair.get((name, 'idle'), [float('nan')])):.3f}, loaded "
                 f"{statistics.median(pair.get((name, 'loaded'), [float('nan')])):.3f}")
        if name != first:
            f = lambda load, t, n=name: best.get((n, load, t), float("nan")) / best.get((first, load, t), float("nan"))  # noqa: E731
            line += "; vs " + first + ": " + ", ".join(f"{load} {t}T {f(load, t):.3f}" for load in ("idle", "loaded")
                                                       for t in (1, 2))
        print(line)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
