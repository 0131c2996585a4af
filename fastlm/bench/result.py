"""The result model and timing of `fastlm bench`: every other module of fastlm.bench imports this
one, and this one imports none of them.

A case is one op or model at one shape; its providers (fastlm and the baselines) are factories
that set up and return a zero-argument callable, so every provider is timed the same way in the
same run. A factory raises `Skip(reason)` when its baseline cannot run here (no CUDA,
torch.compile failing, a peer engine not installed, ...): that becomes a skipped row, not a
crash. No correctness checks here: they live in tests/.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


@dataclass
class Case:
    name: str  # e.g. "attention"
    suite: str  # "ops" or "models"
    label: str  # shape, e.g. "B4 H16 S1024 D64 causal"
    x: float | None  # the value plotted on the x axis (sequence length, rows, ...)
    providers: dict[str, Callable[[], Callable[[], Any]]]
    flops: float = 0.0  # per call, for TFLOP/s
    bytes: float = 0.0  # per call, for GB/s
    unit: str = "ms"  # headline metric: "TFLOP/s", "GB/s", "tok/s" or "ms"
    tokens: int = 0  # per call, for tok/s
    x_name: str = ""  # what x is, for the plot's axis: "sequence length", "rows (M)", "texts", ...
    dtype: str = ""  # the math it runs when that is not the run's dtype (e.g. int8 weights)
    bytes_by: dict[str, float] = field(default_factory=dict)  # a provider's own bytes, when not `bytes`


@dataclass
class Row:
    case: str
    label: str
    provider: str
    x: float | None = None
    ms: float | None = None
    value: float | None = None
    unit: str = "ms"
    pct_of_ceiling: float | None = None
    status: str = "ok"
    cpu_ms: float | None = None  # peers: CPU time of the engine's process (all threads) per token / call
    x_name: str = ""  # what x is (Case.x_name)
    dtype: str = ""  # the case's math where it is not the run's dtype (Case.dtype)
    # the spread of the timed calls (`ms` is their median; peers: their best): min, quartiles, max, count.
    # JSON written before these fields existed loads without them (None).
    ms_min: float | None = None
    ms_q1: float | None = None
    ms_q3: float | None = None
    ms_max: float | None = None
    n: int | None = None
    pct_note: str | None = None  # why pct_of_ceiling is None where the row has a value: no bound applies

    def value_at(self, ms: float | None) -> float | None:
        """The headline value had a call taken `ms`: value / (ms / self.ms) for rates, ms for "ms"."""
        if ms is None or self.value is None or not self.ms:
            return None
        return ms if self.unit in ("ms", "ms/token") else self.value * self.ms / ms


@dataclass
class Ceilings:
    """The machine's own rates, measured in the run: each is the best of its timed calls, so an op
    that does the same work cannot beat it. The copy streams buffers >= 4x the last-level cache
    (`cache_bytes`, CPU; the GPU timer flushes L2 between calls), so it is a DRAM bound only: a
    working set within 2x `cache_bytes` is served from cache and gets no % of it (runner)."""

    copy_gbs: float
    matmul_tflops: float
    matmul_dtype: str
    read_gbs: float | None = None  # the peers suite's read bandwidth (all threads, one process)
    cache_bytes: int | None = None  # the CPU's last-level cache (None on GPU, or unknown)


@dataclass
class Result:
    env: dict
    device: str
    dtype: str
    suite: str
    ceilings: Ceilings
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"env": self.env, "device": self.device, "dtype": self.dtype, "suite": self.suite,
                "ceilings": asdict(self.ceilings), "rows": [asdict(r) for r in self.rows]}


# -- timing -------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Milliseconds per call over the timed calls: median, min, quartiles, max and their count."""

    median: float
    min: float
    q1: float
    q3: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        """The summary of `samples` (ms, at least one); quartiles as pytest-benchmark's IQR
        (statistics.quantiles, inclusive), equal to the value itself for one sample."""
        if not samples:
            raise ValueError("no samples to summarise")
        xs = sorted(float(x) for x in samples)
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
        return cls(statistics.median(xs), xs[0], q1, q3, xs[-1], len(xs))


def timing(fn: Callable[[], Any], device: str, budget_s: float = 0.5) -> Timing:
    """Milliseconds per call, every timed call kept. GPU: triton's do_bench (L2 flushed between
    calls); CPU: wall clock after a warm-up call, repeated until the budget is spent (>= 3 calls)."""
    if device == "cuda":
        import triton.testing

        return Timing.of(list(triton.testing.do_bench(fn, warmup=25, rep=max(50, int(budget_s * 1000)),
                                                      return_mode="all")))
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(times)


