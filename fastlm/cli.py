"""fastlm's command line: `fastlm info`, `fastlm bench`, `fastlm generate`, `fastlm embed` (also
`python -m fastlm`)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _console():
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=170)


def cmd_info(args) -> int:
    from rich.table import Table

    from fastlm.info import report

    rep = report()
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    con = _console()
    t = Table(title="fastlm", show_header=False)
    for k, v in rep.items():
        if k != "ops":
            t.add_row(k, str(v))
    con.print(t)
    ops = Table(title="ops: implementation per device (backend " + rep["backend"] + ")")
    for col in rep["ops"][0]:
        ops.add_column(col)
    for row in rep["ops"]:
        ops.add_row(*(str(v) for v in row.values()))
    con.print(ops)
    if rep["fastlm._C"] != "loaded":
        con.print("[yellow]fastlm._C is not loaded: its ops run on torch instead (fused ops on CPU, else the "
                  "reference).[/yellow]")
    return 0


def cmd_bench(args) -> int:
    import torch
    from rich.progress import Progress
    from rich.table import Table

    from fastlm.bench import report, runner
    from fastlm.bench.peers.suite import peer_cases
    from fastlm.bench.result import save_json

    if args.compare:
        return _compare(*args.compare)
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("fastlm bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("fp16" if device == "cuda" else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])
    try:
        cases = runner.build_cases(device, dtype, args.suite, args.only)
    except ValueError as e:
        print(f"fastlm bench: {e}", file=sys.stderr)
        return 2
    con = _console()
    label = "GPU" if device == "cuda" else "CPU figures (small shapes; not GPU performance)"
    peers, _ = peer_cases(device, args.suite, args.only)
    con.print(f"[bold]fastlm bench[/bold] on {label}: {len(cases)} cases"
              + (f" + {len(peers)} peers cases (a process per engine)" if peers else "")
              + f", suite {args.suite}, {dtype_name}")
    with Progress(transient=True, console=con) as prog:
        task = prog.add_task("ceilings", total=None if peers else len(cases) + 1)

        def step(msg):
            prog.update(task, advance=1, description=msg)

        os.makedirs(args.out, exist_ok=True)
        res = runner.run(device, dtype, args.suite, args.only, budget_s=args.budget, progress=step,
                         partial_json=os.path.join(args.out, f"bench-{device}-partial.json"), rounds=args.rounds,
                         calls=args.calls, threads=args.threads)
    table = Table(title=f"fastlm bench: {res.env.get('gpu') or 'CPU (' + str(res.env['cpu_threads']) + ' threads)'}, "
                        f"{dtype_name} | copy {res.ceilings.copy_gbs:.0f} GB/s, {res.ceilings.matmul_dtype} matmul "
                        f"{res.ceilings.matmul_tflops:.1f} TFLOP/s")
    for col in ("case", "shape", "provider", "ms", "value", "% ceiling", "vs fastlm"):
        table.add_column(col, justify="right" if col in ("ms", "value", "% ceiling", "vs fastlm") else "left")
    sp = report.speedups(res)
    for r in res.rows:
        if r.status != "ok":
            table.add_row(r.case, r.label, r.provider, "-", "-", "-", f"[dim]{r.status}[/dim]")
            continue
        rel = sp.get((r.case, r.label), {}).get(r.provider)
        table.add_row(r.case, r.label, r.provider, f"{r.ms:.3f}", f"{r.value:,.1f} {r.unit}",
                      f"{r.pct_of_ceiling:.0f}%" if r.pct_of_ceiling is not None else "-",
                      f"fastlm {rel:.2f}x" if rel else "")
    con.print(table)
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    jpath = os.path.join(out_dir, f"bench-{device}-{stamp}.json")
    save_json(res, jpath)
    if os.path.exists(os.path.join(out_dir, f"bench-{device}-partial.json")):
        os.remove(os.path.join(out_dir, f"bench-{device}-partial.json"))
    with open(os.path.join(out_dir, f"bench-{device}.md"), "w") as f:
        f.write(report.markdown(res))
    pngs = [] if args.no_plots else report.plot(res, out_dir)
    con.print(f"wrote {jpath}" + (f" and {len(pngs)} plot(s) in {out_dir}" if pngs else ""))
    return 0


def _compare(old_path: str, new_path: str) -> int:
    from rich.table import Table

    from fastlm.bench.report import compare
    from fastlm.bench.result import load_json

    try:
        rows = compare(load_json(old_path), load_json(new_path))
    except (FileNotFoundError, ValueError) as e:
        print(f"fastlm bench: {e}", file=sys.stderr)
        return 2
    t = Table(title=f"{old_path} -> {new_path}")
    for col in ("case", "shape", "provider", "old ms", "new ms", "new/old"):
        t.add_column(col)
    for r in rows:
        style = "red" if r["regression"] else ""
        t.add_row(r["case"], r["label"], r["provider"], f"{r['old_ms']:.3f}", f"{r['new_ms']:.3f}",
                  f"[{style}]{r['ratio']:.2f}[/{style}]" if style else f"{r['ratio']:.2f}")
    _console().print(t)
    n = sum(r["regression"] for r in rows)
    _console().print(f"{n} regression(s) over 5%" if n else "no regressions over 5%")
    return 1 if n else 0


GPT2_SIZES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-tiny": dict(n_embd=128, n_layer=2, n_head=2),
}


def cmd_generate(args) -> int:
    import time

    import torch

    import fastlm

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")])
    tok = None
    try:
        if args.model:
            model = fastlm.from_pretrained(args.model, dtype=dtype, device=device, quantize=args.quantize)
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
            except Exception as e:  # no tokenizer files: token ids only
                if args.prompt is not None:
                    print(f"fastlm generate: no tokenizer in {args.model} ({type(e).__name__}); use --prompt-ids",
                          file=sys.stderr)
                    return 2
        else:
            from transformers import GPT2Config

            if args.config not in GPT2_SIZES:
                print(f"fastlm generate: --config must be one of {', '.join(GPT2_SIZES)}", file=sys.stderr)
                return 2
            model = fastlm.from_pretrained(GPT2Config(**GPT2_SIZES[args.config]), dtype=dtype, device=device,
                                           quantize=args.quantize)
        if not isinstance(model, fastlm.GPT2LMHeadModel):
            print("fastlm generate: the model is not a GPT-2 language model", file=sys.stderr)
            return 2
        if args.prompt is not None:
            ids = tok(args.prompt, return_tensors="pt").input_ids
        elif args.prompt_ids:
            ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])
        else:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=g)
        ids = ids.expand(args.batch, -1).to(device)
        # options left unset (None) take the checkpoint's generation defaults (eos, pad, sampling, ...)
        kw = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "min_new_tokens": args.min_new_tokens,
              "repetition_penalty": args.repetition_penalty}
        list(model.stream(ids, **{**kw, "max_new_tokens": 2}))  # warm-up: JIT, cache, CUDA graph
        t0 = time.perf_counter()
        times, steps = [], []
        for new in model.stream(ids, **kw):
            times.append(time.perf_counter())
            steps.append(new)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastlm generate: {e}", file=sys.stderr)
        return 2
    out = torch.stack(steps, 1)
    con = _console()
    for b in range(min(args.batch, 4)):
        text = tok.decode(out[b]) if tok is not None else " ".join(map(str, out[b].tolist()))
        con.print(f"[bold]{b}[/bold] {text}")
    ttft = (times[0] - t0) * 1e3
    per_tok = (times[-1] - times[0]) / max(1, len(times) - 1) * 1e3
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    con.print(f"{where}, {str(dtype)[6:]}, batch {args.batch}, prompt {ids.shape[1]}, {len(times)} new tokens: "
              f"time to first token {ttft:.1f} ms, {per_tok:.2f} ms/token, "
              f"{args.batch * (len(times) - 1) / max(times[-1] - times[0], 1e-9):.1f} tok/s (decode)")
    return 0


def _read_texts(src: str) -> list[str]:
    """One text per line (the line break removed; blank lines are texts too)."""
    if src == "-":
        data = sys.stdin.read()
    else:
        with open(src, encoding="utf-8") as f:
            data = f.read()
    texts = data.splitlines()
    if not texts:
        raise ValueError(f"{'standard input' if src == '-' else src} is empty: nothing to embed (one text per line)")
    return texts


def _write_atomic(path: str, write) -> None:
    """write(file) into a temporary file next to `path`, renamed onto it only when complete."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastlm-embed-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_embed(args) -> int:
    import numpy as np
    import torch

    import fastlm

    if args.format == "npy" and not args.out:
        print("fastlm embed: --format npy needs --out FILE.npy (or use --format jsonl for standard output)",
              file=sys.stderr)
        return 2
    try:
        texts = _read_texts(args.input)
        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
        device = None if args.device == "auto" else args.device
        emb = fastlm.Embedder(args.model, device=device, dtype=dtype, quantize=args.quantize, truncate=args.truncate)
        vecs = emb.encode(texts, batch_size=args.batch_size, progress=not args.no_progress).numpy()  # (N, d) float32
    except (ValueError, TypeError, OSError) as e:
        print(f"fastlm embed: {e}", file=sys.stderr)
        return 2
    assert vecs.dtype == np.float32
    if args.format == "npy":
        _write_atomic(args.out, lambda f: np.save(f, vecs))
    else:
        lines = "".join(json.dumps(v.tolist()) + "\n" for v in vecs)
        if args.out:
            _write_atomic(args.out, lambda f: f.write(lines.encode()))
        else:
            sys.stdout.write(lines)
    print(f"fastlm embed: {len(texts)} texts -> {vecs.shape[1]}-d float32 vectors"
          + (f" in {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlm", description="Fast BERT and GPT-2 inference")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="versions, GPU, fastlm._C, and which implementation each op runs")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    i.set_defaults(func=cmd_info)
    b = sub.add_parser("bench", help="time fastlm against its baselines on this machine")
    b.add_argument("--suite", default="all",
                   help="ops, models, peers (fastlm vs CTranslate2 and transformers on CPU, each engine in its own "
                        "process) or all (default; includes peers on CPU when ctranslate2 is installed)")
    b.add_argument("--rounds", type=int, default=None,
                   help="peers: rounds over all engines (default 2 with --suite peers, 1 in all)")
    b.add_argument("--calls", type=int, default=None, help="peers: timed calls per engine process (default 3 / 2)")
    b.add_argument("--threads", type=int, default=2, help="peers: threads per engine (default 2)")
    b.add_argument("--only", default=None, help="one case by name (e.g. attention, bert_fwd)")
    b.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp16 on GPU, fp32 on CPU")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--budget", type=float, default=0.5, help="seconds of timing per provider (default 0.5)")
    b.add_argument("--out", default="bench-results", help="folder for the JSON, markdown and PNGs")
    b.add_argument("--no-plots", action="store_true")
    b.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two JSON results; exit 1 on regressions")
    b.set_defaults(func=cmd_bench)
    g = sub.add_parser("generate", help="generate with GPT-2 and print the text and the latency figures")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local checkpoint directory (with tokenizer files for --prompt)")
    src.add_argument("--config", help=f"random weights of a GPT-2 size: {', '.join(GPT2_SIZES)}")
    pr = g.add_mutually_exclusive_group()
    pr.add_argument("--prompt", help="text (needs the checkpoint's tokenizer)")
    pr.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument("--prompt-len", type=int, default=16, help="random prompt length when no prompt is given")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--do-sample", action="store_true", default=None, help="sample (default: the checkpoint's "
                   "generation config, else greedy)")
    g.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's, else 1.0")
    g.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's, else 0 (off)")
    g.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's, else 1.0 (off)")
    g.add_argument("--min-new-tokens", type=int, default=None, help="no end-of-sequence before this many tokens")
    g.add_argument("--repetition-penalty", type=float, default=None, help="transformers' repetition penalty "
                   "(default: the checkpoint's, else 1.0 = off)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--quantize", default=None, help="passed to fastlm.from_pretrained (int8: weight-only int8 "
                   "decode; int8_dynamic)")
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("embed", help="sentence embeddings of one text per line (the checkpoint's pooling)")
    e.add_argument("input", nargs="?", default="-", help="text file, one text per line (default -: standard input)")
    e.add_argument("--model", required=True, help="checkpoint directory (sentence-transformers or transformers)")
    e.add_argument("--out", help="output file (.npy, or JSON lines with --format jsonl; default standard output)")
    e.add_argument("--format", default="npy", choices=["npy", "jsonl"], help="npy (default) or jsonl: one "
                   "JSON array per line, in input order")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp16 on GPU, fp32 on CPU")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--quantize", default=None, help="passed to fastlm.from_pretrained")
    e.add_argument("--truncate", action="store_true", help="cut texts longer than the model's max length "
                   "(default: such a text is an error)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    e.set_defaults(func=cmd_embed)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
