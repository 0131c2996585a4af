"""Loads the compiled extension fastlm._C if it is there.

fastlm works without it (the reference path runs instead); `fastlm info` says so.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("fastlm")

try:
    from fastlm import _C  # noqa: F401  (registers torch.ops.fastlm.* from C++)

    LOAD_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"
    log.debug("fastlm._C not loaded (%s); the reference path runs instead", LOAD_ERROR)

if _C is not None:

    @torch.library.register_fake("fastlm::bias_gelu")
    def _bias_gelu_fake(x, bias, approximate="none"):
        return torch.empty_like(x, memory_format=torch.contiguous_format)


if _C is not None:

    @torch.library.register_fake("fastlm::ffn_ext")
    def _ffn_fake(x, w1, b1, w2, b2, activation, residual):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastlm::linear_ext")
    def _linear_fake(x, w, b, packed=None, activation="none", residual=None):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("fastlm::layer_norm_ext")
    def _ln_fake(x, weight, bias, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastlm::add_layer_norm_ext")
    def _add_ln_fake(x, residual, weight, bias, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape)


if _C is not None:

    @torch.library.register_fake("fastlm::argmax_rows")
    def _argmax_rows_fake(x):
        return x.new_empty((x.shape[0],), dtype=torch.long)

    @torch.library.register_fake("fastlm::packed_linear")
    def _packed_linear_fake(x, w, n, scale=None, bias=None, residual=None, activation="none"):
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.register_fake("fastlm::quantize_rows_int8")
    def _quantize_rows_int8_fake(x, outliers=None):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1])

    @torch.library.register_fake("fastlm::int8_linear_epilogue")
    def _int8_linear_epilogue_fake(acc, x_scale, w_scale, bias=None, activation="none", residual=None, x_out=None,
                                   w_out=None):
        return acc.new_empty(acc.shape, dtype=torch.float32)

    @torch.library.register_fake("fastlm::int8_linear_epilogue_quant")
    def _int8_linear_epilogue_quant_fake(acc, x_scale, w_scale, bias=None, activation="none", x_out=None, w_out=None,
                                         outliers=None):
        n_o = 0 if outliers is None else outliers.shape[0]
        return (acc.new_empty(acc.shape, dtype=torch.int8), acc.new_empty(acc.shape[:1], dtype=torch.float32),
                acc.new_empty((acc.shape[0], n_o), dtype=torch.float32))

    @torch.library.register_fake("fastlm::int8_linear_epilogue_")
    def _int8_linear_epilogue_inplace_fake(acc, x_scale, w_scale, bias=None, activation="none", residual=None,
                                           x_out=None, w_out=None):
        return None  # writes its float32 result over acc

    @torch.library.register_fake("fastlm::int8_linear_epilogue_ln_quant_")
    def _int8_linear_epilogue_ln_quant_fake(acc, x_scale, w_scale, bias, residual, ln_weight, ln_bias, eps, x_out=None,
                                            w_out=None, outliers=None):
        n_o = 0 if outliers is None else outliers.shape[0]
        return (acc.new_empty(acc.shape, dtype=torch.int8), acc.new_empty(acc.shape[:1], dtype=torch.float32),
                acc.new_empty((acc.shape[0], n_o), dtype=torch.float32))

    @torch.library.register_fake("fastlm::int8_gemm_vnni")
    def _int8_gemm_vnni_fake(a, quads, n):
        return a.new_empty((a.shape[0], n), dtype=torch.int32)

    @torch.library.register_fake("fastlm::int8_linear_vnni")
    def _int8_linear_vnni_fake(xq, quads, n, x_scale, w_scale, bias=None, activation="none", residual=None,
                               x_out=None, w_out=None):
        return xq.new_empty((xq.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake("fastlm::int8_linear_vnni_quant")
    def _int8_linear_vnni_quant_fake(xq, quads, n, x_scale, w_scale, bias=None, activation="none", x_out=None,
                                     w_out=None, outliers=None):
        n_o = 0 if outliers is None else outliers.shape[0]
        return (xq.new_empty((xq.shape[0], n), dtype=torch.int8), xq.new_empty(xq.shape[:1], dtype=torch.float32),
                xq.new_empty((xq.shape[0], n_o), dtype=torch.float32))

    @torch.library.register_fake("fastlm::int8_linear_vnni_ln_quant")
    def _int8_linear_vnni_ln_quant_fake(xq, quads, n, x_scale, w_scale, bias, residual, ln_weight, ln_bias, eps,
                                        x_out=None, w_out=None, outliers=None):
        n_o = 0 if outliers is None else outliers.shape[0]
        M = xq.shape[0]
        return (xq.new_empty((M, n), dtype=torch.float32), xq.new_empty((M, n), dtype=torch.int8),
                xq.new_empty((M,), dtype=torch.float32), xq.new_empty((M, n_o), dtype=torch.float32))

    @torch.library.register_fake("fastlm::attention_blocked")
    def _attention_blocked_fake(q, k, v, scale, portable=False):
        B, H, Sq, D = q.shape
        return q.new_empty((B, Sq, H, D)).transpose(1, 2)

    @torch.library.register_fake("fastlm::attention_decode")
    def _attention_decode_fake(q, k, v, scale, causal=False):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    @torch.library.register_fake("fastlm::hugepage_copy")
    def _hugepage_copy_fake(src):
        return torch.empty_like(src, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastlm::gpt2_decode_cpu")
    def _gpt2_decode_cpu_fake(h, params, k_cache, v_cache, kv_len, scales, vocab, eps, activation):
        return h.new_empty((1, vocab))

    @torch.library.register_fake("fastlm::gpt2_decode_batch_cpu")
    def _gpt2_decode_batch_cpu_fake(h, params, k_cache, v_cache, pos, kv_len, scales, vocab, eps, activation):
        return h.new_empty((h.shape[0], vocab))

    if hasattr(torch.ops.fastlm, "copy_rows_"):  # csrc/copy_rows.cpp

        @torch.library.register_fake("fastlm::copy_rows_")
        def _copy_rows_fake(dst, src):
            return dst

    if hasattr(torch.ops.fastlm, "packed_linear_bf16"):  # csrc/gemv_bf16.cpp, csrc/decode_bf16.cpp

        @torch.library.register_fake("fastlm::packed_linear_bf16")
        def _packed_linear_bf16_fake(x, w, n, bias=None, residual=None, activation="none"):
            return x.new_empty((*x.shape[:-1], n))

        @torch.library.register_fake("fastlm::gpt2_decode_cpu_bf16")
        def _gpt2_decode_cpu_bf16_fake(h, params, k_cache, v_cache, kv_len, scales, vocab, eps, activation):
            return h.new_empty((1, vocab), dtype=torch.float32)


# fastlm._C ops that have a CUDA kernel (the rest are CPU twins only; on GPU tensors they
# run Triton or the reference instead).
CUDA_OPS = frozenset({"bias_gelu", "ffn"})


def has_device_op(op: str, device: torch.device) -> bool:
    return device.type != "cuda" or op in CUDA_OPS


def available() -> bool:
    return _C is not None


def cuda_enabled() -> bool:
    """Whether fastlm._C was built with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_enabled())


