"""Which implementation an op runs: `auto | triton | cuda | torch`.

Chosen by the FASTLM_BACKEND environment variable, or for a block of code by
`with fastlm.use_backend("torch"):`. The choice per call:

- torch:  the pure-torch reference (fastlm.reference), everywhere. For A/B checks.
- triton: the op's Triton kernel; on CPU tensors this needs TRITON_INTERPRET=1 (tests).
- cuda:   the op's kernel in fastlm._C (its CUDA kernel, or its C++ CPU twin on CPU).
- auto:   CUDA tensors run Triton, else fastlm._C, else the reference; CPU tensors
          run what CPU_FASTEST says was measured fastest for the op: fastlm._C's C++ twin
          ("cuda") or torch's own fused ops ("fused", fastlm.fused), never the reference.

A forced backend that an op does not have (say `triton` for bias_gelu) leaves that
op on its `auto` choice; `fastlm info` lists what each op has.

Fallback (one helper, `fall_back`, for both cases below). A model that transformers runs,
fastlm runs:
- a kernel that does not cover the inputs (a head dim over 128, an arch below sm_80): inside a
  model (`model_scope`) the op runs the reference with one log line; a raw `fastlm.ops` call
  refuses with ValueError (`uncovered`);
- a Triton kernel that fails to compile or launch on this GPU: the op runs the reference with
  one warning naming the op, the GPU and the error, and keeps doing so for that op, device and
  dtype (`run_kernel`).
`FASTLM_STRICT=1` turns every fallback into a `StrictModeError`; the tests and
bench/device_check.sh run strict.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from fastlm import _ext

BACKENDS = ("auto", "triton", "cuda", "torch")
_local = threading.local()
log = logging.getLogger("fastlm")
T = TypeVar("T")


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def current() -> str:
    """The backend in force: the innermost `use_backend`, else FASTLM_BACKEND, else auto."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check(os.environ.get("FASTLM_BACKEND", "auto").strip().lower() or "auto", "FASTLM_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend `name` (one of auto, triton, cuda, torch)."""
    _check(name, "use_backend(name)")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick(op: str, device: torch.device, *, triton: bool = False, cuda: bool = False) -> str:
    """Implementation for `op` on `device`: "triton", "cuda", "fused" (torch's fused ops, CPU)
    or "torch" (the reference).

    `triton` / `cuda` say whether the op has a Triton kernel / a fastlm._C kernel at all.
    """
    want = current()
    if want == "torch":
        return "torch"
    on_gpu = device.type == "cuda"
    if want == "triton" and triton:
        if on_gpu or triton_interpret():
            check_interpreter()
            return "triton"
        raise RuntimeError(
            f"{op}: FASTLM_BACKEND=triton on {device.type} tensors needs the Triton interpreter "
            "(TRITON_INTERPRET=1 set before fastlm is imported)"
        )
    has_c = cuda and _ext.available() and (not on_gpu or _ext.cuda_enabled()) and _ext.has_device_op(op, device)
    if want == "cuda" and has_c:
        return "cuda"
    # auto (or a forced backend this op does not have)
    if on_gpu and triton and triton_available():
        return "triton"
    if not on_gpu:
        return cpu_choice(op, has_c)
    if has_c:
        return "cuda"
    return "torch"


# -- the CPU choice under auto --------------------------------------------------------------
# Per op, the faster of fastlm._C's C++ twin ("cuda") and torch's fused ops ("fused",
# fastlm.fused), timed side by side on this 2-core AVX2 machine at BERT-base B8 S128 and GPT-2
# decode B1 shapes (2026-11-29, fp32): the C++ twins win add+LayerNorm (~5x) and bias+GELU
# (~9x) and tie F.layer_norm and the FFN; torch's SDPA / softmax beat the step-by-step reference
# 3-14x. Ops without a C++ twin (or without fastlm._C) run torch's fused ops.
CPU_FASTEST = {
    "attention": "fused",
    "attention_varlen": "fused",
    "softmax": "fused",
    "decode_attention": "fused",
    "bias_gelu": "cuda",
    "ffn": "cuda",
    "layer_norm": "cuda",
}


def cpu_choice(op: str, has_c: bool) -> str:
    """What auto runs for `op` on CPU tensors: "cuda" (fastlm._C's C++ twin) or "fused"."""
    return "cuda" if CPU_FASTEST.get(op) == "cuda" and has_c else "fused"


# -- fallback: kernels that do not cover an input, or fail on this GPU ----------------------

class StrictModeError(RuntimeError):
    """FASTLM_STRICT=1 and an op would have fallen back to the reference."""


def strict() -> bool:
    """FASTLM_STRICT=1 (or true/yes/on): every fallback raises StrictModeError instead."""
    return os.environ.get("FASTLM_STRICT", "0").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def model_scope() -> Iterator[None]:
    """Ops called inside run as part of a model: inputs a kernel does not cover fall back to the
    reference (one log line) instead of raising ValueError."""
    _local.model_depth = getattr(_local, "model_depth", 0) + 1
    try:
        yield
    finally:
        _local.model_depth -= 1


def in_model() -> bool:
    return getattr(_local, "model_depth", 0) > 0


def model_entry(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: run `fn` (a model's module forward) inside `model_scope`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with model_scope():
            return fn(*args, **kwargs)

    return wrapper


def device_name(device: torch.device) -> str:
    """'NVIDIA H200 (sm_90, cuda:0)', or 'cpu (Triton interpreter)'."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            idx = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(idx)
            return f"{torch.cuda.get_device_name(idx)} (sm_{major}{minor}, cuda:{idx})"
        except Exception:  # noqa: BLE001 - naming the device must never hide the real error
            return str(device)
    return f"{device.type} (Triton interpreter)" if triton_interpret() else device.type


_warned: set = set()
_broken: set = set()


def fall_back(op: str, device: torch.device, why: str, error: BaseException | None = None) -> None:
    """The one fallback path. Returns when the caller should run the reference for `op`; logs one
    warning per (op, device, reason); raises StrictModeError (from `error`) under FASTLM_STRICT=1."""
    msg = f"{op} on {device_name(device)} falls back to the reference: {why}"
    if error is not None:
        msg += f" ({type(error).__name__}: {str(error).strip()[-500:]})"
    if strict():
        raise StrictModeError(f"{msg}. FASTLM_STRICT=1 makes this an error.") from error
    key = (op, str(device), why)
    if key not in _warned:
        _warned.add(key)
        log.warning("fastlm: %s", msg)


def uncovered(op: str, device: torch.device, impl: str, why: str | None) -> str:
    """The implementation to run when `op`'s kernels do not cover the inputs (`why`; None when
    they do, then `impl` is kept). A raw `fastlm.ops` call raises ValueError on every backend
    (every backend takes the same inputs); inside a model (`model_scope`) the op runs the
    reference, through `fall_back` when a kernel had been picked."""
    if why is None:
        return impl
    if not in_model():
        raise ValueError(f"{op}: {why}")
    if impl in ("torch", "fused"):  # the reference and torch's fused ops take every input
        return impl
    fall_back(op, device, why)
    return "torch"


def arch_uncovered(device: torch.device) -> str | None:
    """Why fastlm's GPU kernels do not cover `device`'s arch, or None. They are compiled and
    checked for sm_80 (A100), sm_86/sm_89 (A10, A6000, L4, RTX 4090) and sm_90 (H100/H200);
    newer archs are tried (the compile/launch safety net catches a failure); older ones
    (bf16 and the async copies need sm_80) run the reference."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    if major < 8:
        return f"sm_{major}{minor} is older than sm_80, the oldest arch fastlm's GPU kernels are built for"
    return None


def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run here, or None: triton < 3.8 with numpy >= 2.4 fails
    inside the interpreter (`int()` of a 1-element array, fixed in triton 3.8)."""
    if not triton_interpret():
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    tv = _version_tuple(triton.__version__)
    nv = _version_tuple(numpy.__version__)
    if tv < (3, 8) and nv >= (2, 4):
        return (f"TRITON_INTERPRET=1 with triton {triton.__version__} and numpy {numpy.__version__}: triton's "
                "interpreter before 3.8 breaks on numpy >= 2.4. Fix: pip install 'numpy<2.4', or triton>=3.8, "
                "or unset TRITON_INTERPRET")
    return None


def _version_tuple(v: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0', '2.4.0rc1', '3.8.0+git1a2b'."""
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_interpreter() -> None:
    """Raise RuntimeError naming the fix when the Triton interpreter cannot run here."""
    problem = interpreter_problem()
    if problem:
        raise RuntimeError(problem)


def run_kernel(op: str, device: torch.device, dtype: torch.dtype, kernel: Callable[[], T],
               reference: Callable[[], T]) -> T:
    """kernel(), or reference() when the kernel fails to compile or launch on this device (the
    safety net for a GPU we never saw): one warning, and later calls for the same op, device and
    dtype go straight to the reference. CUDA out-of-memory is not a kernel fault: it propagates.
    Under FASTLM_STRICT=1 the failure raises StrictModeError."""
    key = (op, str(device), dtype)
    if key in _broken:
        return reference()
    try:
        return kernel()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any compile / launch error of the kernel
        fall_back(op, device, "its Triton kernel failed to compile or launch", e)
        _broken.add(key)
        return reference()
