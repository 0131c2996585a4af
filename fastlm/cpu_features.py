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


# Whether fastlm's own AVX2 int8 GEMM (csrc/quant_avx2.cpp: vpmovsxbw + vpmaddwd, exact int32 sums)
# makes int8_dynamic faster than float32 where the CPU has no int8 dot-product instruction.
# Measured 2026-12-07 on the Zen 4 with every ISA capped at AVX2 (FASTLM_CPU_ISA=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2), machine heavily loaded (load average ~10 on 2
# cores), one process alternating, 2 threads: the GEMM alone (1024 x 768 x 3072) 1.15-1.35x faster
# than oneDNN's fp32 in process CPU time, but BERT-base B8 S128 end to end int8_dynamic 2807 vs float32
# 2635 ms of process CPU time (medians of 3): no faster, the quantization / epilogue passes eat the
# GEMM's gain. So int8_dynamic still warns there (it runs ~30x faster than torch's scalar int8 GEMM
# did on a real Zen 3). Not yet measured on a real AVX2-only CPU.
AVX2_INT8_PAYS = False


def _fastlm_capped() -> bool:
    """Whether fastlm._C's ISA is capped below the CPU's own (FASTLM_CPU_ISA=avx2 / portable on an
    AVX-512 CPU, or torch.ops.fastlm.cpu_isa at run time): then int8_dynamic takes the route an
    AVX2-only CPU takes, fastlm's AVX2 int8 GEMM."""
    from fastlm import _ext

    if not _ext.available():
        return False
    return "avx512f" in cpu_flags() and torch.ops.fastlm.cpu_isa("") != "avx512"


def has_int8_dot() -> bool:
    """Whether this CPU has an int8 dot-product instruction (INT8_DOT_FLAGS), from its real flags;
    True where that cannot be judged (not x86, or flags unreadable: not measured here)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return True
    flags = cpu_flags()
    return not flags or any(f in flags for f in INT8_DOT_FLAGS)


def own_int8_gemm() -> bool:
    """Whether fastlm._C's AVX2 int8 GEMM (torch.ops.fastlm.int8_gemm_avx2) is loaded."""
    from fastlm import _ext

    return _ext.available() and hasattr(torch.ops.fastlm, "int8_gemm_avx2")


def own_vnni_gemm() -> bool:
    """Whether fastlm._C's quad-panel int8 GEMM (csrc/int8_gemm_vnni.cpp) runs its own tiles here:
    the CPU has AVX-512 BW + VNNI (real flags; every AMX-INT8 CPU has them too) and fastlm._C's ISA is
    not capped below AVX-512. Which tiles (AMX-INT8 or AVX-512 VNNI): own_int8_tiles()."""
    from fastlm import _ext

    if not (_ext.available() and hasattr(torch.ops.fastlm, "int8_linear_vnni")):
        return False
    flags = cpu_flags()
    return {"avx512bw", "avx512_vnni"} <= flags and not _fastlm_capped()


def own_int8_tiles() -> str:
    """The tiles fastlm._C's quad-panel int8 GEMM runs: "amx" (TDPBSUD, csrc/int8_gemm_amx.cpp: the CPU
    has AMX-INT8 and Linux granted the tile state), "vnni" (vpdpbusd) or "portable"; "" without
    fastlm._C. torch.ops.fastlm.int8_gemm_tiles("vnni") keeps AMX off (A/B, tests), "auto" restores."""
    from fastlm import _ext

    if not (_ext.available() and hasattr(torch.ops.fastlm, "int8_gemm_tiles")):
        return ""
    return torch.ops.fastlm.int8_gemm_tiles("")


