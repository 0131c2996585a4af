"""Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 with zero register spills.
These files are plain CUDA (no torch CUDA headers), so this runs on CPU-only machines."""

import glob
import os

import pytest

from fastlm.testing import find_nvcc, nvcc_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/*.cu not found"


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found: CUDA sources cannot be compile-checked here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: os.path.basename(p))
def test_cu_compiles_without_spills(src, arch):
    reports = nvcc_compile(src, arch, include_dirs=(os.path.join(ROOT, "csrc"),))
    assert reports, f"no kernels reported by ptxas for {src}"
    for r in reports:
        print(f"{arch} {r.name}: {r.registers} registers, {r.stack} B stack, spills {r.spill_stores}/{r.spill_loads}")
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.name} spills on {arch}: {r}"
        assert 0 < r.registers <= 255
