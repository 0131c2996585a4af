"""Per-op profile of one GPT-2 small greedy decode step on the CPU (issue 19 item 1).

    THP_MEM_ALLOC_ENABLE=1 python bench/decode_profile.py [--precision fp32|int8] [--threads 2] [--isa avx2]
        [--model DIR] [--tokens 32] [--reps 5] [--ab]

Runs fastlm's one-call decode step (torch.ops.fastlm.gpt2_decode_cpu) on a random-weight GPT-2 small
(the peers suite's, or a fresh one from GPT2Config()), with its per-op timer on
(torch.ops.fastlm.gpt2_decode_profile), and prints a markdown table: ms per token of every op kind
summed over the 12 layers, each GEMV's achieved GB/s against the read bandwidth measured in the same
process (a 384 MB buffer summed by the same threads: a plain streaming read), the host work per token
outside the C++ step (Python, the embedding, argmax), and the pool's shared jobs per step. --isa
avx2 caps fastlm's kernels (torch.ops.fastlm.cpu_isa); for torch's own ops set
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 before starting. On a shared machine the numbers
move with the load: read them as shares of one run, and compare runs only within one invocation.

--ab (int8): instead of the per-op table, alternate the int8 GEMV's two layouts on the same model in one
process, --reps rounds: the old (K, 16) int8 panels with fp32 activations (pack_panels) and the pair
panels with int16 activations (pack_int8_panels, the default), swapping every Int8Linear's qweight
between runs; prints the median wall ms per decode token and C++ step ms of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

OPS = ["ln_1", "c_attn (QKV GEMV)", "kv write", "attention", "attn.c_proj GEMV", "ln_2", "c_fc GEMV",
       "mlp.c_proj GEMV", "ln_f", "lm_head GEMV"]


def bandwidth(threads: int, reps: int = 5) -> float:
    x = torch.ones(384 * 2**20 // 4)
    x.sum()
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/decode_profile.py")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", default="auto", choices=["auto", "avx512", "avx2", "portable"])
    p.add_argument("--model", default=None, help="a saved GPT-2 directory (default: a random GPT2Config())")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ab", action="store_true", help="int8: alternate the old and the new int8 GEMV layouts")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import transformers as tf

    import fastlm

    isa = torch.ops.fastlm.cpu_isa(a.isa)
    kw = {"quantize": "int8"} if a.precision == "int8" else {}
    if a.model:
        m = fastlm.from_pretrained(a.model, device="cpu", **kw)
    else:
        torch.manual_seed(0)
        cfg = tf.GPT2Config()
        cfg.eos_token_id = None
        d = "/tmp/fastlm-decode-profile-gpt2"
        if not os.path.exists(os.path.join(d, "config.json")):
            tf.GPT2LMHeadModel(cfg).eval().save_pretrained(d)
        m = fastlm.from_pretrained(d, device="cpu", **kw)
    ids = torch.randint(0, m.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    if a.ab:
        return ab(m, ids, a, isa)
    gb = bandwidth(a.threads)
    m.generate(ids, max_new_tokens=4)  # warm-up
    prof = torch.ops.fastlm.gpt2_decode_profile
    wall, one, steps, jobs = [], [], [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=1)
        one.append(time.perf_counter() - t0)
        prof("reset")
        prof("on")
        s0 = torch.ops.fastlm.cpu_pool_stats()
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=a.tokens)
        wall.append(time.perf_counter() - t0)
        s1 = torch.ops.fastlm.cpu_pool_stats()
        prof("off")
        r = prof("")
        steps.append([v / r[0] for v in r[1:]])  # ns per decode step, per op kind
        jobs.append((s1[3] + s1[5] - s0[3] - s0[5]) / r[0])
    n_steps = r[0]
    # the median run by C++ step time
    order = sorted(range(a.reps), key=lambda i: sum(steps[i]))
    i = order[len(order) // 2]
    per_op = steps[i]
    step_ms = sum(per_op) / 1e6
    tok_ms = (wall[i] - min(one)) / (a.tokens - 1) * 1e3  # per decode token (the prefill and first token out)
    # weight bytes per GEMV kind, over all layers
    from fastlm.models.gpt2 import _cpu_proj

    head_w = _cpu_proj(m._modules["lm_head"])[0]  # the packed head the step streams
    L, C, V = m.config.n_layer, m.config.n_embd, m.config.vocab_size
    wb = 1 if a.precision == "int8" else 4
    bytes_of = {1: L * 3 * C * C * wb, 4: L * C * C * wb, 6: L * 4 * C * C * wb, 7: L * 4 * C * C * wb,
                9: head_w.numel() * head_w.element_size()}
    logits = torch.randn(1, V)
    t0 = time.perf_counter()
    for _ in range(200):
        logits.argmax(-1)
    argmax_us = (time.perf_counter() - t0) / 200 * 1e6
    print(f"GPT-2 small decode step, {a.precision}, fastlm kernels {isa}, {a.threads} threads, "
          f"{n_steps} steps per run, median of {a.reps} runs; read bandwidth (384 MB summed, best of 5) "
          f"{gb:.1f} GB/s; 1-minute load average {os.getloadavg()[0]:.1f}")
    print()
    print("| op (12 layers summed) | ms/token | share of step | weight MB | GB/s | % of read bandwidth |")
    print("|---|---|---|---|---|---|")
    for k, name in enumerate(OPS):
        ms = per_op[k] / 1e6
        if k in bytes_of:
            mb = bytes_of[k] / 1e6
            g = bytes_of[k] / (per_op[k] or 1)
            print(f"| {name} | {ms:.3f} | {100 * ms / step_ms:.1f}% | {mb:.1f} | {g:.1f} | {100 * g / gb:.0f}% |")
        else:
            print(f"| {name} | {ms:.3f} | {100 * ms / step_ms:.1f}% | - | - | - |")
    gemv_b = sum(bytes_of.values())
    gemv_ms = sum(per_op[k] for k in bytes_of) / 1e6
    print(f"| all GEMVs | {gemv_ms:.3f} | {100 * gemv_ms / step_ms:.1f}% | {gemv_b / 1e6:.1f} | "
          f"{gemv_b / gemv_ms / 1e6:.1f} | {100 * gemv_b / gemv_ms / 1e6 / gb:.0f}% |")
    print(f"| C++ step (gpt2_decode_cpu) | {step_ms:.3f} | 100% | | | |")
    print(f"| host work per token (Python, embedding, argmax, sampling loop) | {tok_ms - step_ms:.3f} | "
          f"+{100 * (tok_ms - step_ms) / step_ms:.1f}% | | | |")
    print(f"| of which argmax over {V} logits | {argmax_us / 1e3:.3f} | | | | |")
    print(f"| wall per decode token | {tok_ms:.3f} | | | | |")
    print(f"| floor: {gemv_b / 1e6:.0f} MB / {gb:.1f} GB/s | {gemv_b / gb / 1e6:.3f} | | | | |")
    print()
    print(f"pool jobs shared per step: {statistics.median(jobs):.1f} (each a handoff to the helper and a wait "
          "for its last chunk)")
    return 0


def ab(m, ids, a, isa: str) -> int:
    from fastlm.linear import Int8Linear, pack_int8_panels, pack_panels, unpack_int8_panels

    mods = [x for x in m.modules() if isinstance(x, Int8Linear) and x.qweight.dim() == 3]
    if not mods:
        raise SystemExit("--ab needs --precision int8")
    layouts = {"new": [], "old": []}
    for x in mods:
        q = unpack_int8_panels(x.qweight, x.out_features, x.in_features)
        layouts["new"].append(pack_int8_panels(q))
        layouts["old"].append(pack_panels(q))
    prof = torch.ops.fastlm.gpt2_decode_profile
    res = {k: ([], [], []) for k in layouts}
    toks = {}
    for r in range(a.reps + 1):
        for name, ws in layouts.items():
            for x, w in zip(mods, ws, strict=True):
                x.qweight = w
            t0 = time.perf_counter()
            m.generate(ids, max_new_tokens=1)
            one = time.perf_counter() - t0
            prof("reset")
            prof("on")
            t0, c0 = time.perf_counter(), time.thread_time()
            out = m.generate(ids, max_new_tokens=a.tokens)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            prof("off")
            pr = prof("")
            toks[name] = out
            if r == 0:
                continue  # warm-up round
            res[name][0].append((wall - one) / (a.tokens - 1) * 1e3)
            res[name][1].append(sum(pr[1:]) / pr[0] / 1e6)
            res[name][2].append(cpu / a.tokens * 1e3)
    same = torch.equal(toks["new"], toks["old"])
    print(f"GPT-2 small int8 decode, fastlm kernels {isa}, {a.threads} threads, {a.tokens} tokens, layouts "
          f"alternating, median of {a.reps} rounds; 1-minute load average {os.getloadavg()[0]:.1f}; "
          f"greedy tokens identical: {same}")
    print()
    print("| int8 GEMV | wall ms per decode token | C++ step ms | calling thread's CPU ms per token |")
    print("|---|---|---|---|")
    labels = (("old", "old: (K, 16) panels, fp32 activations"), ("new", "new: pair panels, int16 activations"))
    for name, label in labels:
        w, c, t = res[name]
        print(f"| {label} | {statistics.median(w):.2f} | {statistics.median(c):.2f} | {statistics.median(t):.2f} |")
    ratio = [statistics.median(res["new"][i]) / statistics.median(res["old"][i]) for i in range(3)]
    print(f"| new / old | {ratio[0]:.2f} | {ratio[1]:.2f} | {ratio[2]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