def int8_gemm_path() -> str:
    """The exact int8 GEMM quantize="int8_dynamic" runs on CPU (fastlm.linear.int_mm):
    - "fastlm_vnni": the CPU has AVX-512 VNNI (AMX-INT8 CPUs included) and fastlm._C is loaded,
      uncapped: csrc/int8_gemm_vnni.cpp (vpdpbusd, or TDPBSUD tiles where the CPU has AMX-INT8:
      csrc/int8_gemm_amx.cpp; exact int32 sums), block by block with the epilogue fused
      (Int8DynamicLinear keeps its weight in that kernel's uint8 quad panels). On AMX, measured
      2026-12-08 on a 2-vCPU Intel Xeon (AMX-INT8), BERT-base B8 S128 int8_dynamic, one process
      alternating, bit-equal outputs: 137 vs 170 ms (2 threads) and 257 vs 325 ms (1) against
      torch._int_mm (oneDNN's s8s8s32 gemm, which did not run AMX there; docs/design.md);
    - "torch._int_mm": the CPU has an int8 dot-product instruction (AVX-VNNI without AVX-512) and
      torch's sums are exact (int8_gemm_exact);
    - "fastlm_avx2": no int8 dot-product instruction (or fastlm._C's ISA capped below AVX-512, the
      forced AVX2 route), or torch's sums are inexact: csrc/quant_avx2.cpp, exact int32 sums
      (its portable loop where fastlm._C runs portable code);
    - "float64": neither fastlm._C nor an exact torch._int_mm: a float64 product (exact, slow)."""
    if own_vnni_gemm():
        return "fastlm_vnni"
    own = own_int8_gemm()
    if has_int8_dot() and not _fastlm_capped() and int8_gemm_exact():
        return "torch._int_mm"
    if own:
        return "fastlm_avx2"
    return "torch._int_mm" if int8_gemm_exact() else "float64"


def int8_gemm_note() -> str:
    """One line for `fastlm info`: which int8 GEMM quantize="int8_dynamic" runs here, and whether it
    runs slower than float32 (then int8_gemm_slow says why)."""
    slow = int8_gemm_slow()
    if slow:
        return f"slower than float32: {slow}"
    path = int8_gemm_path()
    if path == "fastlm_vnni":
        if own_int8_tiles() == "amx":
            return "int8 GEMM (fastlm AMX-INT8 kernel, TDPBSUD tiles, exact int32 sums, epilogue fused per row block)"
        return "int8 GEMM (fastlm AVX-512 VNNI kernel, vpdpbusd, exact int32 sums, epilogue fused per row block)"
    if path == "fastlm_avx2":
        return ("int8 GEMM (fastlm AVX2 kernel, vpmovsxbw + vpmaddwd, exact int32 sums: no int8 dot-product "
                "instruction used), faster than float32")
    return "int8 GEMM (torch._int_mm)"


def int8_gemm_slow() -> str | None:
    """Why quantize="int8_dynamic" runs slower than float32 on this CPU, or None where it pays:
    torch._int_mm with an int8 dot-product instruction (INT8_DOT_FLAGS), or fastlm's AVX2 int8 GEMM
    where it was measured faster than float32 (AVX2_INT8_PAYS). The flags are judged on x86 only."""
    path = int8_gemm_path()
    if path == "fastlm_vnni":
        return None
    if path == "torch._int_mm":
        if has_int8_dot():
            return None
        return ("this CPU has no int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX-INT8), so torch's int8 "
                "GEMM runs far slower than float32 here (measured ~30x on an AMD Zen 3), and fastlm._C (whose "
                "AVX2 int8 GEMM would run instead) is not loaded: use quantize='int8' (weight-only, fast on any "
                "CPU) or no quantization")
    if path == "float64":
        return ("torch's int8 GEMM gives inexact sums on this CPU (oneDNN without VNNI saturates int16 pair sums), so "
                "fastlm computes it exactly in float64, slower than float32: use quantize='int8' (weight-only) or "
                "no quantization")
    from fastlm import _ext

    if _ext.available() and torch.ops.fastlm.cpu_isa("") == "portable":
        return ("fastlm._C runs its portable code here (FASTLM_CPU_ISA=portable or no AVX2), whose int8 GEMM loop is "
                "slower than float32: use quantize='int8' (weight-only) or no quantization")
    if not AVX2_INT8_PAYS:
        return ("this CPU has no int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX-INT8) in use; fastlm's "
                "exact AVX2 int8 GEMM (vpmaddwd) runs here instead of torch's (~30x slower or inexact without "
                "VNNI), but end to end it measured no faster than float32 (BERT-base: 0.94x), so int8_dynamic may "
                "run slower than float32 here: use quantize='int8' (weight-only, fast on any CPU) or no quantization")
    return None
