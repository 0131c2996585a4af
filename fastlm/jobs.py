"""Row-table jobs over files: `fastlm embed | classify | generate ... --output FILE [--ray [ADDRESS]]`.

A job reads an input table (Parquet, JSON lines or one text per line: fastlm.textio.read_table),
runs one of the fastlm.distributed callables over its rows, and writes OUTPUT (.parquet or
.jsonl): every input row once, in input order, with its columns, an id column (the row's 0-based
index in the input, unless the input has one), and the result columns.

Blocks and resuming: the rows are cut into blocks of `block_rows`; each finished block is written
at once to `OUTPUT.parts/part-NNNNNN.arrow` (atomically), next to a manifest naming the input
(path, size, modification time), the job (command, model, options) and the block size. A job
started again with the same input and options (with or without Ray) runs only the blocks that have
no part yet; a different input or options is refused (delete OUTPUT.parts to start over). When
every block is done, OUTPUT is written atomically from the parts in order and OUTPUT.parts is
removed. Every row is checked to arrive exactly once (a duplicate or a missing row raises).

Engines: in-process (one model, `threads` torch threads), or Ray Data (`ray_address`: "local"
starts a local Ray with this machine's CPUs, anything else is passed to ray.init(address=...)):
`workers` actors of `threads` CPUs each, each loading the model once (its directory must be
readable on every node), fed by `ray.data.from_arrow` and `map_batches`, with Ray's own actor
restarts and task retries after a worker dies. A progress bar (tqdm, standard error) shows rows,
rows/s and the time left.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable

from fastlm.textio import InputError, check_output_path, read_table, write_atomic

log = logging.getLogger("fastlm")

TABLE_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl"}
ROW = "_fastlm_row"  # the input row index, carried through the engine (never written)
CALL_ROWS = 256  # rows per call of the callable (Ray Data's map_batches batch_size)
KINDS = ("embed", "classify", "generate")


def _callable(kind: str):
    from fastlm import distributed

    return {"embed": distributed.Embed, "classify": distributed.Classify, "generate": distributed.Generate}[kind]


def check_output(path: str) -> str:
    """The table format of OUTPUT from its suffix; the folder must take a file. InputError otherwise."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"--output {path}: unknown suffix {suffix or '(none)'!r}; a row table is written as "
                         + " or ".join(TABLE_SUFFIXES))
    check_output_path(path)
    return TABLE_SUFFIXES[suffix]


