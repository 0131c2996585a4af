"""fastlm's command line: `fastlm info`, `fastlm bench`, `fastlm generate`, `fastlm embed`,
`fastlm classify`, `fastlm serve` (also `python -m fastlm`). embed / classify / generate also run
row-table jobs over Parquet or JSON lines files (`--output`), in-process or on Ray Data (`--ray`):
fastlm.jobs."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

# `python -m fastlm` has imported the package (and torch) already: these cost nothing here.
from fastlm._checks import model_dtype
from fastlm.embed import PRECISIONS
from fastlm.textio import INPUT_FORMATS, OUTPUT_SUFFIXES

DTYPE_CHOICES = ("bf16", "fp16", "fp32")  # the short forms of _checks.DTYPE_NAMES the CLI offers


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
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    from fastlm.bench import plots, report, runner
    from fastlm.bench.peers.suite import peer_cases
    from fastlm.bench.result import format_value, save_json
    from fastlm.textio import write_atomic

    if args.compare:
        return _compare(*args.compare)
    if args.suite == "serve":  # servers in their own processes under a load generator: its own table
        from rich.markdown import Markdown

        from fastlm.bench import serve as serve_bench

        if args.soak_requests is not None and args.soak_requests < 0:
            raise UsageError(f"--soak-requests must be >= 0, got {args.soak_requests}")
        if not args.name or args.name in (".", "..") or os.sep in args.name:
            raise UsageError(f"--name must be a plain file name (NAME.json / .md / .png in --out), got {args.name!r}")
        _, md = serve_bench.run(args.out, threads=args.threads, quick=args.quick, soak_requests=args.soak_requests,
                                name=args.name)
        _console().print(Markdown(md))
        print(f"wrote {os.path.join(args.out, args.name)}.json, .md and .png")
        return 0
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("fastlm bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("fp16" if device == "cuda" else "fp32")
    dtype = model_dtype("fastlm bench", dtype_name)
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
                         calls=args.calls, threads=args.threads, isa=args.isa)
    c = res.ceilings
    table = Table(title=f"fastlm bench: {res.env.get('gpu') or 'CPU (' + str(res.env['cpu_threads']) + ' threads)'}, "
                        f"{dtype_name} | DRAM copy {format_value(c.copy_gbs, 'GB/s')}, {c.matmul_dtype} matmul "
                        f"{format_value(c.matmul_tflops, 'TFLOP/s')} (best calls)")
    for col in ("case", "shape", "provider", "ms", "min / max ms", "value", "% ceiling", "vs fastlm"):
        table.add_column(col, justify="left" if col in ("case", "shape", "provider") else "right")
    sp = report.speedups(res)
    notes: list[str] = []
    for r in res.rows:
        if r.status != "ok":
            table.add_row(r.case, r.label, r.provider, "-", "-", "-", "-", f"[dim]{escape(r.status)}[/dim]")
            continue
        rel = sp.get((r.case, r.label), {}).get(r.provider)
        table.add_row(r.case, r.label, r.provider, f"{r.ms:.3f}", report.spread(r)[0], format_value(r.value, r.unit),
                      escape(report.pct_cell(r, notes)), f"fastlm {rel:.2f}x" if rel else "")
    con.print(table)
    for i, n in enumerate(notes, 1):  # escaped: "[peers]" and "[1]" are text, not rich markup
        con.print(f"[dim]{escape(f'n/a [{i}]: {n}')}[/dim]", highlight=False)
    for line in report.skipped_peers_lines(res.env):
        con.print(f"[yellow]{escape(line)}[/yellow]", highlight=False)
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    jpath = os.path.join(out_dir, f"bench-{device}-{stamp}.json")
    save_json(res, jpath)  # every file atomically: Ctrl-C leaves the old file or none, never half of one
    md = report.markdown(res).encode()
    write_atomic(os.path.join(out_dir, f"bench-{device}.md"), lambda f: f.write(md))
    if os.path.exists(os.path.join(out_dir, f"bench-{device}-partial.json")):
        os.remove(os.path.join(out_dir, f"bench-{device}-partial.json"))
    pngs = [] if args.no_plots else plots.plot(res, out_dir)
    con.print(f"wrote {jpath}" + (f" and {len(pngs)} plot(s) in {out_dir}" if pngs else ""))
    return 0


def _compare(old_path: str, new_path: str) -> int:
    """Two saved results side by side. A file that is missing, not JSON or not a bench result, or two
    files with no row measured in both, raise (FileNotFoundError / ValueError from load_json /
    compare): main() prints one line and exits 2. A row that failed in NEW counts as a regression."""
    from rich.markup import escape
    from rich.table import Table

    from fastlm.bench.report import compare
    from fastlm.bench.result import load_json

    rows = compare(load_json(old_path), load_json(new_path))
    t = Table(title=f"{old_path} -> {new_path}")
    for col in ("case", "shape", "provider", "old ms", "new ms", "new/old"):
        t.add_column(col)
    for r in rows:
        style = "red" if r["regression"] else ""
        if r["new_ms"] is None:  # measured in OLD, failed in NEW
            t.add_row(r["case"], r["label"], r["provider"], f"{r['old_ms']:.3f}", "-",
                      f"[red]{escape(r['status'])}[/red]")
            continue
        t.add_row(r["case"], r["label"], r["provider"], f"{r['old_ms']:.3f}", f"{r['new_ms']:.3f}",
                  f"[{style}]{r['ratio']:.2f}[/{style}]" if style else f"{r['ratio']:.2f}")
    _console().print(t)
    n = sum(r["regression"] for r in rows)
    _console().print(f"{n} regression(s) (over 5% slower, or failed)" if n else "no regressions over 5%")
    return 1 if n else 0


GPT2_SIZES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-tiny": dict(n_embd=128, n_layer=2, n_head=2),
}


def _stream_text(tok):
    """Print one sequence's tokens as they come: the decoded text grows; an incomplete UTF-8
    character (a trailing U+FFFD) waits for the next token."""
    ids, shown = [], ""

    def add(token: int) -> None:
        nonlocal shown
        ids.append(token)
        text = tok.decode(ids) if tok is not None else " ".join(map(str, ids))
        if tok is not None and text.endswith("\ufffd"):
            return
        if text.startswith(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    return add


def cmd_generate(args) -> int:
    import time

    import torch
    from rich.markup import escape

    import fastlm
    from fastlm import textio

    if args.prompts_file is not None and args.model is None:
        raise UsageError("--prompts-file needs --model DIR with the checkpoint's tokenizer files")
    if args.output is not None or args.ray is not None:
        if args.prompts_file is None:
            raise UsageError("--output / --ray run a row-table job over --prompts-file")
        if args.stream or args.batch != 1:
            raise UsageError("--stream and --batch are not options of a row-table job (--output)")
        fn_kwargs = dict(model=args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         min_new_tokens=args.min_new_tokens, repetition_penalty=args.repetition_penalty,
                         seed=args.seed, quantize=args.quantize, device=_device(args), dtype=args.dtype,
                         truncate=args.truncate)
        return _run_job("generate", args, args.prompts_file, fn_kwargs)
    if args.prompts_file is not None and args.batch != 1:
        raise UsageError("--batch repeats one prompt; with --prompts-file the batch is one row per prompt")
    prompts = None
    if args.prompts_file is not None:  # read (and check) the prompts before the model loads
        prompts = textio.read_texts(args.prompts_file, fmt=args.input_format, field=args.text_field)
    n_seq = len(prompts) if prompts is not None else args.batch
    if args.stream and n_seq != 1:
        raise UsageError(f"--stream prints one sequence as it is made; got {n_seq} ("
                         + ("one per prompt in --prompts-file" if prompts is not None else "--batch") + ")")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = model_dtype("fastlm generate", args.dtype or ("fp16" if device == "cuda" else "fp32"))
    tok = None
    if args.model:
        model = fastlm.from_pretrained(args.model, dtype=dtype, device=device, quantize=args.quantize)
        from fastlm.embed import TOKENIZER_FILES, has_tokenizer_files

        try:  # without vocabulary files transformers 5 builds an empty tokenizer: ask for the files first
            if not has_tokenizer_files(args.model):
                raise FileNotFoundError(f"none of {', '.join(TOKENIZER_FILES)}")
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        except Exception as e:  # no tokenizer files: token ids only
            if args.prompt is not None or prompts is not None:
                what = "--prompt" if args.prompt is not None else "--prompts-file"
                why = str(e) if isinstance(e, FileNotFoundError) else type(e).__name__
                raise UsageError(f"no tokenizer in {args.model} ({why}) for {what}; "
                                 "use --prompt-ids") from None
    else:
        from transformers import GPT2Config

        if args.config not in GPT2_SIZES:
            raise UsageError(f"--config must be one of {', '.join(GPT2_SIZES)}")
        model = fastlm.from_pretrained(GPT2Config(**GPT2_SIZES[args.config]), dtype=dtype, device=device,
                                       quantize=args.quantize)
    if not isinstance(model, fastlm.GPT2LMHeadModel):
        raise UsageError("the model is not a GPT-2 language model")
    mask = None
    if prompts is not None:  # one row per prompt, left-padded (generate takes either padding side)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        ids, mask = enc.input_ids, enc.attention_mask
        if ids.shape[1] == 0 or bool((mask.sum(1) == 0).any()):
            raise UsageError(f"{args.prompts_file}: a prompt has no tokens (empty line?)")
    elif args.prompt is not None:
        ids = tok(args.prompt, return_tensors="pt").input_ids.expand(args.batch, -1)
    elif args.prompt_ids:
        try:
            ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]]).expand(args.batch, -1)
        except ValueError:
            raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=g).expand(args.batch, -1)
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    # options left unset (None) take the checkpoint's generation defaults (eos, pad, sampling, ...)
    kw = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
          "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "min_new_tokens": args.min_new_tokens,
          "repetition_penalty": args.repetition_penalty}
    list(model.stream(ids, mask, **{**kw, "max_new_tokens": 2}))  # warm-up: JIT, cache, CUDA graph
    con = _console()
    show = _stream_text(tok) if args.stream else None
    t0 = time.perf_counter()
    times, steps = [], []
    for new in model.stream(ids, mask, **kw):
        times.append(time.perf_counter())
        steps.append(new)
        if show is not None:
            show(int(new[0]))
    out = torch.stack(steps, 1)
    if show is not None:
        sys.stdout.write("\n")
    else:
        rows = len(prompts) if prompts is not None else min(args.batch, 4)
        for b in range(rows):
            text = tok.decode(out[b]) if tok is not None else " ".join(map(str, out[b].tolist()))
            con.print(f"[bold]{b}[/bold] {escape(text)}", highlight=False)
    ttft = (times[0] - t0) * 1e3
    per_tok = (times[-1] - times[0]) / max(1, len(times) - 1) * 1e3
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    con.print(f"{where}, {str(dtype)[6:]}, batch {ids.shape[0]}, prompt {ids.shape[1]}, {len(times)} new tokens: "
              f"time to first token {ttft:.1f} ms, {per_tok:.2f} ms/token, "
              f"{ids.shape[0] * (len(times) - 1) / max(times[-1] - times[0], 1e-9):.1f} tok/s (decode)")
    return 0


def _add_job_args(p, what: str) -> None:
    """The row-table job options (fastlm.jobs) of embed / classify / generate."""
    j = p.add_argument_group("row-table jobs (Parquet / JSON lines in and out, resumable, in-process or on Ray)")
    j.add_argument("--output", default=None, help="write a row table (.parquet or .jsonl): every input row once, in "
                   "order, with its columns, an id column and " + what + "; finished blocks are kept in OUTPUT.parts "
                   "and a rerun of the same command resumes from them")
    j.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the job on Ray Data: a local Ray when no ADDRESS is given, else ray.init(address=ADDRESS) "
                   "(e.g. auto, ray://head:10001); needs --output and pip install 'fastlm[ray]'")
    j.add_argument("--workers", type=int, default=None, help="--ray: model actors (default: the cluster's CPUs / "
                   "--threads)")
    j.add_argument("--threads", type=int, default=None, help="CPU threads per worker (--ray: the actor's num_cpus, "
                   "default 1; in-process: default torch's)")
    j.add_argument("--block-rows", type=int, default=10_000, help="rows per resumable block (default 10000)")
    j.add_argument("--id-column", default="id", help='the id column (default "id"; added as the 0-based row index '
                   "when the input has none)")


def _run_job(kind: str, args, src: str, fn_kwargs: dict) -> int:
    import time

    from fastlm import jobs

    if args.ray is not None and args.output is None:
        raise UsageError("--ray runs a row-table job: give --output FILE.parquet or FILE.jsonl")
    if args.workers is not None and args.ray is None:
        raise UsageError("--workers is the number of Ray actors: it needs --ray")
    t0 = time.perf_counter()
    res = jobs.run(kind, src, args.output, fn_kwargs, input_format=args.input_format, text_field=args.text_field,
                   id_column=args.id_column, block_rows=args.block_rows, ray_address=args.ray, workers=args.workers,
                   threads=args.threads, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    ran = res["rows"] if not res["skipped"] else None
    print(f"fastlm {kind}: {res['rows']} rows in {res['blocks']} blocks"
          + (f" ({res['skipped']} found done)" if res["skipped"] else "")
          + f" -> {res['output']} in {dt:.1f} s" + (f" ({ran / dt:.1f} rows/s)" if ran else "")
          + (f" on Ray ({args.ray})" if args.ray else ""), file=sys.stderr)
    return 0


def _device(args):
    return None if args.device == "auto" else args.device


def cmd_classify(args) -> int:
    if args.output is None:
        raise UsageError("classify writes a row table: give --output FILE.parquet or FILE.jsonl")
    fn_kwargs = dict(model=args.model, batch_size=args.batch_size, quantize=args.quantize, device=_device(args),
                     dtype=args.dtype, truncate=args.truncate, max_length=args.max_length,
                     scores_column="scores" if args.all_scores else None)
    return _run_job("classify", args, args.input, fn_kwargs)


def cmd_embed(args) -> int:
    import fastlm
    from fastlm import textio

    if args.output is not None or args.ray is not None:
        if args.out is not None or args.format is not None:
            raise UsageError("--out / --format write vectors only; --output writes the row table: give one of them")
        if args.pooling is not None or args.precision != "float32":
            raise UsageError("--pooling and --precision are not options of a row-table job (--output)")
        fn_kwargs = dict(model=args.model, batch_size=args.batch_size, quantize=args.quantize, device=_device(args),
                         dtype=args.dtype, truncate=args.truncate, normalize=args.normalize,
                         max_length=args.max_length, prompt=args.prompt, prompt_name=args.prompt_name)
        return _run_job("embed", args, args.input, fn_kwargs)

    # everything about the files first: a bad output path or input fails before the model loads
    if args.out:
        textio.check_output_path(args.out)
    fmt = textio.output_format(args.out, args.format)
    texts = textio.read_texts(args.input, fmt=args.input_format, field=args.text_field)
    device = None if args.device == "auto" else args.device
    pooling = None if args.pooling is None else tuple(m.strip() for m in args.pooling.split(","))
    emb = fastlm.Embedder(args.model, device=device, dtype=args.dtype, quantize=args.quantize,
                          truncate=args.truncate, pooling=pooling, normalize=args.normalize,
                          max_length=args.max_length)
    vecs = emb.encode(texts, batch_size=args.batch_size, show_progress_bar=not args.no_progress,
                      prompt=args.prompt, prompt_name=args.prompt_name, precision=args.precision,
                      convert_to_numpy=True)  # (N, d): float32, or int8 / uint8 for --precision
    data = textio.vectors_bytes(vecs, fmt)
    if args.out:
        textio.write_atomic(args.out, lambda f: f.write(data))
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    print(f"fastlm embed: {len(texts)} texts -> {vecs.shape[1]}-d {vecs.dtype} vectors"
          + (f" in {args.out}" if args.out else ""), file=sys.stderr)
    return 0


class UsageError(Exception):
    """A command-line mistake: one line on standard error, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line (usage: `fastlm CMD --help`), exit status 2."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from fastlm import __version__
    from fastlm.embed import POOLING_MODES

    p = _Parser(prog="fastlm", description="Fast BERT and GPT-2 inference",
                epilog="Errors print one line on standard error and exit with status 2 (1 for an internal error, "
                       "130 on Ctrl-C); FASTLM_DEBUG=1 shows tracebacks.")
    p.add_argument("--version", action="version", version=f"fastlm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    i = sub.add_parser("info", help="versions, GPU, fastlm._C, and which implementation each op runs")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    i.set_defaults(func=cmd_info)
    b = sub.add_parser("bench", help="time fastlm against its baselines on this machine")
    b.add_argument("--suite", default="all",
                   help="ops, models, peers (fastlm vs CTranslate2 and transformers on CPU, each engine in its own "
                        "process), all (default: ops and models; the peers run apart with --suite peers) or serve "
                        "(fastlm serve under load vs sentence-transformers behind FastAPI; docs/serve.md)")
    b.add_argument("--quick", action="store_true", help="serve: a short run (smaller loads)")
    b.add_argument("--soak-requests", type=int, default=None,
                   help="serve: requests of the soak per task (default 2000, 100 with --quick; 0: no soak)")
    b.add_argument("--name", default="serve-bench", help="serve: the files' name, NAME.json / .md / .png")
    b.add_argument("--rounds", type=int, default=None,
                   help="peers: rounds over all engines (default 2 with --suite peers, 1 in all)")
    b.add_argument("--calls", type=int, default=None, help="peers: timed calls per engine process (default 3 / 2)")
    b.add_argument("--threads", type=int, default=2, help="peers: threads per engine (default 2)")
    b.add_argument("--isa", default=None, choices=["avx2"],
                   help="peers: cap every engine's kernels at this ISA as far as it can be (fastlm and torch: "
                        "FASTLM_CPU_ISA / ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY, CTranslate2: CT2_FORCE_CPU_ISA; "
                        "the table's header says which engines cannot be capped), to stand in for an AVX2-only CPU")
    b.add_argument("--only", default=None, help="one case by name (e.g. attention, bert_fwd)")
    b.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="default fp16 on GPU, fp32 on CPU")
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
    pr.add_argument("--prompts-file", help="one prompt per line (split at \\n only, a trailing \\r removed), or "
                    'JSON lines with a "text" field (*.jsonl): one sequence per prompt, printed in order')
    g.add_argument("--input-format", default="auto", choices=INPUT_FORMATS,
                   help="--prompts-file format (auto: jsonl for *.jsonl, else one prompt per line)")
    g.add_argument("--text-field", default="text", help='--prompts-file JSON lines field (default "text")')
    g.add_argument("--stream", action="store_true", help="print the text as it is generated (one sequence)")
    g.add_argument("--prompt-len", type=int, default=16, help="random prompt length when no prompt is given")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the checkpoint's max_new_tokens / max_length, else 20 new tokens (transformers)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--dtype", default=None, choices=DTYPE_CHOICES)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--do-sample", action="store_true", default=None, help="sample (default: the checkpoint's "
                   "generation config, else greedy)")
    g.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's, else 1.0")
    g.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's, else 50 (transformers; 0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's, else 1.0 (off)")
    g.add_argument("--min-new-tokens", type=int, default=None, help="no end-of-sequence before this many tokens")
    g.add_argument("--repetition-penalty", type=float, default=None, help="transformers' repetition penalty "
                   "(default: the checkpoint's, else 1.0 = off)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--quantize", default=None, help="passed to fastlm.from_pretrained (int8: weight-only int8 "
                   "decode; int8_dynamic)")
    g.add_argument("--batch-size", type=int, default=16, help="--output: prompts per generate call (default 16)")
    g.add_argument("--truncate", action="store_true", help="--output: keep the last tokens of a prompt too long for "
                   "the model's positions (default: such a prompt is an error)")
    g.add_argument("--no-progress", action="store_true", help="--output: no progress bar on standard error")
    _add_job_args(g, "the generated text and token ids (generated_text, generated_token_ids)")
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("embed", help="sentence embeddings of one text per line (the checkpoint's pooling)",
                       description="Sentence embeddings, one row per input text, in input order. Input: one text "
                       "per line (split at \\n only; a trailing \\r is removed; blank lines are empty texts), or "
                       "JSON lines with a \"text\" field (*.jsonl or --input-format jsonl) for texts that hold "
                       "line breaks. Output: the format follows the --out suffix (.npy, .json, .jsonl), written "
                       "atomically; without --out, JSON lines on standard output.")
    e.add_argument("input", nargs="?", default="-", help="text file (default -: standard input)")
    e.add_argument("--model", required=True, help="checkpoint directory (sentence-transformers or transformers)")
    e.add_argument("--out", help="output file: .npy, .json (one array of rows) or .jsonl (one array per line); "
                   "checked before the model loads (default: JSON lines on standard output)")
    e.add_argument("--format", default=None, choices=sorted(set(OUTPUT_SUFFIXES.values())),
                   help="output format (default: from the --out suffix; jsonl on standard output)")
    e.add_argument("--input-format", default="auto", choices=INPUT_FORMATS, help="auto (default): "
                   "jsonl for *.jsonl files, else one text per line")
    e.add_argument("--text-field", default="text", help='the JSON lines field holding the text (default "text")')
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--pooling", default=None, help="override the checkpoint's pooling: " + ", ".join(POOLING_MODES)
                   + " (comma-separated modes are concatenated)")
    e.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise the vectors, or not (default: the checkpoint's Normalize module)")
    e.add_argument("--max-length", type=int, default=None, help="the longest text in tokens (default: the "
                   "checkpoint's max_seq_length, else the model's positions)")
    e.add_argument("--prompt", default=None, help="text prepended to every input (sentence-transformers' prompt)")
    e.add_argument("--prompt-name", default=None, help="one of the checkpoint's saved prompts, by name")
    e.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="output precision, as sentence-transformers' quantize_embeddings (default float32)")
    e.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="default fp16 on GPU, fp32 on CPU")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--quantize", default=None, help="passed to fastlm.from_pretrained")
    e.add_argument("--truncate", action="store_true", help="cut texts longer than --max-length "
                   "(default: such a text is an error)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    _add_job_args(e, "the vector (an embedding column of float32 lists)")
    e.set_defaults(func=cmd_embed)
    s = sub.add_parser("serve", help="serve one model over HTTP: OpenAI /v1 routes, TEI routes, /health /metrics "
                       "(docs/serve.md; needs fastlm[serve])")
    s.add_argument("--model", required=True, help="checkpoint directory (its task comes from config.architectures / "
                   "the sentence-transformers files)")
    s.add_argument("--task", default=None, choices=["embed", "classify", "rerank", "generate"],
                   help="override the task read from the checkpoint")
    s.add_argument("--served-model-name", default=None, help="the model name of /v1 routes (default: --model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="default fp16 on GPU, fp32 on CPU")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--quantize", default=None, help="passed to fastlm.from_pretrained (int8, int8_dynamic)")
    s.add_argument("--max-concurrent-requests", type=int, default=512, help="requests in flight before 429")
    s.add_argument("--max-batch-tokens", type=int, default=16384, help="encoders: padded tokens per batch")
    s.add_argument("--max-batch-requests", type=int, default=64, help="encoders: sequences per batch")
    s.add_argument("--max-client-batch-size", type=int, default=32, help="inputs in one request (more: 413)")
    s.add_argument("--max-num-seqs", type=int, default=32, help="generation: sequences decoded together (KV slots)")
    s.add_argument("--max-model-len", type=int, default=None, help="generation: KV cache positions per slot "
                   "(default: the model's positions)")
    s.add_argument("--max-prefill-tokens", type=int, default=2048, help="generation: prompt tokens prefilled "
                   "between two decode steps")
    s.add_argument("--payload-limit", type=int, default=2_000_000, help="largest request body in bytes (more: 413)")
    s.add_argument("--tokenization-workers", type=int, default=2)
    s.add_argument("--request-timeout", type=float, default=None, help="seconds before a request fails with 408")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in "
                   "flight before aborting them")
    s.add_argument("--api-key", default=os.environ.get("FASTLM_API_KEY"), help="require 'Authorization: Bearer "
                   "KEY' on every route but /health (default: $FASTLM_API_KEY)")
    s.add_argument("--cors-allow-origin", action="append", default=[], help="allow this origin (repeatable; * for any)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("classify", help="label and score of each text with a *ForSequenceClassification checkpoint",
                       description="Sequence classification of each row's text, written as a row table (--output "
                       "FILE.parquet or FILE.jsonl): the input's columns, an id column, label (config.id2label) and "
                       "score (its probability: softmax, or sigmoid for multi-label / single-logit models). Input: "
                       "Parquet, JSON lines or one text per line. In-process, or on Ray Data with --ray.")
    c.add_argument("input", help="input file: .parquet, .jsonl, or one text per line")
    c.add_argument("--model", required=True, help="checkpoint directory (*ForSequenceClassification, with tokenizer)")
    c.add_argument("--input-format", default="auto", choices=INPUT_FORMATS, help="auto (default): from the suffix")
    c.add_argument("--text-field", default="text", help='the column holding the text (default "text")')
    c.add_argument("--batch-size", type=int, default=32, help="texts per forward (default 32)")
    c.add_argument("--max-length", type=int, default=None, help="the longest text in tokens (default: the "
                   "tokenizer's, capped at the model's positions)")
    c.add_argument("--truncate", action="store_true", help="cut texts longer than --max-length (default: an error)")
    c.add_argument("--all-scores", action="store_true", help="also write every class's probability (scores)")
    c.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="default fp16 on GPU, fp32 on CPU")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    c.add_argument("--quantize", default=None, help="passed to fastlm.from_pretrained")
    c.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    _add_job_args(c, "label and score")
    c.set_defaults(func=cmd_classify)
    return p


