"""What this installation has: versions, GPU, fastlm._C, and the implementation each op runs."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from fastlm import _ext, backend, cpu_features


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception as e:  # not installed
        return f"not installed ({type(e).__name__})"


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment() -> dict:
    """Versions and hardware, as recorded with every benchmark result."""
    import fastlm

    env = {
        "fastlm": fastlm.__version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = p.name
        env["gpu_capability"] = f"{p.major}.{p.minor}"
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            env["driver"] = out.splitlines()[0] if out else "unknown"
        except Exception:
            env["driver"] = "unknown"
    return env


def report() -> dict:
    env = environment()
    env["fastlm._C"] = "loaded" if _ext.available() else f"missing: {_ext.LOAD_ERROR}"
    env["fastlm._C CUDA kernels"] = (
        f"yes ({_ext.cuda_archs()})" if _ext.cuda_enabled() else "no (CPU build)" if _ext.available() else "no"
    )
    if _ext.available():  # the ISA of the CPU packed GEMV (csrc/gemv.cpp; FASTLM_CPU_ISA caps it)
        env["fastlm._C CPU GEMV ISA"] = torch.ops.fastlm.cpu_isa("")
        if hasattr(torch.ops.fastlm, "bf16_gemv_path"):  # csrc/gemv_bf16.cpp
            env["fastlm._C bf16 GEMV path"] = torch.ops.fastlm.bf16_gemv_path("")
    env["CPU features"] = cpu_features.summary()
    env["bfloat16 on this CPU"] = cpu_features.bf16_note()
    env["int8_dynamic on this CPU"] = cpu_features.int8_gemm_note()
    env["backend"] = backend.current()
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    from fastlm import fused, ops

    # backend names -> what runs ("cuda" is the fastlm._C backend: CUDA kernels, or C++ twins on CPU)
    what = {"triton": "Triton", "cuda": "fastlm._C", "torch": "reference (torch)"}
    rows = []
    for op, kernels in ops.KERNELS.items():
        try:
            impl = ops._pick(op, torch.device("cpu"))
            cpu = f"torch fused ({fused.describe(op)})" if impl == "fused" else what[impl]
            if impl == "cuda":
                cpu = "fastlm._C (C++)"
        except RuntimeError:
            cpu = "n/a (TRITON_INTERPRET=1 needed)"
        gpu = what[ops._pick(op, torch.device("cuda"))] if torch.cuda.is_available() else "-"
        rows.append({"op": op, "kernels": ", ".join(what[k] for k in sorted(kernels)) or "-",
                     "runs on CPU": cpu, "runs on CUDA": gpu})
    env["ops"] = rows
    return env
