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


@dataclass
class Ceilings:
    copy_gbs: float
    matmul_tflops: float
    matmul_dtype: str
    read_gbs: float | None = None  # the peers suite's read bandwidth (all threads, one process)


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


def time_ms(fn: Callable[[], Any], device: str, budget_s: float = 0.5) -> float:
    """Median milliseconds per call. GPU: triton's do_bench (L2 flushed between calls);
    CPU: wall clock after a warm-up call, repeated until the budget is spent (>= 3 calls)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(50, int(budget_s * 1000)), return_mode="median"))
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: str) -> Ceilings:
    """The machine's own copy bandwidth and dense matmul rate, measured now."""
    if device == "cuda":
        n = 1 << 28  # 1 GiB of fp32 per side
        a, b = torch.empty(n, device=device), torch.empty(n, device=device)
        ms = time_ms(lambda: b.copy_(a), device)
        copy = 2 * a.numel() * 4 / ms / 1e6
        del a, b
        dt, m = torch.bfloat16, 8192
    else:
        n = 1 << 25  # 128 MiB per side
        a, b = torch.randn(n), torch.empty(n)
        ms = time_ms(lambda: b.copy_(a), device, budget_s=0.3)
        copy = 2 * n * 4 / ms / 1e6
        dt, m = torch.float32, 1024
    x, y = torch.randn(m, m, device=device, dtype=dt), torch.randn(m, m, device=device, dtype=dt)
    ms = time_ms(lambda: x @ y, device, budget_s=0.3)
    return Ceilings(copy_gbs=copy, matmul_tflops=2 * m**3 / ms / 1e9, matmul_dtype=str(dt).replace("torch.", ""))


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
    with open(path, "w") as f:
        json.dump(res.to_json(), f, indent=1)


def load_json(path: str) -> dict:
    """A saved Result as plain JSON. Raises FileNotFoundError / ValueError naming `--compare` and the
    path when the file is missing or is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--compare: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--compare: {path} is not a fastlm bench JSON: {e}") from None
