"""The CLI's input and output files: texts in (one per line, or JSON lines), vectors out (.npy,
.json, .jsonl), written atomically.

Input, one text per record:

- lines (any file but *.jsonl, and standard input): the text is split at "\\n" only, one text per
  line, a trailing "\\r" (Windows line ends) and a UTF-8 byte order mark removed; a last line
  without "\\n" counts, blank lines are (empty) texts. Unlike str.splitlines, a form feed, U+2028,
  U+0085 or \\x1c inside a line does not split it: row i of the output is line i of the input.
- jsonl (*.jsonl, or --input-format jsonl): one JSON object per non-blank line with a string field
  (`text` by default), or a bare JSON string. The robust choice for texts that hold line breaks.
- parquet (*.parquet, or --input-format parquet): a string column (`text` by default) of a Parquet
  file (read with pyarrow, `pip install 'fastlm[ray]'`).

Tables (`read_table`, for the row-table jobs of fastlm.jobs): the same three formats read as a
pyarrow Table with every column of the input (a lines file gives one column), the text column
checked (present, strings, no nulls) before any work.

Output, chosen from the file's suffix: .npy (numpy, the embeddings' own dtype), .json (one JSON
array of rows), .jsonl (one JSON array per line, in input order). Another suffix is refused
before any work. Files are written to a temporary file in the same folder and renamed onto the
name when complete, so an error or Ctrl-C never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

OUTPUT_SUFFIXES = {".npy": "npy", ".json": "json", ".jsonl": "jsonl"}
INPUT_FORMATS = ("auto", "lines", "jsonl", "parquet")


class InputError(ValueError):
    """A file the CLI was given cannot be used (the message names it and says why)."""


def _name(src: str) -> str:
    return "standard input" if src == "-" else src


def split_lines(data: str) -> list[str]:
    """Text -> its lines: split at "\\n" only, one trailing "\\r" per line removed, a final line
    ending not producing an empty last line."""
    if data.startswith("\ufeff"):
        data = data[1:]
    if not data:
        return []
    lines = data.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def input_format(src: str, fmt: str = "auto") -> str:
    if fmt not in INPUT_FORMATS:
        raise InputError(f"input format must be one of {', '.join(INPUT_FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    if src != "-" and src.lower().endswith(".jsonl"):
        return "jsonl"
    if src != "-" and src.lower().endswith(".parquet"):
        return "parquet"
    return "lines"


def _read_text(src: str, stdin=None) -> str:
    """The whole of file `src` (or "-": standard input, `stdin` if given) as text. Raises InputError
    naming it for a directory or bytes that are not UTF-8; OSError where it cannot be opened."""
    if src == "-":
        import sys

        raw = (stdin or sys.stdin.buffer).read()
    else:
        if os.path.isdir(src):
            raise InputError(f"{src} is a directory, not a text file")
        with open(src, "rb") as f:
            raw = f.read()
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise InputError(f"{_name(src)} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


def read_texts(src: str, *, fmt: str = "auto", field: str = "text", stdin=None) -> list[str]:
    """The texts of a file (or "-": standard input) as the module docstring describes.

    Raises InputError (a ValueError) naming the file (and line) for an empty input, text that is
    not UTF-8, or a JSON line without the field; OSError for a file that cannot be opened."""
    fmt = input_format(src, fmt)
    if fmt == "parquet":
        return read_table(src, fmt=fmt, field=field).column(field).to_pylist()
    data = _read_text(src, stdin)
    if fmt == "lines":
        texts = split_lines(data)
    else:
        texts = []
        for i, line in enumerate(split_lines(data), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{_name(src)} line {i}: not JSON ({e.msg}); JSON lines input needs one object "
                                 f'per line, like {{"{field}": "..."}}') from None
            text = rec.get(field) if isinstance(rec, dict) else rec
            if not isinstance(text, str):
                raise InputError(f'{_name(src)} line {i}: expected a JSON object with a string "{field}" field '
                                 f"(or a JSON string), got {line[:60]!r}")
            texts.append(text)
    if not texts:
        raise InputError(f"{_name(src)} is empty: no text to read ("
                         + ("one text per line)" if fmt == "lines" else f'one JSON object with "{field}" per line)'))
    return texts


def _pyarrow(what: str):
    try:
        import pyarrow
    except ImportError:
        raise InputError(f"{what} needs pyarrow: pip install 'fastlm[ray]' (or pyarrow)") from None
    return pyarrow


def read_table(src: str, *, fmt: str = "auto", field: str = "text", stdin=None):
    """The rows of a file as a pyarrow Table: parquet as stored; jsonl one row per non-blank line
    (a JSON object's fields are the columns; a bare JSON string fills `field`); lines one column
    `field`. Raises InputError (a ValueError) naming the file for an empty input, a missing
    `field` column, a `field` that is not a string column, or a null in it (naming its row), so no
    row is dropped silently; OSError for a file that cannot be opened."""
    pa = _pyarrow("reading a table")
    fmt = input_format(src, fmt)
    if fmt == "parquet":
        if src == "-":
            raise InputError("Parquet input must be a file, not standard input")
        if os.path.isdir(src):
            raise InputError(f"{src} is a directory, not a Parquet file")
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(src)
        except pa.ArrowInvalid as e:
            raise InputError(f"{src} is not a Parquet file ({e})") from None
    elif fmt == "lines":
        table = pa.table({field: pa.array(read_texts(src, fmt="lines", stdin=stdin), pa.string())})
    else:
        data = _read_text(src, stdin)
        rows = []
        for i, line in enumerate(split_lines(data), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{_name(src)} line {i}: not JSON ({e.msg}); JSON lines input needs one object "
                                 f'per line, like {{"{field}": "..."}}') from None
            if isinstance(rec, str):
                rec = {field: rec}
            if not isinstance(rec, dict):
                raise InputError(f"{_name(src)} line {i}: expected a JSON object or string, got {line[:60]!r}")
            rows.append(rec)
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise InputError(f"{_name(src)}: the JSON lines do not form a table ({e})") from None
    if table.num_rows == 0:
        raise InputError(f"{_name(src)} is empty: no row to read")
    if field not in table.column_names:
        raise InputError(f"{_name(src)} has no column {field!r} (columns: {', '.join(table.column_names)}); "
                         "name the text column with --text-field")
    col = table.column(field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputError(f"{_name(src)}: column {field!r} holds {col.type}, not strings")
    if col.null_count:
        import pyarrow.compute as pc

        row = pc.index(pc.is_null(col), True).as_py()
        raise InputError(f"{_name(src)}: row {row} has a null {field!r} ({col.null_count} null rows in all); null "
                         "rows are not dropped silently: remove or fill them")
    return table


def output_format(path: str | None, fmt: str | None, *, stdout_formats=("jsonl", "json")) -> str:
    """The format to write: from the suffix of `path` (.npy, .json, .jsonl); `fmt`, when also
    given, must agree with it. Without a path (standard output): `fmt`, default jsonl. Raises
    InputError for an unknown suffix, a disagreement, or a binary format on standard output."""
    formats = sorted(set(OUTPUT_SUFFIXES.values()))
    if fmt is not None and fmt not in formats:
        raise InputError(f"--format must be one of {', '.join(formats)}, got {fmt!r}")
    if path is None:
        fmt = fmt or "jsonl"
        if fmt not in stdout_formats:
            raise InputError(f"--format {fmt} is binary: give --out FILE.{fmt} (standard output takes "
                             f"{' or '.join(stdout_formats)})")
        return fmt
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"--out {path}: unknown suffix {suffix or '(none)'!r}; the format follows the suffix: "
                         + ", ".join(OUTPUT_SUFFIXES))
    if fmt is not None and fmt != OUTPUT_SUFFIXES[suffix]:
        raise InputError(f"--format {fmt} disagrees with --out {path} (a {suffix} file); drop --format or rename")
    return OUTPUT_SUFFIXES[suffix]


def check_output_path(path: str) -> None:
    """That `path` can be written, before any work: it is not a folder, its folder exists, and a
    file can be made there (tried, as write_atomic will make its temporary file: os.access alone
    says yes to root everywhere, e.g. on /proc). Raises InputError naming it."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"--out {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise InputError(f"--out {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--out {path}: the folder {folder} is not writable")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastlm-", suffix=".part")
    except OSError as e:
        raise InputError(f"--out {path}: cannot create a file in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def write_atomic(path: str, write: Callable) -> None:
    """write(binary file) into a temporary file next to `path`, renamed onto `path` only when
    complete: an error or KeyboardInterrupt removes the temporary file and leaves `path` as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastlm-", suffix=".part")
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


def vectors_bytes(vecs, fmt: str) -> bytes:
    """Rows of a 2-D numpy array in `fmt`: "json" one array of rows, "jsonl" one row per line,
    "npy" numpy's format."""
    if fmt == "npy":
        import io

        import numpy as np

        buf = io.BytesIO()
        np.save(buf, vecs)
        return buf.getvalue()
    if fmt == "jsonl":
        return "".join(json.dumps(v) + "\n" for v in vecs.tolist()).encode()
    if fmt == "json":
        return (json.dumps(vecs.tolist()) + "\n").encode()
    raise ValueError(f"vectors_bytes: unknown format {fmt!r}")
