"""What this CPU computes natively, read from its real flags (Linux /proc/cpuinfo).

torch chooses its CPU int8 GEMM path (`torch._int_mm`, used by quantize="int8_dynamic") from its
own CPU detection, which no environment variable changes: measured 2026-12-06, it ran 341-675
GOP/s on an AMD Zen 4 (AVX-512 VNNI; also with ONEDNN_MAX_CPU_ISA=AVX2) and ~0.8 GOP/s on an AMD
Zen 3 (AVX2, no VNNI), where int8_dynamic BERT-base was ~30x slower than float32
(shared/FIELD_NOTES.md). So the decision whether int8_dynamic pays is made from the CPU's real
flags, never from FASTLM_CPU_ISA or ONEDNN_MAX_CPU_ISA.
"""

from __future__ import annotations

import functools
import logging
import platform

import torch

log = logging.getLogger("fastlm")

# int8 dot-product instructions an int8 GEMM needs to beat float32: AVX-512 VNNI, AVX-VNNI (the
# VEX form on Alder Lake / Zen 5 client parts), AMX-INT8 (Sapphire Rapids and later).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (/proc/cpuinfo), empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def summary() -> str:
    """One line for `fastlm info`: the vector, int8 and bf16 features present, e.g.
    "avx2 fma avx512f | int8: avx512_vnni | bf16: avx512_bf16 | amx: none"."""
    flags = cpu_flags()
    vec = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl") if f in flags] or [platform.machine()]
    int8 = [f for f in INT8_DOT_FLAGS if f in flags] or ["none"]
    bf16 = [f for f in BF16_FLAGS if f in flags] or ["none (emulated)"]
    amx = [f for f in ("amx_tile", "amx_bf16", "amx_int8") if f in flags] or ["none"]
    return f"{' '.join(vec)} | int8: {' '.join(int8)} | bf16: {' '.join(bf16)} | amx: {' '.join(amx)}"


def bf16_native() -> bool:
    """Whether this CPU computes bf16 products natively (AVX512_BF16 or AMX-BF16): where it does,
    oneDNN's bf16 GEMMs (the encoders in bfloat16) run at up to twice float32's rate and the bf16
    decode GEMV uses vdpbf16ps. Read from the real flags, never from FASTLM_CPU_ISA (x86 only;
    other machines count as native: not measured here)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return True
    flags = cpu_flags()
    return not flags or any(f in flags for f in BF16_FLAGS)


def bf16_note() -> str:
    """One line for `fastlm info` on what dtype=torch.bfloat16 runs on this CPU."""
    if bf16_native():
        return ("native: GPT-2 decode streams bf16 weights (half of float32's bytes); encoder GEMMs run oneDNN's "
                "bf16 matmul")
    return ("emulated (no AVX512_BF16 / AMX-BF16): GPT-2 decode still streams bf16 weights (half the bytes, faster "
            "than float32), but encoder GEMMs convert to float32 inside oneDNN and run no faster than float32: "
            "keep encoders in float32 here")


def warn_if_bf16_emulated(model_kind: str) -> None:
    """Log a warning when an encoder (`model_kind`) is loaded in bfloat16 on a CPU without native
    bf16 (bf16_native): its GEMMs run no faster than float32 there."""
    if not bf16_native():
        log.warning("%s in bfloat16 on a CPU without native bf16 (AVX512_BF16 / AMX-BF16): bf16 is emulated here "
                    "and runs no faster than float32; load it in float32", model_kind)


@functools.cache
def int8_gemm_exact() -> bool:
    """Whether torch._int_mm returns exact int32 sums on this CPU, probed once per process.

    oneDNN's int8 GEMM without VNNI (its AVX2 path, e.g. under ONEDNN_MAX_CPU_ISA=AVX2, measured
    2026-12-06 on a Zen 4) multiplies u8-shifted activations by s8 weights with vpmaddubsw, whose
    int16 pair sums saturate (255 * 127 * 2 > 32767): results off by up to ~1e5. The probe uses
    the extreme values that saturate there and random ones, against a float64 product (exact for
    these sizes). Logs a warning when inexact."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (17, 256), dtype=torch.int8, generator=g)
    a[:8] = 127
    a[8:12] = -127
    b = torch.randint(-127, 128, (256, 24), dtype=torch.int8, generator=g)
    b[:, :8] = 127
    b[:, 8:12] = -127
    exact = torch.equal(torch._int_mm(a, b), (a.double() @ b.double()).to(torch.int32))
    if not exact:
        log.warning("torch._int_mm gives inexact int8 sums on this CPU (oneDNN's int8 GEMM without VNNI saturates "
                    "int16 pair sums): quantize='int8_dynamic' computes its GEMMs exactly in float64 instead, "
                    "slower than float32")
    return exact


def int8_gemm_slow() -> str | None:
    """Why quantize="int8_dynamic" runs slower than float32 on this CPU, or None where it pays
    (torch._int_mm is exact here and the CPU has an int8 dot-product instruction: INT8_DOT_FLAGS).
    The flags are judged on x86 only; other machines give None there (not measured here)."""
    if not int8_gemm_exact():
        return ("torch's int8 GEMM gives inexact sums on this CPU (oneDNN without VNNI saturates int16 pair sums), so "
                "fastlm computes it exactly in float64, slower than float32: use quantize='int8' (weight-only) or "
                "no quantization")
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = cpu_flags()
    if not flags or any(f in flags for f in INT8_DOT_FLAGS):
        return None
    return ("this CPU has no int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX-INT8), so torch's int8 "
            "GEMM runs far slower than float32 here (measured ~30x on an AMD Zen 3): use quantize='int8' "
            "(weight-only, fast on any CPU) or no quantization")
