"""A/B of the CPU batch split (fastlm/cpu_split.py) for an int8_dynamic BERT-base forward, in one
process, alternating round after round (issue 19): FASTLM_CPU_BATCH_SPLIT=0 (every op over the
intra-op threads) against 1 (a chunk of the batch per thread). Prints each mode's min / median ms
and the ratio split / whole of the mins and of the medians.

    PYTHONPATH=. python bench/int8dyn_split_ab.py [--batch 8] [--seq 128] [--rounds 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize", default="int8_dynamic")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import BertConfig

    import fastlm

    torch.manual_seed(0)
    model = fastlm.from_pretrained(BertConfig(), quantize=args.quantize or None)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def fwd(mode: str):
        os.environ["FASTLM_CPU_BATCH_SPLIT"] = mode
        return model(ids).last_hidden_state

    a, b = fwd("0"), fwd("1")
    print(f"max |split - whole| = {(a - b).abs().max().item():.3g}")
    times = {"0": [], "1": []}
    for r in range(args.rounds):
        for mode in (("0", "1") if r % 2 == 0 else ("1", "0")):
            t = time.perf_counter()
            fwd(mode)
            times[mode].append((time.perf_counter() - t) * 1e3)
    for mode, name in (("0", "whole (intra-op threads)"), ("1", "split (chunk per thread)")):
        print(f"{name}: min {min(times[mode]):.1f} ms, median {statistics.median(times[mode]):.1f} ms")
    print(f"ratio split/whole: min {min(times['1']) / min(times['0']):.3f}, "
          f"median {statistics.median(times['1']) / statistics.median(times['0']):.3f}")


if __name__ == "__main__":
    main()
