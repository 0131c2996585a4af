"""A/B of two fastlm builds on int8 prefill: packed_linear on pair panels and GPT-2 small's time to first token.

    python bench/int8_prefill_ab.py --a /path/to/old/tree --b /path/to/new/tree [--rounds 4]

Each build runs in its own process (PYTHONPATH = its tree, which holds fastlm/ and its fastlm/_C*.so),
the processes alternating A, B, A, B, ... for --rounds rounds; one thread, the thread's CPU time
(time.thread_time), best of --reps per process. Prints, per case, the best time of each build over
all rounds and the ratio B / A (< 1: B faster). Cases: packed_linear on int8 pair panels at
M x K x N for the --m rows and --shapes, and a random-weight GPT-2 small (transformers' default
config, saved once under /tmp) quantized with fastlm.quantize_(model, "int8"), generate with a
--prompt-token prompt and max_new_tokens=1 (prefill + the first token).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
import fastlm
from fastlm.linear import pack_int8_panels, quantize_int8
a = json.loads(sys.argv[1])
ops = torch.ops.fastlm
out = {"so": fastlm._C.__file__}

def best(fn, reps, calls):
    fn()
    b = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        b = min(b, (time.thread_time() - t0) / calls)
    return b

for shape in a["shapes"]:
    K, N = shape
    g = torch.Generator().manual_seed(0)
    q, s = quantize_int8(torch.randn(N, K, generator=g))
    p = pack_int8_panels(q)
    for M in a["m"]:
        x = torch.randn(M, K, generator=g)
        calls = max(2, int(2e8 / (M * K * N)))
        out[f"packed_linear {M} x {K} x {N}"] = best(lambda: ops.packed_linear(x, p, N, s, None, None, "none"),
                                                     a["reps"], calls)
if a["prompt"] > 0:
    m = fastlm.from_pretrained(a["model_dir"], device="cpu", quantize="int8")
    ids = torch.randint(0, m.config.vocab_size, (1, a["prompt"]), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out[f"GPT-2 small int8 generate, {a['prompt']}-token prompt, 1 new token"] = best(
            lambda: m.generate(ids, max_new_tokens=1), a["reps"], 3)
print(json.dumps(out))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/int8_prefill_ab.py")
    p.add_argument("--a", required=True, help="tree of build A (the baseline)")
    p.add_argument("--b", required=True, help="tree of build B")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--m", default="16,17,24,32,48,64,95,96,128,256")
    p.add_argument("--shapes", default="768x2304,768x3072,3072x768")
    p.add_argument("--prompt", type=int, default=48)
    p.add_argument("--env", default="", help="extra environment, e.g. FASTLM_CPU_ISA=avx2,ATEN_CPU_CAPABILITY=avx2")
    a = p.parse_args(argv)
    model_dir = "/tmp/fastlm-i8mid-gpt2-small"
    if a.prompt > 0 and not os.path.exists(os.path.join(model_dir, "config.json")):
        import torch
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.GPT2Config()
        cfg.eos_token_id = None
        tf.GPT2LMHeadModel(cfg).eval().save_pretrained(model_dir)
    spec = json.dumps({"shapes": [[int(v) for v in s.split("x")] for s in a.shapes.split(",")],
                       "m": [int(v) for v in a.m.split(",")], "reps": a.reps, "prompt": a.prompt,
                       "model_dir": model_dir})
    env = dict(os.environ)
    for kv in filter(None, a.env.split(",")):
        k, _, v = kv.partition("=")
        env[k] = v
    best: dict[str, dict[str, float]] = {"A": {}, "B": {}}
    sos = {}
    for _ in range(a.rounds):
        for tag, tree in (("A", a.a), ("B", a.b)):
            r = subprocess.run([sys.executable, "-c", CHILD, spec], env={**env, "PYTHONPATH": tree}, cwd=tree,
                               capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            sos[tag] = res.pop("so")
            for k, v in res.items():
                best[tag][k] = min(best[tag].get(k, float("inf")), v)
    print(f"A = {sos['A']}\nB = {sos['B']}\n{a.rounds} rounds of one process per build, alternating; 1 thread, "
          f"thread CPU time, best of {a.reps} per process; env {a.env or '(default ISA)'}; "
          f"1-minute load {os.getloadavg()[0]:.1f}\n")
    print("| case | A ms | B ms | B / A time |")
    print("|---|---|---|---|")
    for k in best["A"]:
        ta, tb = best["A"][k], best["B"][k]
        print(f"| {k} | {ta * 1e3:.3f} | {tb * 1e3:.3f} | {tb / ta:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
