"""Batch inference inside a data engine: callable classes for Ray Data's `Dataset.map_batches`
(and anything else that hands a Python function a batch of rows: Spark's predict_batch_udf,
a plain loop).

    import ray, fastlm.distributed
    ds = ray.data.read_parquet(src)
    ds = ds.map_batches(fastlm.distributed.Embed, fn_constructor_kwargs={"model": path},
                        concurrency=4, num_cpus=2, batch_size=256)
    ds.write_parquet(dst)

Each class loads its model once, in its constructor (once per Ray actor), and its `__call__`
takes one batch -- a dict of column name -> numpy array (Ray Data's default batch format), a
pandas DataFrame or a pyarrow Table -- and returns a dict of columns: every input column
unchanged, plus the result columns, one row out per row in, in the same order. Nothing in this
module imports Ray: `pip install 'fastlm[ray]'` brings Ray Data for the pipeline around it.

Threads: the constructor calls `cpu_threads()`, which sets torch's thread count (and with it
fastlm._C's CPU pool, which sizes itself from torch's count at every call) and the tokenizers'
pool to the CPUs Ray gave the actor (`num_cpus`; Ray also sets OMP_NUM_THREADS to it, 1 when
unset), so N actors x T CPUs never run more than N x T compute threads. `num_threads=` overrides.

Bad rows are never dropped silently: a missing column, a null value or a value that is not a str
raises ValueError / TypeError naming the column and the row (by its `id_column` value when the
batch has one). A text longer than the model's positions raises ValueError unless truncate=True,
which cuts it (Embed / Classify: the end is cut, as sentence-transformers and transformers'
pipelines do; Generate: the start of the prompt is cut, keeping the tokens nearest the new ones).
An empty text is embedded / classified as its special tokens alone ([CLS] [SEP] for BERT, as
sentence-transformers and transformers do); an empty prompt, or any text that tokenizes to
nothing, raises ValueError.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger("fastlm")

__all__ = ["Embed", "Classify", "Generate", "cpu_threads"]


# -- threads --------------------------------------------------------------------------------------

def _ray_cpus() -> float | None:
    """The CPUs Ray assigned to this worker (actor or task), or None outside a Ray worker. Ray is
    never imported here: a process that has not imported it is not a Ray worker."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray.WORKER_MODE:  # the driver: no assignment of its own
            return None
        cpus = ctx.get_assigned_resources().get("CPU")
    except Exception:  # an old or changed Ray API: fall back on OMP_NUM_THREADS, which Ray also sets
        return None
    return cpus or None


def cpu_threads(num_threads: int | None = None) -> int:
    """Sets this process's compute threads and returns the count: `num_threads` when given, else
    the CPUs Ray assigned to this worker (rounded down, at least 1: `num_cpus=0.5` runs 1
    thread), else OMP_NUM_THREADS, else torch's current count (unchanged).

    Applies it to torch (`torch.set_num_threads`: intra-op threads, and fastlm._C's CPU pool,
    which runs at::get_num_threads() - 1 helpers per call) and, when not already set, to the Rust
    pool of Hugging Face tokenizers (RAYON_NUM_THREADS, read when that pool starts: call this
    before the first batch is tokenized). Raises ValueError for a num_threads that is not a
    positive int."""
    import torch

    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        n = num_threads
    else:
        cpus = _ray_cpus()
        if cpus is None:
            env = os.environ.get("OMP_NUM_THREADS", "")
            cpus = int(env) if env.isdigit() and int(env) > 0 else None
        n = max(1, math.floor(cpus)) if cpus is not None else torch.get_num_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    os.environ.setdefault("RAYON_NUM_THREADS", str(n))
    return n


# -- batches --------------------------------------------------------------------------------------

