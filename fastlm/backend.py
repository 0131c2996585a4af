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
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

from fastlm import _ext

BACKENDS = ("auto", "triton", "cuda", "torch")
_local = threading.local()


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
