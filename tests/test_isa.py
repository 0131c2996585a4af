"""One ISA decision for fastlm._C, and the forced AVX2 run really is forced (issue 18).

Machines of this kind come with or without AVX-512. CI reruns the CPU-kernel and model tests with
FASTLM_CPU_ISA=avx2 (plus ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY, .ci/avx2_subset); these tests
check that the cap reaches every op that picks an ISA, so that run is the path an AVX2-only CPU
takes, not the AVX-512 one under another name.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastlm import _ext, reference
from fastlm.testing import max_err

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C did not load: {_ext.LOAD_ERROR}")


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


FLAGS = cpu_flags()
HAS_AVX2 = {"avx2", "fma"} <= FLAGS
HAS_AVX512 = HAS_AVX2 and {"avx512f", "avx512dq"} <= FLAGS


def expected_isa(cap: str | None) -> str:
    if cap == "portable" or not HAS_AVX2:
        return "portable"
    if cap == "avx2" or not HAS_AVX512:
        return "avx2"
    return "avx512"


def test_this_process_runs_the_isa_its_environment_asks_for():
    cap = os.environ.get("FASTLM_CPU_ISA")
    isa = torch.ops.fastlm.cpu_isa("")
    assert isa == expected_isa(cap)
    assert bool(torch.ops.fastlm.cpu_has_avx512()) == (isa == "avx512")
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":  # the forced run: torch's own kernels too
        assert torch.backends.cpu.get_cpu_capability() == "AVX2"


@pytest.mark.parametrize("cap", ["avx2", "portable", None])
def test_the_cap_reaches_every_op_that_picks_an_isa(cap):
    env = {k: v for k, v in os.environ.items() if k != "FASTLM_CPU_ISA"}
    if cap is not None:
        env["FASTLM_CPU_ISA"] = cap
    code = textwrap.dedent("""
        import torch, fastlm
        from fastlm import fused
        q, k, v = (torch.randn(2, 3, 40, 64) for _ in range(3))
        routed = fused._blocked_attention_ok(q, k, v)
        print(torch.ops.fastlm.cpu_isa(""), bool(torch.ops.fastlm.cpu_has_avx512()), routed)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    isa, has512, routed = r.stdout.split()
    want = expected_isa(cap)
    assert (isa, has512, routed) == (want, str(want == "avx512"), str(want == "avx512"))


def test_attention_blocked_under_a_runtime_cap_matches_the_reference():
    # cpu_isa("avx2") at run time sends attention_blocked to its portable loop, as on an AVX2 CPU.
    before = torch.ops.fastlm.cpu_isa("")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 64) for _ in range(3))
    try:
        torch.ops.fastlm.cpu_isa("portable")
        assert not torch.ops.fastlm.cpu_has_avx512()
        got = torch.ops.fastlm.attention_blocked(q, k, v, 64 ** -0.5, False)
    finally:
        torch.ops.fastlm.cpu_isa("auto")
    assert torch.ops.fastlm.cpu_isa("") == before
    want = reference.attention(q.double(), k.double(), v.double()).float()
    assert got.shape == (2, 4, 33, 64) and max_err(got, want) <= 1e-5
