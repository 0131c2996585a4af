"""Shared launch heuristics and the ahead-of-time compile registry of fastlm's Triton kernels.

Every launcher picks its block sizes, warps and stages here (one place to tune), and
every kernel file registers `aot_configs()`: each configuration its launcher can pick,
which tests/test_aot.py compiles for sm_80 and sm_90 on a CPU machine.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import triton

LOG2E = 1.4426950408889634  # kernels take scales in log2 units and use exp2

# Shared memory per block (opt-in maximum): A100 164 KiB - 1 KiB reserved; H100/H200 228 KiB - 1 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(t: torch.Tensor) -> int:
    """Compute capability as 80, 90, ...; CPU tensors (interpreter) plan as sm_90."""
    if t.device.type != "cuda":
        return 90
    major, minor = _capability(t.device.index or 0)
    return major * 10 + minor


@dataclass(frozen=True)
class Launch:
    """Block sizes (constexpr kwargs) plus num_warps / num_stages for one launch."""

    blocks: dict
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict:
        if interpreting():
            return dict(self.blocks)  # the interpreter takes no warps/stages
        return {**self.blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}


def attention_launch(head_dim_padded: int, seqlen_q: int, causal: bool, dtype: torch.dtype, cap: int) -> Launch:
    """FlashAttention-2 forward tiles. Keyed on head dim, query-length bucket, causal, dtype and
    arch. fp32 inputs (ieee dot) and sm_80 keep tiles smaller to fit shared memory."""
    D = head_dim_padded
    if dtype == torch.float32:
        return Launch({"BLOCK_M": 64, "BLOCK_N": 32 if D > 64 else 64}, 4, 2)
    if seqlen_q <= 64:  # short sequences (BERT-ish, decode-adjacent): more programs
        return Launch({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)
    if D <= 64:
        return Launch({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 3 if cap >= 90 else 2)
    # D in (64, 128]
    return Launch({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3 if cap >= 90 else 2)


def attention_launch_space() -> list[tuple[int, int, bool, torch.dtype, int]]:
    """Every (padded head dim, query length, causal, dtype, arch) that attention_launch can be
    asked for, one representative per bucket: the AOT check compiles each resulting config."""
    out = []
    for cap in (80, 90):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for D in (16, 32, 64, 128):
                for s in (64, 4096):
                    out.append((D, s, True, dtype, cap))
    return out


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # plan CPU (interpreter) runs like an H100/H200
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_launch() -> Launch:
    """Flash-decoding split pass: 64 cache rows per step, 4 warps."""
    return Launch({"BLOCK_N": 64}, 4, 2)


def decode_launch_space() -> list[int]:
    """SPLITS_P2 values the combine pass can get (num_splits <= 64)."""
    return [2, 4, 8, 16, 32, 64]


def linear_launch(M: int, N: int, dtype: torch.dtype, cap: int) -> Launch:
    """GEMM + epilogue tiles (fp16/bf16 on tensor cores; fp32 runs exact FMA dots)."""
    if dtype == torch.float32:
        return Launch({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 2)
    if M <= 64:
        return Launch({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 3 if cap >= 90 else 2)
    if cap >= 90:
        return Launch({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3)
    return Launch({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8, 3)


def linear_launch_space() -> list[tuple[int, torch.dtype, int]]:
    return [(m, dt, cap) for cap in (80, 90) for dt in (torch.float16, torch.bfloat16, torch.float32) for m in (32, 4096)]


def layer_norm_launch(n: int) -> Launch:
    block = max(16, next_pow2(n))
    return Launch({"BLOCK": block}, 4 if block <= 1024 else 8 if block <= 4096 else 16, 1)


def softmax_launch(n_cols: int, elem_bytes: int) -> tuple[str, Launch]:
    """One pass with the row in registers up to 16k elements (fp16) / 8k (fp32); longer rows
    use the online two-pass kernel in 4k chunks."""
    max_one_pass = 16384 if elem_bytes <= 2 else 8192
    if n_cols <= max_one_pass:
        block = max(16, next_pow2(n_cols))
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        return "one_pass", Launch({"BLOCK": block}, warps, 1)
    return "online", Launch({"BLOCK": 4096}, 8, 1)


def softmax_launch_space() -> list[tuple[int, int]]:
    return [(n, eb) for eb in (2, 4) for n in (16, 1000, 2048, 8192, 16384, 100000)]


# -- ahead-of-time compile registry -----------------------------------------------------

@dataclass(frozen=True)
class AOTConfig:
    """One kernel configuration to compile ahead of time for one arch."""

    name: str
    kernel: Any  # the @triton.jit function (or the interpreter's wrapper of it)
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    cap: int
    uses_dot: bool = False  # expect wgmma on sm_90
    attrs: dict = field(default_factory=dict)


AOT_REGISTRY: dict[str, Callable[[], list[AOTConfig]]] = {}


def register_aot(op: str):
    def deco(fn):
        AOT_REGISTRY[op] = fn
        return fn

    return deco


def triton_dtype(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def aot_compile(cfg: AOTConfig):
    """Compile `cfg` for its arch on this machine (no GPU needed) and return the compiled kernel
    (`.asm["ptx"]`, `.metadata.shared`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = cfg.kernel
    if not isinstance(fn, JITFunction):  # under TRITON_INTERPRET=1 the decorator wraps it
        fn = JITFunction(fn.fn)
    src = ASTSource(fn=fn, signature=cfg.signature, constexprs=cfg.constexprs, attrs=cfg.attrs)
    return triton.compile(src, target=GPUTarget("cuda", cfg.cap, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