def to_arrow(values):
    """One result column (numpy, as the callables return it) -> a pyarrow Array: a 2-D float array
    -> fixed-size lists (a vector per row), an object array of 1-D arrays -> lists, strs -> string,
    numbers as they are."""
    import numpy as np
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values
    v = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if v.ndim == 2:
        flat = pa.array(np.ascontiguousarray(v).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
    if v.dtype == object and len(v) and isinstance(v[0], np.ndarray):
        return pa.array([x.tolist() for x in v], type=pa.list_(pa.from_numpy_dtype(v[0].dtype)))
    if v.dtype == object:
        return pa.array(v.tolist(), type=pa.string() if all(isinstance(x, str) for x in v) else None)
    return pa.array(v)


def _manifest(input_path: str, kind: str, fn_kwargs: dict, block_rows: int, rows: int, text_field: str) -> dict:
    st = os.stat(input_path)
    return {"input": os.path.abspath(input_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "rows": rows,
            "block_rows": block_rows, "command": kind, "text_field": text_field,
            "options": {k: (os.path.abspath(v) if k == "model" else v) for k, v in sorted(fn_kwargs.items())
                        if k != "num_threads"}}


def _part(parts: str, i: int) -> str:
    return os.path.join(parts, f"part-{i:06d}.arrow")


def _write_part(path: str, table) -> None:
    import pyarrow as pa

    def write(f):
        with pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)

    write_atomic(path, write)


def _read_part(path: str):
    import pyarrow as pa

    with pa.memory_map(path) as src:
        return pa.ipc.open_file(src).read_all()


class _Blocks:
    """Collects result rows per block and writes a block's part when all its rows have come."""

    def __init__(self, table, block_rows: int, parts: str, todo: list[int], vectors: set[str], bar=None):
        self.table, self.block_rows, self.parts, self.bar = table, block_rows, parts, bar
        self.vectors = vectors  # result columns holding one fixed-size vector per row
        self.pending = {i: {} for i in todo}  # block -> {row: {column: value}}
        self.result_names: list[str] | None = None

    def size(self, i: int) -> int:
        return min(self.block_rows, self.table.num_rows - i * self.block_rows)

    def add(self, rows, results: dict) -> None:
        """rows: input row indices (ints); results: column -> sequence, aligned with rows."""
        names = [k for k in results if k not in self.table.column_names and k != ROW]
        if self.result_names is None:
            self.result_names = names
        for r, row in enumerate(rows):
            i = row // self.block_rows
            got = self.pending.get(i)
            if got is None or row in got:
                raise RuntimeError(f"row {row} came twice (or from a block already written): the engine repeated work")
            got[row] = {k: results[k][r] for k in self.result_names}
            if len(got) == self.size(i):
                self._flush(i)
        if self.bar is not None:
            self.bar.update(len(rows))

    def _flush(self, i: int) -> None:
        import numpy as np

        got = self.pending.pop(i)
        start = i * self.block_rows
        block = self.table.slice(start, self.size(i)).drop_columns([ROW])
        for name in self.result_names:
            vals = [got[start + r][name] for r in range(self.size(i))]
            first = vals[0]
            if name in self.vectors:
                col = np.stack(vals)  # (rows, d) -> fixed-size lists
            else:
                col = np.empty(len(vals), dtype=object)
                for j, v in enumerate(vals):  # one by one: equal-length arrays must not become a 2-D array
                    col[j] = v
                if not isinstance(first, (str, np.ndarray)):
                    col = np.asarray(vals)
            block = block.append_column(name, to_arrow(col))
        _write_part(_part(self.parts, i), block)

    def missing(self) -> list[int]:
        return sorted(self.pending)


def _progress(total: int, done: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="rows", desc=desc, dynamic_ncols=True, smoothing=0.1)


def _run_local(fn, table, text_field, id_column, blocks: _Blocks, todo: list[int]) -> None:
    cols = [ROW, text_field] + ([id_column] if id_column in table.column_names and id_column != text_field else [])
    for i in todo:
        start, n = i * blocks.block_rows, blocks.size(i)
        for s in range(start, start + n, CALL_ROWS):
            piece = table.slice(s, min(CALL_ROWS, start + n - s)).select(cols)
            out = fn(piece)
            blocks.add(out[ROW].tolist(), out)


def _user_error(e: BaseException) -> BaseException | None:
    """The ValueError / TypeError a fastlm.distributed callable raised inside a Ray worker, rebuilt
    from the error Ray hands the driver (a RayTaskError / UserCodeException whose text holds the
    worker's traceback), or None when there is none."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = list(re.finditer(r"(ValueError|TypeError): (fastlm\.distributed\.\w+: .*?)(?=\s+The above exception|\n|$)",
                             text, re.S))
    if not found:
        return None
    kind, msg = found[-1].group(1), " ".join(found[-1].group(2).split())
    return ValueError(msg) if kind == "ValueError" else TypeError(msg)


def _run_ray(kind, fn_kwargs, table, text_field, id_column, blocks: _Blocks, todo: list[int], *, address: str,
             workers: int | None, threads: int) -> None:
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray Data: pip install 'fastlm[ray]'") from None
    started = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        if address == "local":
            ray.init(**kw)
        else:
            ray.init(address=address, **kw)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False  # fastlm's bar counts rows; Ray's per-operator bars would interleave
        # the callable's errors come back as exceptions (one line from the CLI), not Ray Data's log lines
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        workers = min(workers, len(todo))  # an actor per block at most: each block is one input of the pool
        cols = [ROW, text_field] + ([id_column] if id_column in table.column_names and id_column != text_field else [])
        pieces = [table.slice(i * blocks.block_rows, blocks.size(i)).select(cols) for i in todo]
        ds = ray.data.from_arrow(pieces)
        ds = ds.map_batches(_callable(kind), fn_constructor_kwargs={**fn_kwargs, "num_threads": None},
                            batch_size=CALL_ROWS, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                blocks.add(batch[ROW].tolist(), batch)
        except Exception as e:
            user = _user_error(e)
            if user is not None:
                raise user from None
            raise
    finally:
        if started:
            ray.shutdown()


def run(kind: str, input_path: str, output: str, fn_kwargs: dict, *, input_format: str = "auto",
        text_field: str = "text", id_column: str = "id", block_rows: int = 10_000, ray_address: str | None = None,
        workers: int | None = None, threads: int | None = None, progress: bool = True,
        on_block: Callable[[int], None] | None = None) -> dict:
    """Runs one job (see the module docstring); returns {"rows", "blocks", "skipped" (blocks
    found done), "output"}. fn_kwargs: the constructor arguments of the kind's fastlm.distributed
    class (model=... included; text_column / id_column are set from text_field / id_column).
    Raises InputError (a ValueError) for a bad input or output, or a parts folder left by a
    different job; ValueError / TypeError from the callable (a row too long, ...) name the row."""
    import pyarrow as pa

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    fmt = check_output(output)
    if input_path == "-":
        raise InputError("a row-table job (--output) reads a file, not standard input: it must be readable again "
                         "to resume")
    table = read_table(input_path, fmt=input_format, field=text_field)
    n = table.num_rows
    if id_column not in table.column_names:
        table = table.append_column(id_column, pa.array(range(n), pa.int64()))
    table = table.append_column(ROW, pa.array(range(n), pa.int64()))
    fn_kwargs = {**fn_kwargs, "text_column": text_field, "id_column": id_column}
    n_blocks = math.ceil(n / block_rows)
    parts = output + ".parts"
    manifest = _manifest(input_path, kind, {k: v for k, v in fn_kwargs.items()}, block_rows, n, text_field)
    mpath = os.path.join(parts, "manifest.json")
    has_parts = os.path.isdir(parts) and any(f.startswith("part-") for f in os.listdir(parts))
    if has_parts:  # resume only the same job: same input (path, size, time), options and blocks
        try:
            with open(mpath) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise InputError(f"{parts} holds the blocks of a different job ({', '.join(diff)} differ); delete it to "
                             "start over, or run the same command on the same input to resume")
    else:
        os.makedirs(parts, exist_ok=True)
        data = json.dumps(manifest, indent=1).encode()
        write_atomic(mpath, lambda f: f.write(data))
    todo = [i for i in range(n_blocks) if not os.path.exists(_part(parts, i))]
    done_rows = n - sum(min(block_rows, n - i * block_rows) for i in todo)
    if len(todo) < n_blocks:
        log.info("%s: resuming: %d of %d blocks already done", output, n_blocks - len(todo), n_blocks)
    fn = None
    if todo and not ray_address:  # the model loads before the bar starts: rows/s counts the work alone
        fn = _callable(kind)(**{**fn_kwargs, "num_threads": threads})
    bar = _progress(n, done_rows, progress, f"fastlm {kind}" + (" (ray)" if ray_address else ""))
    vectors = {fn_kwargs.get("output_column", "embedding")} if kind == "embed" else set()
    if kind == "classify" and fn_kwargs.get("scores_column"):
        vectors = {fn_kwargs["scores_column"]}
    blocks = _Blocks(table, block_rows, parts, todo, vectors, bar)
    if on_block is not None:  # a test hook: called with each block index as its part is written
        flush = blocks._flush

        def _flush(i):
            flush(i)
            on_block(i)

        blocks._flush = _flush
    try:
        if todo:
            if ray_address:
                _run_ray(kind, fn_kwargs, table, text_field, id_column, blocks, todo, address=ray_address,
                         workers=workers, threads=threads or 1)
            else:
                _run_local(fn, table, text_field, id_column, blocks, todo)
    finally:
        if bar is not None:
            bar.close()
    if blocks.missing():
        raise RuntimeError(f"blocks {blocks.missing()[:5]} got no rows back from the engine")
    _assemble(parts, n_blocks, output, fmt)
    shutil.rmtree(parts)
    return {"rows": n, "blocks": n_blocks, "skipped": n_blocks - len(todo), "output": output}


def _assemble(parts: str, n_blocks: int, output: str, fmt: str) -> None:
    """OUTPUT from the parts, in block order, written atomically."""
    import pyarrow.parquet as pq

    if fmt == "parquet":
        def write(f):
            writer = None
            try:
                for i in range(n_blocks):
                    t = _read_part(_part(parts, i))
                    if writer is None:
                        writer = pq.ParquetWriter(f, t.schema)
                    writer.write_table(t.cast(writer.schema))
            finally:
                if writer is not None:
                    writer.close()
    else:
        def write(f):
            for i in range(n_blocks):
                t = _read_part(_part(parts, i))
                for batch in t.to_batches(max_chunksize=4096):
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch.to_pylist()).encode())

    write_atomic(output, write)


def read_output(path: str):
    """A job's OUTPUT as a pyarrow Table (Parquet or JSON lines)."""
    import pyarrow as pa

    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path)
    with open(path, encoding="utf-8") as f:
        return pa.Table.from_pylist([json.loads(line) for line in f if line.strip()])
