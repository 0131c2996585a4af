"""Shared launch heuristics and the ahead-of-time compile registry of fastlm's Triton kernels.

Every launcher picks its block sizes, warps and stages here (one place to tune), and
every kernel file registers `aot_configs()`: each configuration its launcher can pick,
which tests/test_aot.py compiles for every arch in AOT_CAPS on a CPU machine.

Launch rules every launcher follows:
- the grid puts batch*heads (or rows) on axis 0 (2**31 - 1 programs); axes 1 and 2 stop at
  65,535, so they only carry small counts (query blocks, splits);
- kernels turn program ids into int64 before multiplying them by strides, so offsets past 2**31
  elements stay right;
- the launch runs under `device_guard(tensor)`: Triton launches on the current CUDA device,
  which need not be the tensor's.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton

LOG2E = 1.4426950408889634  # kernels take scales in log2 units and use exp2

# Shared memory per block, opt-in maximum (CUDA programming guide, "Technical Specifications per
# Compute Capability"): sm_80 (A100) 163 KiB; sm_86 (A10, A6000, RTX 3090) and sm_89 (L4, L40,
# RTX 4090) 99 KiB; sm_90 (H100, H200) 227 KiB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
AOT_CAPS = (80, 86, 89, 90)  # every arch the AOT check compiles for
GRID_AXIS12_MAX = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0: 2**31 - 1)


def smem_limit(cap: int) -> int:
    """Opt-in shared memory per block for compute capability `cap` (80, 86, ...): the table's
    value; sm_87 (Orin) as sm_80; sm_100/103 as sm_90; anything else as the 99 KiB parts."""
    if cap in SMEM_LIMIT:
        return SMEM_LIMIT[cap]
    if cap == 87:
        return SMEM_LIMIT[80]
    if cap in (100, 103):
        return SMEM_LIMIT[90]
    return SMEM_LIMIT[89]


def device_guard(t: torch.Tensor):
    """Context manager making `t`'s CUDA device current for a launch (a no-op off CUDA)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
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
    """FlashAttention-2 forward tiles, keyed on head dim, query-length bucket, dtype and arch.
    Every choice is AOT-checked (tests/test_aot.py) to compile without register spills and within
    the arch's shared memory, compiled the way the JIT compiles the models' layouts:
    - fp32 (exact ieee dots on FMA units, every operand in registers): small tiles; at head dim
      128 only 16x16 stays clear of spills on sm_90; sm_8x takes 8 warps from head dim 64;
    - sm_90 (wgmma): 128-row tiles for long sequences;
    - sm_80 / sm_86 / sm_89 (mma.sync, 99 KiB of shared memory on the 8.6/8.9 parts): warps
      and stages per head dim where ptxas spills otherwise, 128x32 at head dim 128."""
    D = head_dim_padded
    if dtype == torch.float32:
        if cap >= 90:
            if D <= 64:
                return Launch({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 2)
            return Launch({"BLOCK_M": 16, "BLOCK_N": 16}, 4, 2)  # 32x32 spills ~1 KB here (8 warps too)
        # sm_8x: at head dim 64, 4 warps spill 24-48 B with triton 3.6 (the GPU image's); at 128,
        # 32x32 spills 104 B with triton 3.9 on sm_86/89, and 16x16 with 4 warps 8 B with 3.6
        if D <= 64:
            return Launch({"BLOCK_M": 32, "BLOCK_N": 32}, 4 if D <= 32 else 8, 2)
        return Launch({"BLOCK_M": 16, "BLOCK_N": 16}, 8, 2)
    short = seqlen_q <= 64  # short sequences (BERT-ish, decode-adjacent): more programs
    if cap >= 90:
        if short:
            return Launch({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)
        return Launch({"BLOCK_M": 128, "BLOCK_N": 64}, 4 if D <= 64 else 8, 3)
    if short:
        if D <= 32:
            return Launch({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 1)  # sm_80 ptxas spills 12 B with 2 stages
        return Launch({"BLOCK_M": 64, "BLOCK_N": 64}, 4 if D <= 64 else 8, 2)
    if D <= 64:  # ptxas (sm_86) spills 8 B at head dim 32 with 8 warps, and at 64 with 4
        return Launch({"BLOCK_M": 128, "BLOCK_N": 64}, 4 if D <= 32 else 8, 2)
    return Launch({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 2)


def attention_grid(batch_heads: int, seqlen_q: int, block_m: int) -> tuple[int, int]:
    """(batch*heads on axis 0, query blocks on axis 1): axis 0 takes up to 2**31 - 1 programs."""
    return (batch_heads, triton.cdiv(max(seqlen_q, 1), block_m))


def attention_launch_space() -> list[tuple[int, int, bool, torch.dtype, int]]:
    """Every (padded head dim, query length, causal, dtype, arch) that attention_launch can be
    asked for, one representative per bucket: the AOT check compiles each resulting config."""
    out = []
    for cap in AOT_CAPS:
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


def linear_launch(M: int, N: int, dtype: torch.dtype, cap: int, residual: bool = False) -> Launch:
    """GEMM + epilogue tiles (fp16/bf16 on tensor cores; fp32 runs exact FMA dots). On sm_90 a
    128x256x64 tile spills with either epilogue when compiled as the JIT compiles it (AOT, triton
    3.9: 224 B with bias+GELU; 160 B with the residual): 128x128x64 with 4 stages does not.
    `residual` (the GEMM2 epilogue) is part of the key for tuning; no tile depends on it today."""
    if dtype == torch.float32:
        return Launch({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 2)
    if M <= 64:
        return Launch({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 3 if cap >= 90 else 2)
    if cap >= 90:
        return Launch({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 4)
    return Launch({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8, 3)


def linear_launch_space() -> list[tuple[int, torch.dtype, int, bool]]:
    return [(m, dt, cap, res) for cap in AOT_CAPS for dt in (torch.float16, torch.bfloat16, torch.float32)
            for m in (32, 4096) for res in (False, True)]


def layer_norm_launch(n: int) -> Launch:
    block = max(16, next_pow2(n))  # 16 warps at 8192 spill 16 B in fp32 (triton 3.6, sm_90); 8 do not
    return Launch({"BLOCK": block}, 4 if block <= 1024 else 8 if block <= 8192 else 16, 1)


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
class Ptr:
    """An example pointer argument: a torch allocation (16-byte aligned) of this element type."""

    dtype: str  # "fp16", "bf16", "fp32", "i32", "u8"


@dataclass(frozen=True)
class AOTConfig:
    """One kernel configuration to compile ahead of time for one arch, given by example argument
    values for the kernel's runtime parameters (`args`, in any order: Ptr for tensors, ints as a
    model's layout passes them, floats) and its constexprs. `jit_specialization` turns them into
    what Triton's JIT would compile for the same call."""

    name: str
    kernel: Any  # the @triton.jit function (or the interpreter's wrapper of it)
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    cap: int
    uses_dot: bool = False  # expect wgmma on sm_90, mma.sync before
    dtype: str = ""  # the data type of the configuration ("fp16", "bf16", "fp32")


AOT_REGISTRY: dict[str, Callable[[], list[AOTConfig]]] = {}


def register_aot(op: str):
    def deco(fn):
        AOT_REGISTRY[op] = fn
        return fn

    return deco


def triton_dtype(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # interpreter wraps it


def _divisibility_attr() -> list:
    """The attribute the JIT attaches to a 16-byte-aligned pointer / an int divisible by 16
    (triton 3.3+: BaseBackend.parse_attr("D"); spelled out where it is missing)."""
    try:
        from triton.backends.compiler import BaseBackend

        return BaseBackend.parse_attr("D")
    except (ImportError, AttributeError):
        return [["tt.divisibility", 16]]


def jit_specialization(cfg: AOTConfig) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton's ASTSource, specialised the way the JIT
    specialises a call with cfg.args (triton 3.6 and 3.9 alike): an int equal to 1 becomes the
    constexpr 1 (unit strides), an int divisible by 16 and every (aligned) pointer get the
    16-byte divisibility attribute, ints >= 2**31 are i64, floats fp32."""
    fn = _jit_function(cfg.kernel)
    names = list(fn.arg_names)
    missing = [n for n in names if n not in cfg.args and n not in cfg.constexprs]
    if missing:
        raise ValueError(f"{cfg.name}: no example value for {missing}")
    div = _divisibility_attr()
    signature, constexprs, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in cfg.constexprs:
            signature[n] = "constexpr"
            constexprs[n] = cfg.constexprs[n]
            continue
        v = cfg.args[n]
        if isinstance(v, Ptr):
            signature[n] = "*" + v.dtype
            attrs[(i,)] = div
        elif isinstance(v, bool):
            signature[n] = "u1"
        elif isinstance(v, int):
            if v == 1:
                signature[n] = "constexpr"
                constexprs[n] = 1
                continue
            signature[n] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = div
        elif isinstance(v, float):
            signature[n] = "fp32"
        else:
            raise TypeError(f"{cfg.name}: argument {n} = {v!r} is not a Ptr, int or float")
    return signature, constexprs, attrs


def aot_compile(cfg: AOTConfig):
    """Compile `cfg` for its arch on this machine (no GPU needed), specialised as the JIT would,
    and return the compiled kernel (`.asm["ttir"|"ptx"|"cubin"]`, `.metadata.shared`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = jit_specialization(cfg)
    src = ASTSource(fn=_jit_function(cfg.kernel), signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cfg.cap, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
