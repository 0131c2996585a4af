"""fastlm's public ops: validate the inputs, pick the implementation, call it.

Every op takes float32, float16 or bfloat16. The kernels are inference-only: a call that autograd
records (grad mode on and an input that requires grad) runs the reference, whose torch ops have
their backward, so gradients are right and never dropped. The reference
(pure torch) lives in fastlm.reference; kernels in fastlm.kernels (Triton) and
fastlm._C (C++/CUDA). `fastlm.backend` says how the implementation is chosen.
Kernels are registered as torch.library custom ops with fake implementations, so
torch.compile and CUDA graphs see them as single nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import _checks as chk
from fastlm import _ext, backend, fused, reference

__all__ = [
    "attention",
    "attention_varlen",
    "softmax",
    "decode_attention",
    "bias_gelu",
    "ffn",
    "layer_norm",
]

ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale) v for q, k, v (B, H, S, D); strided views are fine.

    key_padding_mask (B, S_k) bool, True = keep. Rows with no kept key give 0. Causal
    with S_q < S_k aligns the queries to the end of the keys. Returns (B, H, S_q, D).
    """
    op = "attention"
    chk.attention_qkv(op, q, k, v)
    chk.bool_mask(op, "key_padding_mask", key_padding_mask, (q.shape[0], k.shape[2]), q.device)
    chk.scale(op, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _records_grad(q, k, v):
        return reference.attention(q, k, v, bool(causal), key_padding_mask, scale)
    impl = backend.uncovered(op, q.device, _pick(op, q.device), _head_dim_uncovered(q.shape[-1]))
    if impl == "triton":
        return torch.ops.fastlm.attention(q, k, v, bool(causal), key_padding_mask, scale)
    if impl == "fused":
        return fused.attention(q, k, v, bool(causal), key_padding_mask, scale)
    return reference.attention(q, k, v, bool(causal), key_padding_mask, scale)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Attention over packed tokens q, k, v (T, H, D). Sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1]; cu_seqlens int32 (B+1,) from 0 to T; max_seqlen is
    the longest sequence. Returns (T, H, D)."""
    op = "attention_varlen"
    chk.float_tensor(op, "q", q, 3)
    chk.float_tensor(op, "k", k, 3)
    chk.float_tensor(op, "v", v, 3)
    chk.same(op, "q", q, k=k, v=v)
    if k.shape != q.shape or v.shape[:2] != q.shape[:2] or v.shape[2] != q.shape[2]:
        raise ValueError(
            f"attention_varlen: q, k, v must share (T, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    chk.head_dim(op, q.shape[2])
    chk.nonempty(op, "q", q)
    _check_cu_seqlens(op, cu_seqlens, max_seqlen, q)
    backend.uncovered(op, q.device, "torch", _head_dim_uncovered(q.shape[2]))  # raw call: ValueError
    chk.scale(op, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return attention_varlen_checked(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), scale)


def attention_varlen_checked(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool, scale: float
) -> Tensor:
    """attention_varlen after validation: the models check cu_seqlens once per forward (reading it
    is a host sync) and call this in every layer. Head dims the kernel does not cover run the
    reference inside a model (see fastlm.backend)."""
    op = "attention_varlen"
    if _records_grad(q, k, v):
        return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    impl = backend.uncovered(op, q.device, _pick(op, q.device), _head_dim_uncovered(q.shape[-1]))
    if impl == "triton":
        return torch.ops.fastlm.attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if impl == "fused":
        return fused.attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)


def softmax(x: Tensor, *, dim: int = -1, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """softmax(x * scale + mask) along `dim`. A bool mask keeps True; a float mask is
    added; the mask broadcasts to x. Rows with every entry masked give 0."""
    op = "softmax"
    chk.float_tensor(op, "x", x)
    chk.nonempty(op, "x", x)
    if x.dim() == 0:
        raise ValueError("softmax: x must have at least 1 dim, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"softmax: dim {dim} is out of range for x with {x.dim()} dims")
    chk.scale(op, scale)
    if mask is not None:
        chk.tensor(op, "mask", mask)
        if mask.dtype != torch.bool and mask.dtype not in chk.FLOAT_DTYPES:
            raise TypeError(f"softmax: mask must be bool (True = keep) or float (added), got {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"softmax: mask is on {mask.device} but x is on {x.device}")
        try:
            bshape = torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError:
            bshape = None
        if bshape != x.shape:
            raise ValueError(
                f"softmax: mask of shape {tuple(mask.shape)} does not broadcast to x of shape {tuple(x.shape)}"
            )
    dim = dim % x.dim()
    if _records_grad(x, mask):
        return reference.softmax(x, dim, float(scale), mask)
    impl = _pick(op, x.device)
    if impl == "triton":
        return torch.ops.fastlm.softmax(x, dim, float(scale), mask)
    if impl == "fused":
        return fused.softmax(x, dim, float(scale), mask)
    return reference.softmax(x, dim, float(scale), mask)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *, scale: float | None = None
) -> Tensor:
    """One new query per sequence: q (B, H, 1, D) against k_cache, v_cache (B, H, S_max, D),
    of which the first cache_seqlens[b] rows (int32 (B,), each in [0, S_max]) are valid.
    Returns (B, H, 1, D). Rows past a length never touch the output, whatever they hold (an
    unfilled cache may hold NaN); a length of 0 gives 0. Raises ValueError for a length outside
    [0, S_max] (read once on the host; the models call decode_attention_checked, which does not)."""
    op = "decode_attention"
    chk.attention_qkv(op, q, k_cache, v_cache)
    if q.shape[2] != 1:
        raise ValueError(f"decode_attention: q must have one query per sequence (B, H, 1, D), got {tuple(q.shape)}")
    chk.int_tensor(op, "cache_seqlens", cache_seqlens, (q.shape[0],), q.device, torch.int32,
                   "one length per sequence")
    chk.int_range(op, "cache_seqlens", cache_seqlens, 0, k_cache.shape[2], "the cache capacity k_cache.shape[2]")
    chk.scale(op, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return decode_attention_checked(q, k_cache, v_cache, cache_seqlens, scale)


def decode_attention_checked(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float
) -> Tensor:
    """decode_attention after validation: the models know their lengths lie in [0, S_max] and
    call this every decode step (checking the lengths would be a host sync per token)."""
    op = "decode_attention"
    if _records_grad(q, k_cache, v_cache):
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
    impl = backend.uncovered(op, q.device, _pick(op, q.device), _head_dim_uncovered(q.shape[-1]))
    if impl == "triton":
        return torch.ops.fastlm.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
    if impl == "fused":
        return fused.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)


def bias_gelu(x: Tensor, bias: Tensor, *, approximate: str = "none") -> Tensor:
    """gelu(x + bias), bias (N,) over the last dim of x; approximate "none" (erf) or "tanh"."""
    op = "bias_gelu"
    if approximate not in ("none", "tanh"):
        raise ValueError(f'bias_gelu: approximate must be "none" or "tanh", got {approximate!r}')
    chk.float_tensor(op, "x", x)
    chk.float_tensor(op, "bias", bias, 1)
    chk.same(op, "x", x, bias=bias)
    if x.dim() == 0:
        raise ValueError("bias_gelu: x must have at least 1 dim, got a scalar")
    chk.nonempty(op, "x", x)
    chk.shape(op, "bias", bias, (x.shape[-1],), "the last dim of x")
    if _records_grad(x, bias):
        return reference.bias_gelu(x, bias, approximate)
    impl = _pick(op, x.device)
    if impl == "cuda":
        return backend.run_kernel(op, x.device, x.dtype, lambda: torch.ops.fastlm.bias_gelu(x, bias, approximate),
                                  lambda: reference.bias_gelu(x, bias, approximate))
    if impl == "fused":
        return fused.bias_gelu(x, bias, approximate)
    return reference.bias_gelu(x, bias, approximate)


def ffn(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    activation: str = "gelu",
    residual: Tensor | None = None,
) -> Tensor:
    """linear(act(linear(x, w1, b1)), w2, b2) (+ residual). x (..., d_model),
    w1 (d_ff, d_model), w2 (d_model, d_ff) in nn.Linear layout; activation "gelu" (erf)
    or "gelu_tanh"."""
    op = "ffn"
    if activation not in ACTIVATIONS:
        raise ValueError(f"ffn: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    chk.float_tensor(op, "x", x)
    chk.float_tensor(op, "w1", w1, 2)
    chk.float_tensor(op, "b1", b1, 1)
    chk.float_tensor(op, "w2", w2, 2)
    chk.float_tensor(op, "b2", b2, 1)
    chk.same(op, "x", x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    if x.dim() == 0:
        raise ValueError("ffn: x must have at least 1 dim (..., d_model), got a scalar")
    chk.nonempty(op, "x", x)
    d_model, d_ff = x.shape[-1], w1.shape[0]
    chk.shape(op, "w1", w1, (d_ff, d_model), "(d_ff, d_model) with d_model = x.shape[-1]")
    chk.shape(op, "b1", b1, (d_ff,), "d_ff = w1.shape[0]")
    chk.shape(op, "w2", w2, (d_model, d_ff), "(d_model, d_ff)")
    chk.shape(op, "b2", b2, (d_model,), "d_model")
    if residual is not None:
        chk.shape(op, "residual", residual, tuple(x.shape), "the shape of x")
    for name, w in (("w1", w1), ("w2", w2)):
        if not (w.is_contiguous() or w.t().is_contiguous()):
            raise ValueError(f"ffn: {name} must be contiguous, as nn.Linear stores it or its transpose "
                             f"(got strides {w.stride()}); call .contiguous() once at load time")
    if _records_grad(x, w1, b1, w2, b2, residual):
        return reference.ffn(x, w1, b1, w2, b2, activation, residual)
    impl = _pick(op, x.device)
    if backend.current() == "auto" and x.device.type == "cuda":
        rows_major = w1.is_contiguous() and w2.is_contiguous()  # what the GEMV kernels stream
        if x.numel() // d_model <= 16 and rows_major and "cuda" in KERNELS[op] and _ext.cuda_enabled():
            impl = "cuda"  # decode rows: the GEMV kernels stream each weight once
        elif x.dtype == torch.float32:
            impl = "torch"  # cuBLAS's exact SGEMM beats an exact (non-TF32) Triton GEMM
    if impl == "triton":
        return torch.ops.fastlm.ffn(x, w1, b1, w2, b2, activation, residual)
    if impl == "cuda":
        return backend.run_kernel(op, x.device, x.dtype,
                                  lambda: torch.ops.fastlm.ffn_ext(x, w1, b1, w2, b2, activation, residual),
                                  lambda: reference.ffn(x, w1, b1, w2, b2, activation, residual))
    if impl == "fused":
        return fused.ffn(x, w1, b1, w2, b2, activation, residual)
    return reference.ffn(x, w1, b1, w2, b2, activation, residual)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, *, residual: Tensor | None = None):
    """LayerNorm over the last dim (float32 statistics). With `residual`, normalises
    x + residual and returns (normed, x + residual)."""
    op = "layer_norm"
    chk.float_tensor(op, "x", x)
    chk.float_tensor(op, "weight", weight, 1)
    chk.float_tensor(op, "bias", bias, 1)
    chk.same(op, "x", x, weight=weight, bias=bias, residual=residual)
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least 1 dim, got a scalar")
    chk.nonempty(op, "x", x)
    chk.shape(op, "weight", weight, (x.shape[-1],), "the last dim of x")
    chk.shape(op, "bias", bias, (x.shape[-1],), "the last dim of x")
    if residual is not None:
        chk.shape(op, "residual", residual, tuple(x.shape), "the shape of x")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layer_norm: eps must be a positive float, got {eps!r}")
    if _records_grad(x, weight, bias, residual):
        return reference.layer_norm(x, weight, bias, float(eps), residual)
    impl = _pick(op, x.device)
    if impl == "triton":
        if residual is None:
            return torch.ops.fastlm.layer_norm(x, weight, bias, float(eps))
        return torch.ops.fastlm.add_layer_norm(x, residual, weight, bias, float(eps))
    if impl == "cuda":  # fastlm._C's CPU twin (the GPU runs the Triton kernel)
        if residual is None:
            return torch.ops.fastlm.layer_norm_ext(x, weight, bias, float(eps))
        return torch.ops.fastlm.add_layer_norm_ext(x, residual, weight, bias, float(eps))
    if impl == "fused":
        return fused.layer_norm(x, weight, bias, float(eps), residual)
    return reference.layer_norm(x, weight, bias, float(eps), residual)


def _check_cu_seqlens(op: str, cu: Tensor, max_seqlen: int, q: Tensor) -> None:
    chk.int_tensor(op, "cu_seqlens", cu, None, q.device, torch.int32)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D with B+1 >= 2 entries, got shape {tuple(cu.shape)}")
    vals = cu.tolist()  # one small host copy: bad offsets must never reach a kernel
    if vals[0] != 0 or vals[-1] != q.shape[0]:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and end at the token count {q.shape[0]}, got {vals}")
    lengths = [b - a for a, b in zip(vals[:-1], vals[1:], strict=True)]
    if min(lengths) < 0:
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {vals}")
    if not isinstance(max_seqlen, int) or max_seqlen < max(lengths):
        raise ValueError(
            f"{op}: max_seqlen must be an int >= the longest sequence ({max(lengths)}), got {max_seqlen!r}"
        )


# The kernels each op has besides the reference: "triton" (fastlm.kernels) and/or
# "cuda" (fastlm._C). backend.pick chooses among them per call.
_TRITON = frozenset({"triton"}) if backend.triton_available() else frozenset()
KERNELS: dict[str, frozenset[str]] = {
    "attention": _TRITON,
    "attention_varlen": _TRITON,
    "softmax": _TRITON,
    "decode_attention": _TRITON,
    "bias_gelu": frozenset({"cuda"}),
    "ffn": _TRITON | {"cuda"},
    "layer_norm": _TRITON | {"cuda"},
}


def _records_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call: grad mode on and an input requires grad. The kernels
    (Triton, fastlm._C, the CPU fused paths) have no backward, so such a call runs the reference,
    plain torch ops with their gradients: gradients are never dropped."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _pick(op: str, device: torch.device) -> str:
    k = KERNELS[op]
    impl = backend.pick(op, device, triton="triton" in k, cuda="cuda" in k)
    if impl != "torch" and device.type == "cuda":
        why = backend.arch_uncovered(device)
        if why is not None:  # not an input fault: raw calls fall back too
            backend.fall_back(op, device, why)
            return "torch"
    return impl


def _head_dim_uncovered(d: int) -> str | None:
    """Why the attention kernels do not cover head dim d (they tile head dims up to 128)."""
    if d > chk.MAX_HEAD_DIM:
        return f"head dim {d} is not supported by the attention kernels (1 to {chk.MAX_HEAD_DIM})"
    return None


# -- kernels as torch.library custom ops (single opaque nodes for torch.compile / CUDA graphs)
# The launchers are imported on first call, so TRITON_INTERPRET is read when it is needed.

def _attn_out(q: Tensor, v: Tensor) -> Tensor:
    B, H, S, _ = q.shape  # (B, H, S, D_v) view of (B, S, H, D_v) memory, as the kernel writes
    return q.new_empty(B, S, H, v.shape[-1]).transpose(1, 2)


@torch.library.custom_op("fastlm::attention", mutates_args=())
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Tensor | None, scale: float
) -> Tensor:
    def kernel():
        from fastlm.kernels import attention as k_

        return k_.attention(q, k, v, causal, key_padding_mask, scale)

    def ref():  # in the layout the kernel writes (and the fake promises)
        return _attn_out(q, v).copy_(reference.attention(q, k, v, causal, key_padding_mask, scale))

    return backend.run_kernel("attention", q.device, q.dtype, kernel, ref)


@_attention_op.register_fake
def _(q, k, v, causal, key_padding_mask, scale):
    return _attn_out(q, v)


@torch.library.custom_op("fastlm::attention_varlen", mutates_args=())
def _attention_varlen_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool, scale: float
) -> Tensor:
    def kernel():
        from fastlm.kernels import attention as k_

        return k_.attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)

    return backend.run_kernel("attention_varlen", q.device, q.dtype, kernel,
                              lambda: reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale))


@_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


@torch.library.custom_op("fastlm::softmax", mutates_args=())
def _softmax_op(x: Tensor, dim: int, scale: float, mask: Tensor | None) -> Tensor:
    def kernel():
        from fastlm.kernels import softmax as k_

        return k_.softmax(x, dim, scale, mask)

    return backend.run_kernel("softmax", x.device, x.dtype, kernel,
                              lambda: reference.softmax(x, dim, scale, mask).contiguous())


@_softmax_op.register_fake
def _(x, dim, scale, mask):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastlm::decode_attention", mutates_args=())
def _decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float) -> Tensor:
    def kernel():
        from fastlm.kernels import decode_attention as k_

        return k_.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)

    return backend.run_kernel("decode_attention", q.device, q.dtype, kernel,
                              lambda: reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale))


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale):
    return torch.empty_like(q)


@torch.library.custom_op("fastlm::ffn", mutates_args=())
def _ffn_op(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str,
            residual: Tensor | None) -> Tensor:
    def kernel():
        from fastlm.kernels import ffn as k_

        return k_.ffn(x, w1, b1, w2, b2, activation, residual)

    return backend.run_kernel("ffn", x.device, x.dtype, kernel,
                              lambda: reference.ffn(x, w1, b1, w2, b2, activation, residual))


@_ffn_op.register_fake
def _(x, w1, b1, w2, b2, activation, residual):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastlm::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    def kernel():
        from fastlm.kernels import layer_norm as k_

        return k_.layer_norm(x, weight, bias, eps)

    return backend.run_kernel("layer_norm", x.device, x.dtype, kernel,
                              lambda: reference.layer_norm(x, weight, bias, eps, None))


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastlm::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    def kernel():
        from fastlm.kernels import layer_norm as k_

        return k_.layer_norm(x, weight, bias, eps, residual)

    return backend.run_kernel("layer_norm", x.device, x.dtype, kernel,
                              lambda: reference.layer_norm(x, weight, bias, eps, residual))


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)