def time_ms(fn: Callable[[], Any], device: str, budget_s: float = 0.5) -> float:
    """Median milliseconds per call (timing(...).median)."""
    return timing(fn, device, budget_s).median


def format_value(value: float, unit: str) -> str:
    """A headline value with a unit that reads: TFLOP/s under 1 in GFLOP/s (under 1e-3 in MFLOP/s),
    GB/s under 1 in MB/s; 3 significant digits below 100, none after the point above."""
    scale = {"TFLOP/s": ("GFLOP/s", "MFLOP/s"), "GB/s": ("MB/s",)}
    for smaller in scale.get(unit, ()):
        if abs(value) >= 1 or value == 0:
            break
        value, unit = value * 1e3, smaller
    digits = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return f"{digits} {unit}"


def last_level_cache_bytes() -> int | None:
    """The CPU's largest cache (Linux sysfs, cpu0), None where it cannot be read."""
    import glob

    sizes = []
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(f) as fh:
                txt = fh.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:].upper(), 1)
        digits = txt.rstrip("KMGkmg")
        if digits.isdigit():
            sizes.append(int(digits) * mult)
    return max(sizes) if sizes else None


def measure_ceilings(device: str, dtype: torch.dtype | None = None) -> Ceilings:
    """The machine's own copy bandwidth (DRAM: buffers >= 4x the last-level cache) and dense matmul
    rate in `dtype` (the run's; default bfloat16 on GPU, float32 on CPU), measured now, each the
    best of its calls (a ceiling taken from the median is beaten by the op's own best calls)."""
    if device == "cuda":
        n, cache = 1 << 28, None  # 1 GiB of fp32 per side
        a, b = torch.empty(n, device=device), torch.empty(n, device=device)
        ms = timing(lambda: b.copy_(a), device).min
        copy = 2 * a.numel() * 4 / ms / 1e6
        del a, b
        dt, m = dtype or torch.bfloat16, 8192
    else:
        cache = last_level_cache_bytes()
        n = max(1 << 25, (cache or 0) // 4 * 4)  # fp32 elements per side: >= 128 MiB and >= 4x the cache
        a, b = torch.randn(n), torch.empty(n)
        ms = timing(lambda: b.copy_(a), device, budget_s=0.3).min
        copy = 2 * n * 4 / ms / 1e6
        dt, m = dtype or torch.float32, 1024
    x, y = torch.randn(m, m, device=device, dtype=dt), torch.randn(m, m, device=device, dtype=dt)
    ms = timing(lambda: x @ y, device, budget_s=0.3).min
    return Ceilings(copy_gbs=copy, matmul_tflops=2 * m**3 / ms / 1e9, matmul_dtype=str(dt).replace("torch.", ""),
                    cache_bytes=cache)


def compile_or_skip(fn, device: str):
    """torch.compile(fn) for a baseline, or Skip: on CPU (compiling there takes minutes) and when
    compiling fails."""
    if device != "cuda":
        raise Skip("torch.compile baseline runs on GPU only (compiling on this CPU takes minutes)")
    try:
        return torch.compile(fn)
    except Exception as e:  # pragma: no cover - depends on the machine
        raise Skip(f"torch.compile failed: {type(e).__name__}: {e}") from e


# -- JSON ---------------------------------------------------------------------------------

def save_json(res: Result, path: str) -> None:
    """Write the Result as JSON atomically: a temporary file renamed onto `path` once complete, so
    an error or Ctrl-C leaves `path` as it was (fastlm.textio.write_atomic)."""
    from fastlm.textio import write_atomic

    data = json.dumps(res.to_json(), indent=1).encode()
    write_atomic(path, lambda f: f.write(data))


ROW_KEYS = ("case", "label", "provider")


def load_json(path: str) -> dict:
    """A saved Result as plain JSON, checked to be one: an object with a "rows" list whose rows are
    objects with "case", "label" and "provider" and a finite number or null as "ms" (the spread fields of
    newer files are optional). Raises FileNotFoundError, or ValueError naming `--compare`, the path
    and what is wrong."""
    def bad(why: str) -> ValueError:
        return ValueError(f"--compare: {path} is not a fastlm bench result: {why}")

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--compare: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}, not an object")
    if not isinstance(data.get("rows"), list):
        raise bad('no "rows" list')
    for i, r in enumerate(data["rows"]):
        if not isinstance(r, dict):
            raise bad(f"row {i} is not an object")
        missing = [k for k in ROW_KEYS if not isinstance(r.get(k), str)]
        if missing:
            raise bad(f"row {i} has no {', '.join(repr(k) for k in missing)}")
        ms = r.get("ms")
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms)):
            raise bad(f"row {i}'s \"ms\" is {ms!r}, not a number")
    return data