def _columns(batch) -> dict:
    """A batch (dict of columns, pandas DataFrame or pyarrow Table) -> dict of column -> sequence."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if hasattr(batch, "column_names") and hasattr(batch, "column"):  # pyarrow Table / RecordBatch
        return {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}
    if hasattr(batch, "columns") and hasattr(batch, "__getitem__"):  # pandas DataFrame
        return {name: batch[name].to_numpy() for name in batch.columns}
    raise TypeError(f"a batch must be a dict of columns, a pandas DataFrame or a pyarrow Table, got "
                    f"{type(batch).__name__}")


def _is_null(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))  # pandas holds a null str as None or NaN


def _row_name(cols: dict, i: int, id_column: str | None) -> str:
    if id_column and id_column in cols:
        v = cols[id_column][i]
        return f"row {i} of the batch ({id_column}={v.item() if hasattr(v, 'item') else v!r})"
    return f"row {i} of the batch"


def _texts(name: str, cols: dict, column: str, id_column: str | None) -> list[str]:
    """The str values of one column, every row checked: ValueError for a missing column or a
    null, TypeError for a value that is not a str."""
    if column not in cols:
        raise ValueError(f"{name}: the batch has no column {column!r} (columns: {', '.join(map(str, cols)) or 'none'});"
                         f" pass text_column= to name the column holding the texts")
    out = []
    for i, v in enumerate(cols[column]):
        if _is_null(v):
            raise ValueError(f"{name}: {_row_name(cols, i, id_column)} has a null {column!r}: null rows are not "
                             "dropped silently; filter them out (ds.filter) or fill them before this step")
        if not isinstance(v, str):
            raise TypeError(f"{name}: {_row_name(cols, i, id_column)}: {column!r} must hold str, got "
                            f"{type(v).__name__}")
        out.append(v)
    return out


def _nrows(cols: dict) -> int:
    return len(next(iter(cols.values()))) if cols else 0


def _max_positions(model) -> int:
    """The longest sequence the model's position table covers."""
    for m in model.modules():
        if hasattr(m, "max_tokens"):
            return int(m.max_tokens)
    return int(model.config.n_positions)