def cmd_serve(args) -> int:
    import logging

    try:
        from fastlm.serve.app import ServeConfig, serve
    except ImportError as e:
        raise UsageError(f"needs the serve extra: pip install 'fastlm[serve]' ({e})") from None
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    for flag in ("max_concurrent_requests", "max_batch_tokens", "max_batch_requests", "max_client_batch_size",
                 "max_num_seqs", "max_prefill_tokens", "payload_limit", "tokenization_workers"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if "OMP_WAIT_POLICY" not in os.environ and sys.platform.startswith("linux"):
        # OpenMP's threads sleep between parallel regions instead of spinning: the server's own threads (the
        # event loop, the tokenizers) share the cores with them, and spinning threads on a busy machine cost
        # 2-3x the CPU per MiniLM sentence (docs/serve.md). libgomp reads the variable once, when torch
        # loads: start again with it set (same process id). Set OMP_WAIT_POLICY yourself to keep another.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "fastlm", *args.argv])
    import torch

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ServeConfig(model=args.model, task=args.task, served_model_name=args.served_model_name, host=args.host,
                      port=args.port, device=device,
                      dtype=None if args.dtype is None else model_dtype("fastlm serve", args.dtype),
                      quantize=args.quantize, max_concurrent_requests=args.max_concurrent_requests,
                      max_batch_tokens=args.max_batch_tokens, max_batch_requests=args.max_batch_requests,
                      max_client_batch_size=args.max_client_batch_size, max_num_seqs=args.max_num_seqs,
                      max_model_len=args.max_model_len, max_prefill_tokens=args.max_prefill_tokens,
                      payload_limit=args.payload_limit, tokenization_workers=args.tokenization_workers,
                      request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout,
                      api_key=args.api_key, cors_allow_origin=tuple(args.cors_allow_origin),
                      log_level=args.log_level)
    return serve(cfg)


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"missing key {e}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def main(argv=None) -> int:
    """The `fastlm` command. Returns the exit status: 0, 2 for a usage or input error (one line on
    standard error), 1 for an internal error (one line; FASTLM_DEBUG=1 raises it), 130 on Ctrl-C."""
    command = "fastlm"
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        command = f"fastlm {args.command}"
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastlm embed ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (UsageError, ValueError, TypeError, OSError, KeyError) as e:
        if os.environ.get("FASTLM_DEBUG"):
            raise
        print(_one_line(f"{command}: {_message(e)}"), file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, the traceback on request
        if os.environ.get("FASTLM_DEBUG"):
            raise
        print(_one_line(f"{command}: internal error: {type(e).__name__}: {e} (FASTLM_DEBUG=1 shows the "
                        "traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
