"""Input checks shared by fastlm.ops and the models. Each error names the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # the attention kernels tile head dims up to 128 (fastlm.ops: coverage, not validity)


def tensor(op: str, name: str, t, ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def float_tensor(op: str, name: str, t, ndim: int | None = None) -> Tensor:
    tensor(op, name, t, ndim)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def int_tensor(op: str, name: str, t, expected_shape: Sequence[int] | None, device,
               dtype: torch.dtype | None = None, what: str = "") -> Tensor:
    """An integer argument (lengths, offsets, ids): a tensor of `dtype` (any integer dtype when
    None), of `expected_shape` (any when None), on `device`. The error names the argument."""
    tensor(op, name, t)
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {str(dtype)[6:]}, got {t.dtype}")
    if dtype is None and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if t.device != torch.device(device):
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {device}")
    if expected_shape is not None:
        shape(op, name, t, expected_shape, what)
    return t


def int_range(op: str, name: str, t: Tensor, lo: int, hi: int, what: str = "") -> None:
    """Every value of t lies in [lo, hi] (inclusive). Reads t's min and max on the host once."""
    if t.numel() == 0:
        return
    mn, mx = torch.stack([t.min(), t.max()]).tolist()  # one host copy
    if mn < lo or mx > hi:
        extra = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must lie in [{lo}, {hi}]{extra}, got values in [{mn}, {mx}]")


def same(op: str, ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    """Every tensor in `others` has the dtype and device of `ref`."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def shape(op: str, name: str, t: Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def nonempty(op: str, name: str, t: Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)})")


def head_dim(op: str, d: int) -> None:
    """A valid head dim (>= 1). Whether the kernels cover it (<= MAX_HEAD_DIM) is fastlm.ops'
    coverage check: raw op calls refuse, models fall back to the reference."""
    if d < 1:
        raise ValueError(f"{op}: head dim {d} is not supported (1 to {MAX_HEAD_DIM})")


def scale(op: str, s) -> None:
    if s is not None and (not isinstance(s, (int, float)) or not s == s or s in (float("inf"), float("-inf"))):
        raise ValueError(f"{op}: scale must be a finite float or None, got {s!r}")


def bool_mask(op: str, name: str, m: Tensor | None, expected: Sequence[int], device) -> None:
    if m is None:
        return
    tensor(op, name, m)
    if m.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool tensor (True = keep), got {m.dtype}")
    if m.device != device:
        raise ValueError(f"{op}: {name} is on {m.device} but q is on {device}")
    shape(op, name, m, expected)


def attention_qkv(op: str, q, k, v) -> None:
    float_tensor(op, "q", q, 4)
    float_tensor(op, "k", k, 4)
    float_tensor(op, "v", v, 4)
    same(op, "q", q, k=k, v=v)
    B, H, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{op}: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != H or v.shape[1] != H:
        raise ValueError(f"{op}: head counts differ: q {H}, k {k.shape[1]}, v {v.shape[1]}")
    if k.shape[3] != D:
        raise ValueError(f"{op}: head dims differ: q {D}, k {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: k and v lengths differ: k {k.shape[2]}, v {v.shape[2]}")
    if v.shape[3] != D:
        raise ValueError(f"{op}: head dims differ: q {D}, v {v.shape[3]}")
    head_dim(op, D)
    nonempty(op, "q", q)
    nonempty(op, "k", k)


# -- user-facing arguments of from_pretrained / Embedder / the CLI ------------------------------

# dtype names accepted besides torch dtypes: transformers' (torch attribute names, "auto") and the
# CLI's short forms. "auto" (and None) keep the checkpoint's own dtype.
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def model_dtype(fn: str, dtype) -> torch.dtype | None:
    """`dtype` as transformers takes it -> torch.float32 / float16 / bfloat16, or None for the
    checkpoint's own dtype. Accepts a torch dtype, its name ("float16", "torch.float16"), the short
    forms fp32 / fp16 / bf16, "auto" or None. Raises TypeError (not a dtype or a str) or ValueError
    (a dtype or name fastlm's models do not run) naming `dtype`."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return None
        if name not in DTYPE_NAMES:
            raise ValueError(f"{fn}: dtype {dtype!r} is not supported; use torch.float32 / float16 / bfloat16, "
                             f"one of {', '.join(repr(n) for n in DTYPE_NAMES)}, or 'auto' (the checkpoint's dtype)")
        return DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{fn}: dtype must be a torch.dtype, a dtype name (e.g. 'float16', 'fp16') or 'auto', "
                        f"got {type(dtype).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    return dtype


def _no_device(requested: str, kind: str, has: str) -> str:
    return f"device={requested!r} asks for {kind}, but {has}; use device='cpu' (or leave device unset)"


def model_device(fn: str, device) -> torch.device | None:
    """`device` (a torch.device, a str like "cuda:1", an int GPU index, or None) -> torch.device,
    checked against this machine: ValueError naming `device` when it asks for a GPU this machine
    does not have (instead of torch's AssertionError deep inside the first copy), or for a bad
    device string; TypeError for another type. None stays None (the caller's default)."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{fn}: device must be a str (e.g. 'cpu', 'cuda', 'cuda:1'), a torch.device or a GPU "
                        f"index, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{fn}: device {device!r} is not a device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            has = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
                   else "this machine has no CUDA GPU (torch.cuda.is_available() is False)")
            raise ValueError(f"{fn}: " + _no_device(str(device), "a CUDA GPU", has))
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{fn}: " + _no_device(str(device), f"CUDA GPU {dev.index}",
                                                    f"this machine has {n} GPU(s) (cuda:0 to cuda:{n - 1})"))
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"{fn}: " + _no_device(str(device), f"a {dev.type} device",
                                                    f"torch has no {dev.type} device here"))
    return dev