def cuda_archs() -> str:
    return _C.cuda_archs if _C is not None else ""


def copy_rows_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for same-shape, same-dtype tensors; on the CPU with fastlm._C and unit stride
    along the last dimension, row by row on the calling thread (csrc/copy_rows.cpp: no OpenMP
    region between two pool-run GEMMs of a prefill), else aten's copy_. Returns dst."""
    if (_C is not None and dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype
            and dst.shape == src.shape and 1 <= dst.dim() <= 6 and dst.stride(-1) == 1 and src.stride(-1) == 1
            and hasattr(torch.ops.fastlm, "copy_rows_") and not torch.compiler.is_compiling()):
        return torch.ops.fastlm.copy_rows_(dst, src)
    return dst.copy_(src)


@contextlib.contextmanager
def pool_scope(on: bool = True):
    """While inside, fastlm._C's CPU row ops (LayerNorm, add + LayerNorm) called from this thread share
    their rows through fastlm's work-sharing pool (csrc/cpu_pool.h) instead of an OpenMP region; for
    stretches whose GEMMs run on that pool (a GPT-2 prefill on packed panels), so no OpenMP worker
    is left spinning on the core the pool's helper needs. A no-op without the extension or under
    torch.compile. The previous setting is restored on exit."""
    if _C is None or torch.compiler.is_compiling():
        yield
        return
    prev = torch.ops.fastlm.cpu_pool_scope(1 if on else 0)
    try:
        yield
    finally:
        torch.ops.fastlm.cpu_pool_scope(prev)
