"""GPT-2 small B = 1 decode: A/B of decode-GEMV knobs in ONE process, alternating (issue 19).

    THP_MEM_ALLOC_ENABLE=1 python bench/decode_sched_ab.py [--precision int8|fp32] [--rounds 8]
        [--tokens 32] [--threads 2] [--variant NAME=prefetch:P,arena:A ...] [--profile]

Variants (NAME=prefetch:P,arena:A) set the software prefetch distance P in bytes (int8:
torch.ops.fastlm.int8_gemv_prefetch, before 1024, now 0; fp32: gemv_prefetch) and the panels' memory A
(0: every projection's panels in its own allocation, huge pages only from 2 MiB up, as before; 1: all in
one huge-page run in step order, fastlm.linear.share_arena_). Every round measures the read bandwidth (a
384 MB fp32 buffer summed by the same threads), then each variant's C++ decode step time per token
(gpt2_decode_profile's timer: prefill and the Python loop are out), the calling thread's CPU time and
the share of the CPUs that OTHER processes used meanwhile (/proc/stat). Prints per variant: best and
median step ms/token, the median of the per-round ratios to the first variant (the A/B number), the best
% of the same round's bandwidth floor (weight bytes / read bandwidth) and the per-op GEMV GB/s
(--profile). Defaults now: int8 prefetch 0, arena 1 (before: prefetch 1024, arena 0). (A third knob,
gemv_sched: per-thread ranges with stealing for one-row GEMVs, was removed: no A/B, idle or loaded,
chose it.) Greedy tokens must be identical across variants (the knobs change scheduling only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from decode_bw import measure, read_bw  # bench/ is the script's directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/decode_sched_ab.py")
    p.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", action="append", default=None,
                   help="NAME=prefetch:P,arena:A (default: before=prefetch:1024,arena:0 and after=prefetch:0,arena:1)")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import transformers as tf

    import fastlm

    ops = torch.ops.fastlm
    variants = []
    for v in a.variant or ["before=prefetch:1024,arena:0", "after=prefetch:0,arena:1"]:
        name, _, spec = v.partition("=")
        kv = dict(item.split(":") for item in spec.split(",") if item)
        pf_op = ops.int8_gemv_prefetch if a.precision == "int8" else ops.gemv_prefetch
        variants.append((name, int(kv.get("prefetch", pf_op(-1))), int(kv.get("arena", 1))))
    torch.manual_seed(0)
    d = "/tmp/fastlm-decode-profile-gpt2"
    if not os.path.exists(os.path.join(d, "config.json")):
        cfg = tf.GPT2Config()
        cfg.eos_token_id = None
        tf.GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    kw = {"quantize": "int8"} if a.precision == "int8" else {}
    m = fastlm.from_pretrained(d, device="cpu", **kw)
    wts = [getattr(lin, "qweight", None) if a.precision == "int8" else getattr(lin, "packed", None)
           for lin in m.decode_linears()]
    wbytes = sum(w.numel() * w.element_size() for w in wts)
    # arena:0 = each projection's panels in its own allocation, as before fastlm.linear.share_arena_ for int8
    # (huge pages only from 2 MiB up); arena:1 = the one huge-page run quantize_ now builds
    from fastlm.linear import _hugepage

    lins = m.decode_linears()
    attr = "qweight" if a.precision == "int8" else "packed"
    layouts = {1: [getattr(x, attr) for x in lins], 0: [_hugepage(getattr(x, attr).clone()) for x in lins]}
    ids = torch.randint(0, m.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    buf = torch.ones(384 * 2**20 // 4)
    buf.sum()

    pr = ops.gpt2_decode_profile

    def tok_ms():
        # the C++ decode step's own time per token (its profile timer: no prefill, no Python loop) and
        # the calling thread's CPU time per generated token
        pr("reset")
        pr("on")
        c0 = time.thread_time()
        out = m.generate(ids, max_new_tokens=a.tokens)
        cpu[0] = (time.thread_time() - c0) / a.tokens * 1e3
        pr("off")
        v = pr("")
        per_op.append([x / v[0] for x in v[1:]])
        return sum(v[1:]) / v[0] / 1e6, out

    cpu = [0.0]
    per_op = []
    cpu_ms = {n: [] for n, *_ in variants}

    res = {n: [] for n, *_ in variants}
    ratio = {n: [] for n, *_ in variants}
    floor_pct = {n: [] for n, *_ in variants}
    others = []
    toks = {}
    prof = {n: [] for n, *_ in variants}
    for r in range(a.rounds + 1):
        gb = max(read_bw(buf) for _ in range(3))
        row = {}
        for name, pf, arena in variants:
            pf_op(pf)
            for x, t in zip(lins, layouts[arena], strict=True):
                setattr(x, attr, t)
            (ms, out), busy = measure(tok_ms)
            toks.setdefault(name, out)
            if r == 0:
                continue  # warm-up
            others.append(busy)
            row[name] = ms
            res[name].append(ms)
            cpu_ms[name].append(cpu[0])
            floor_pct[name].append(100 * wbytes / gb / 1e6 / ms)
            prof[name].append(per_op[-1])
        if r:
            base = row[variants[0][0]]
            for name in row:
                ratio[name].append(row[name] / base)
    ops.int8_gemv_prefetch(0)
    ops.gemv_prefetch(1024)
    same = all(torch.equal(toks[n], toks[variants[0][0]]) for n in toks)
    print(f"GPT-2 small {a.precision} decode, B = 1, {a.threads} threads, {a.tokens} tokens, {a.rounds} rounds "
          f"alternating in one process; weights {wbytes / 1e6:.1f} MB; 1-minute load average "
          f"{os.getloadavg()[0]:.1f}; other processes' CPU share median {100 * statistics.median(others):.0f}%; "
          f"greedy tokens identical across variants: {same}")
    print()
    print("| variant | best C++ step ms/token | median | median per-round ratio to first | best % of same-round floor "
          "| calling thread CPU ms/token (whole generate), median (best) |")
    print("|---|---|---|---|---|---|")
    for name, pf, arena in variants:
        print(f"| {name} (prefetch {pf}, arena {arena}) | {min(res[name]):.2f} | "
              f"{statistics.median(res[name]):.2f} | "
              f"{statistics.median(ratio[name]):.3f} | {max(floor_pct[name]):.0f}% | "
              f"{statistics.median(cpu_ms[name]):.2f} ({min(cpu_ms[name]):.2f}) |")
    if a.profile:
        L, C, V = m.config.n_layer, m.config.n_embd, m.config.vocab_size
        wb = 1 if a.precision == "int8" else 4
        kinds = {1: ("c_attn", L * 3 * C * C * wb), 4: ("attn.c_proj", L * C * C * wb),
                 6: ("c_fc", L * 4 * C * C * wb), 7: ("mlp.c_proj", L * 4 * C * C * wb), 9: ("lm_head", V * C * wb)}
        print()
        print("| variant | " + " | ".join(f"{k} ms (GB/s)" for k, _ in kinds.values()) + " | non-GEMV ms |")
        print("|---" * (len(kinds) + 2) + "|")
        for name, *_ in variants:
            med = [statistics.median(x[i] for x in prof[name]) for i in range(10)]
            cells = [f"{med[i] / 1e6:.3f} ({b / med[i]:.1f})" for i, (_, b) in kinds.items()]
            rest = sum(med[i] for i in range(10) if i not in kinds) / 1e6
            print(f"| {name} | " + " | ".join(cells) + f" | {rest:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