def _tokenizer(name: str, model_dir: str):
    from transformers import AutoTokenizer

    from fastlm.embed import TOKENIZER_FILES, has_tokenizer_files

    if not has_tokenizer_files(model_dir):
        raise ValueError(f"{name}: no tokenizer in {model_dir} (looked for {', '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _check_batch_size(name: str, batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name}: batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _check_column(name: str, arg: str, v, *, optional: bool = False) -> None:
    if (v is None and optional) or (isinstance(v, str) and v):
        return
    raise ValueError(f"{name}: {arg} must be a non-empty str{' or None' if optional else ''}, got {v!r}")


def _sorted_batches(lengths: Sequence[int], batch_size: int):
    """Row indices in chunks of batch_size, longest first (similar lengths share a batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


class _Base:
    _name = "fastlm.distributed"

    def _setup(self, model, text_column, batch_size, id_column, num_threads) -> str:
        _check_column(self._name, "text_column", text_column)
        _check_column(self._name, "id_column", id_column, optional=True)
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"{self._name}: model must be a checkpoint directory (str or path), got "
                            f"{type(model).__name__}")
        self.text_column, self.id_column = text_column, id_column
        self.batch_size = _check_batch_size(self._name, batch_size)
        self.num_threads = cpu_threads(num_threads)  # before the model and tokenizer make their pools
        return os.fspath(model)

    def _texts(self, cols: dict) -> list[str]:
        return _texts(self._name, cols, self.text_column, self.id_column)

    def _reraise(self, e: Exception, cols: dict):
        """A ValueError about "text k" (1-based, in the batch) -> the same with the row's id."""
        import re

        m = re.match(r"text (\d+) ", str(e))
        if m is None:
            raise ValueError(f"{self._name}: {e}") from e
        i = int(m.group(1)) - 1
        raise ValueError(f"{self._name}: {_row_name(cols, i, self.id_column)}, column {self.text_column!r}: "
                         f"{str(e)[m.end():]}") from e


# -- the callables --------------------------------------------------------------------------------

class Embed(_Base):
    """Sentence embeddings of one text column: fastlm.Embedder, once per actor.

    Embed(model, *, text_column="text", output_column="embedding", batch_size=32, quantize=None,
    device=None, dtype=None, truncate=False, normalize=None, max_length=None, prompt=None,
    prompt_name=None, id_column="id", num_threads=None)(batch) -> dict of columns

    - model: a checkpoint directory (sentence-transformers or transformers) readable on every worker.
    - batch_size: texts per forward inside the actor (Ray's map_batches batch_size is the rows per
      call; the texts of one call are sorted by length into forwards of this size).
    - quantize, device, dtype, truncate, normalize, max_length: as fastlm.Embedder;
      prompt / prompt_name: as Embedder.encode.
    - The output column holds float32 vectors, (rows, d) (a tensor column in Ray Data), equal to
      Embedder(model).encode(texts) row for row.
    - id_column: a column whose value names a bad row in error messages (when the batch has it).
    - num_threads: compute threads (default: the CPUs Ray gave the actor; see cpu_threads).
    Raises as described in the module docstring; a text over the limit names its row and the limit."""

    _name = "fastlm.distributed.Embed"

    def __init__(self, model, *, text_column: str = "text", output_column: str = "embedding", batch_size: int = 32,
                 quantize: str | None = None, device=None, dtype=None, truncate: bool = False,
                 normalize: bool | None = None, max_length: int | None = None, prompt: str | None = None,
                 prompt_name: str | None = None, id_column: str | None = "id", num_threads: int | None = None):
        from fastlm.embed import Embedder

        path = self._setup(model, text_column, batch_size, id_column, num_threads)
        _check_column(self._name, "output_column", output_column)
        self.output_column, self.prompt, self.prompt_name = output_column, prompt, prompt_name
        self.embedder = Embedder(path, device=device, dtype=dtype, quantize=quantize, truncate=truncate,
                                 normalize=normalize, max_length=max_length)

    def __call__(self, batch) -> dict:
        cols = _columns(batch)
        texts = self._texts(cols)
        try:
            vecs = self.embedder.encode(texts, batch_size=self.batch_size, prompt=self.prompt,
                                        prompt_name=self.prompt_name, convert_to_numpy=True)
        except ValueError as e:
            self._reraise(e, cols)
        cols[self.output_column] = vecs  # (N, d) float32
        return cols


class Classify(_Base):
    """Sequence classification of one text column with a *ForSequenceClassification checkpoint.

    Classify(model, *, text_column="text", label_column="label", score_column="score",
    scores_column=None, batch_size=32, quantize=None, device=None, dtype=None, truncate=False,
    max_length=None, id_column="id", num_threads=None)(batch) -> dict of columns

    - label_column: the top class's name (config.id2label), str; score_column: its probability,
      float32; scores_column (optional): every class's probability, float32 (rows, num_labels).
    - Probabilities as transformers' text-classification pipeline computes them: sigmoid for
      problem_type "multi_label_classification" or a single label, else softmax over the logits
      (computed in float32).
    - max_length: the longest text in tokens (default: the tokenizer's model_max_length, capped
      at the model's positions); a longer text raises ValueError naming its row unless truncate=True.
    - Texts are sorted by length into forwards of batch_size, right-padded; rows come back in order.
    Other arguments as Embed."""

    _name = "fastlm.distributed.Classify"

    def __init__(self, model, *, text_column: str = "text", label_column: str = "label", score_column: str = "score",
                 scores_column: str | None = None, batch_size: int = 32, quantize: str | None = None, device=None,
                 dtype=None, truncate: bool = False, max_length: int | None = None, id_column: str | None = "id",
                 num_threads: int | None = None):
        import torch

        import fastlm
        from fastlm import _checks

        path = self._setup(model, text_column, batch_size, id_column, num_threads)
        for arg, v in (("label_column", label_column), ("score_column", score_column)):
            _check_column(self._name, arg, v)
        _check_column(self._name, "scores_column", scores_column, optional=True)
        self.label_column, self.score_column, self.scores_column = label_column, score_column, scores_column
        self.tokenizer = _tokenizer(self._name, path)
        device = _checks.model_device(self._name, device) or torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        dtype = _checks.model_dtype(self._name, dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
        self.model = fastlm.from_pretrained(path, dtype=dtype, device=device, quantize=quantize)
        if not type(self.model).__name__.endswith("ForSequenceClassification"):
            raise ValueError(f"{self._name}: {path} is a {type(self.model).__name__}, not a *ForSequenceClassification "
                             "checkpoint (config.json architectures)")
        limit = min(_max_positions(self.model), int(self.tokenizer.model_max_length))
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= limit:
                raise ValueError(f"{self._name}: max_length must be an int in [1, {limit}], got {max_length!r}")
            limit = max_length
        self.max_length, self.truncate, self.device = limit, bool(truncate), device
        cfg = self.model.config
        self.labels = [cfg.id2label.get(i, f"LABEL_{i}") if cfg.id2label else f"LABEL_{i}"
                       for i in range(cfg.num_labels)]
        self.sigmoid = cfg.problem_type == "multi_label_classification" or cfg.num_labels == 1

    def __call__(self, batch) -> dict:
        import numpy as np
        import torch

        cols = _columns(batch)
        texts = self._texts(cols)
        n = len(texts)
        probs = np.empty((n, len(self.labels)), dtype=np.float32)
        if n:
            ids = self.tokenizer(texts, truncation=self.truncate, max_length=self.max_length if self.truncate else None)
            ids = ids["input_ids"]
            for i, t in enumerate(ids):
                if len(t) > self.max_length:
                    raise ValueError(f"{self._name}: {_row_name(cols, i, self.id_column)}, column {self.text_column!r}:"
                                     f" {len(t)} tokens, more than the limit of {self.max_length}; pass truncate=True "
                                     "to cut it")
                if not t:
                    raise ValueError(f"{self._name}: {_row_name(cols, i, self.id_column)}, column "
                                     f"{self.text_column!r}: no token to classify")
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            with torch.inference_mode():
                for chunk in _sorted_batches([len(t) for t in ids], self.batch_size):
                    S = max(len(ids[i]) for i in chunk)
                    x = torch.full((len(chunk), S), pad, dtype=torch.long)
                    mask = torch.zeros(len(chunk), S, dtype=torch.long)
                    for r, i in enumerate(chunk):
                        x[r, :len(ids[i])] = torch.tensor(ids[i])
                        mask[r, :len(ids[i])] = 1
                    logits = self.model(x.to(self.device), mask.to(self.device)).logits.float()
                    p = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, -1)
                    probs[chunk] = p.cpu().numpy()
            if not np.isfinite(probs).all():
                raise ValueError(f"{self._name}: the model produced non-finite scores (try dtype=torch.float32)")
        top = probs.argmax(1) if n else np.zeros(0, dtype=np.int64)
        cols[self.label_column] = np.array([self.labels[k] for k in top], dtype=object)
        cols[self.score_column] = probs[np.arange(n), top].astype(np.float32)
        if self.scores_column:
            cols[self.scores_column] = probs
        return cols


class Generate(_Base):
    """Text generation from one prompt column with a GPT-2 language model checkpoint.

    Generate(model, *, text_column="text", output_column="generated_text",
    token_ids_column="generated_token_ids", batch_size=16, max_new_tokens=None, do_sample=None,
    temperature=None, top_k=None, top_p=None, min_new_tokens=None, repetition_penalty=None,
    eos_token_id=None, seed=None, skip_special_tokens=True, quantize=None, device=None,
    dtype=None, truncate=False, id_column="id", num_threads=None)(batch) -> dict of columns

    - output_column: the new text, decoded (skip_special_tokens as tokenizer.decode);
      token_ids_column (None: left out): the new token ids, an int64 array per row, up to and
      including the first end-of-sequence id (no padding after it).
    - The sampling arguments are model.generate's (None: the checkpoint's generation_config, then
      transformers' defaults). Prompts are sorted by token length into batches of batch_size,
      left-padded; greedy output equals transformers' generate on each prompt alone (fp32). With
      do_sample=True the tokens of a row depend on the rows it shares a batch with (one random
      stream per batch, seeded by `seed` when given): fix seed, batch_size and the input order
      for repeatable samples. Without max_new_tokens transformers' default (20 new tokens, the
      padded prompt counted against max_length) applies: set it explicitly for batch jobs.
    - A prompt that leaves no room for the new tokens within the model's positions raises
      ValueError naming its row; truncate=True keeps its last (positions - max_new_tokens) tokens
      instead (positions - 1 when max_new_tokens is unset).
    Other arguments as Embed."""

    _name = "fastlm.distributed.Generate"

    def __init__(self, model, *, text_column: str = "text", output_column: str = "generated_text",
                 token_ids_column: str | None = "generated_token_ids", batch_size: int = 16,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_new_tokens: int | None = None,
                 repetition_penalty: float | None = None, eos_token_id=None, seed: int | None = None,
                 skip_special_tokens: bool = True, quantize: str | None = None, device=None, dtype=None,
                 truncate: bool = False, id_column: str | None = "id", num_threads: int | None = None):
        import torch

        import fastlm
        from fastlm import _checks
        from fastlm.generation import resolve

        path = self._setup(model, text_column, batch_size, id_column, num_threads)
        _check_column(self._name, "output_column", output_column)
        _check_column(self._name, "token_ids_column", token_ids_column, optional=True)
        self.output_column, self.token_ids_column = output_column, token_ids_column
        self.tokenizer = _tokenizer(self._name, path)
        device = _checks.model_device(self._name, device) or torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        dtype = _checks.model_dtype(self._name, dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
        self.model = fastlm.from_pretrained(path, dtype=dtype, device=device, quantize=quantize)
        if not isinstance(self.model, fastlm.GPT2LMHeadModel):
            raise ValueError(f"{self._name}: {path} is a {type(self.model).__name__}, not a GPT-2 language model")
        self.kwargs = {k: v for k, v in dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                             temperature=temperature, top_k=top_k, top_p=top_p,
                                             min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                                             eos_token_id=eos_token_id).items() if v is not None}
        s = resolve(self.model, 1, **self.kwargs)  # every argument checked now, not at the first batch
        self.eos = set(s.eos_token_id)
        self.seed, self.skip_special_tokens = seed, bool(skip_special_tokens)
        self.positions = int(self.model.config.n_positions)
        self.room = self.positions - (max_new_tokens if max_new_tokens is not None else 1)
        if self.room < 1:
            raise ValueError(f"{self._name}: max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                             f"model's {self.positions} positions")
        self.truncate, self.device = bool(truncate), device

    def __call__(self, batch) -> dict:
        import numpy as np
        import torch

        cols = _columns(batch)
        texts = self._texts(cols)
        n = len(texts)
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"] if n else []
        for i, t in enumerate(ids):
            if not t:
                raise ValueError(f"{self._name}: {_row_name(cols, i, self.id_column)}, column {self.text_column!r}: "
                                 "the prompt has no token (an empty text?)")
            if len(t) > self.room:
                if not self.truncate:
                    raise ValueError(f"{self._name}: {_row_name(cols, i, self.id_column)}, column "
                                     f"{self.text_column!r}: the prompt has {len(t)} tokens; with the new tokens it "
                                     f"must fit the model's {self.positions} positions (at most {self.room}); pass "
                                     "truncate=True to keep its last tokens")
                ids[i] = t[-self.room:]
        new_ids: list = [None] * n
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = next(iter(self.eos), 0)
        for chunk in _sorted_batches([len(t) for t in ids], self.batch_size):
            S = max(len(ids[i]) for i in chunk)
            x = torch.full((len(chunk), S), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), S, dtype=torch.long)
            for r, i in enumerate(chunk):  # left padding
                x[r, S - len(ids[i]):] = torch.tensor(ids[i])
                mask[r, S - len(ids[i]):] = 1
            out = self.model.generate(x.to(self.device), mask.to(self.device), seed=self.seed, **self.kwargs)
            new = out[:, S:].cpu().tolist()
            for r, i in enumerate(chunk):
                toks = new[r]
                for k, t in enumerate(toks):
                    if t in self.eos:
                        toks = toks[:k + 1]
                        break
                new_ids[i] = toks
        cols[self.output_column] = np.array(
            [self.tokenizer.decode(t, skip_special_tokens=self.skip_special_tokens) for t in new_ids], dtype=object)
        if self.token_ids_column:
            arr = np.empty(n, dtype=object)
            for i, t in enumerate(new_ids):
                arr[i] = np.asarray(t, dtype=np.int64)
            cols[self.token_ids_column] = arr
        return cols
