"""Every registered Triton kernel configuration compiles ahead of time for sm_80, sm_86, sm_89 and
sm_90 on this machine, specialised the way the JIT specialises the models' calls (unit strides as
constexpr 1, 16-byte divisibility), and the compiled kernels are fit to run:
- shared memory within each arch's opt-in limit;
- zero register spills for every fp16/bf16 configuration and every fp32 attention configuration
  (registers and spills read from ptxas -v, as Triton runs it);
- program ids widened to 64 bits before any stride multiply (int64 offsets);
- tensor cores for fp16/bf16 matrix work (wgmma on sm_90, mma.sync before).

Compilation needs the interpreter off, so `python -m fastlm.kernels.aot --json FILE` runs in a
subprocess once per session; its records are cached on disk (~/.cache/fastlm/aot) by kernel
source, specialisation and arch, so only changed kernels compile again (cold: 348
configurations, ~9 min on 2 busy cores with 2 jobs; warm: seconds)."""

import json
import os
import subprocess
import sys
import time

import pytest

from fastlm.kernels.utils import AOT_CAPS, SMEM_LIMIT


@pytest.fixture(scope="session")
def aot_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fastlm.kernels.aot", "--json", str(out)], capture_output=True,
                         text=True, env=env, timeout=1800, check=False)
    assert out.exists(), f"no records written (rc {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    recs = json.loads(out.read_text())
    print(f"AOT: {len(recs)} configurations in {time.perf_counter() - t0:.0f} s; {res.stderr.strip()[-300:]}")
    return recs


def bad(recs, pred):
    return "\n".join(f"{r['name']}: {r}" for r in recs if pred(r))


def test_records_cover_every_kernel_and_arch(aot_records):
    ops = {r["op"] for r in aot_records}
    assert {"attention", "softmax", "decode_attention", "ffn", "layer_norm"} <= ops
    assert {r["cap"] for r in aot_records} == set(AOT_CAPS) == {80, 86, 89, 90}
    for r in aot_records:
        assert {"name", "cap", "shared_bytes", "registers", "spill_bytes", "ok"} <= r.keys() or not r["ok"], r


def test_every_config_compiles(aot_records):
    assert not bad(aot_records, lambda r: not r["ok"]), bad(aot_records, lambda r: not r["ok"])


def test_shared_memory_within_each_arch(aot_records):
    assert SMEM_LIMIT[86] == SMEM_LIMIT[89] == 101376 and SMEM_LIMIT[80] == 166912 and SMEM_LIMIT[90] == 232448
    over = bad(aot_records, lambda r: r["ok"] and r["shared_bytes"] > SMEM_LIMIT[r["cap"]])
    assert not over, over


def test_no_register_spills(aot_records):
    """Zero spill bytes for every configuration: every fp16/bf16 one and every fp32 attention one
    (the contract), and the fp32 GEMM, softmax and LayerNorm ones as well."""
    spills = bad(aot_records, lambda r: r["ok"] and r["spill_bytes"] > 0)
    assert not spills, spills
    for r in aot_records:
        if r["ok"]:
            print(f"{r['name']}: {r['registers']} regs, {r['spill_bytes']} B spilled, {r['shared_bytes']} B shared")


def test_offsets_are_64_bit(aot_records):
    narrow = bad(aot_records, lambda r: r["ok"] and not r["offsets64"])
    assert not narrow, narrow


def test_matrix_work_uses_tensor_cores(aot_records):
    for r in aot_records:
        if not r["ok"] or not r["uses_dot"] or r["dtype"] == "fp32":  # fp32: exact (ieee) dots on FMA units
            continue
        if r["cap"] >= 90:
            assert r["wgmma"], f"{r['name']}: no wgmma on sm_90"
        else:
            assert r["mma"], f"{r['name']}: no mma.sync on sm_{r['cap']}"


CHECKER = r'''
import contextlib, io, os, sys, json
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from fastlm.kernels import aot
from fastlm.kernels.utils import AOTConfig, Ptr, aot_compile, jit_specialization

@triton.jit
def narrow(X, Y, stride_xh, BLOCK: tl.constexpr):
    h = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tl.store(Y + h * stride_xh + offs, tl.load(X + h * stride_xh + offs))

@triton.jit
def wide(X, Y, stride_xh, BLOCK: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    tl.store(Y + h * stride_xh + offs, tl.load(X + h * stride_xh + offs))

out = {}
for fn in (narrow, wide):
    cfg = AOTConfig(fn.__name__, fn, dict(X=Ptr("fp16"), Y=Ptr("fp16"), stride_xh=4096), {"BLOCK": 64}, 4, 1, 90)
    with contextlib.redirect_stdout(io.StringIO()):
        k = aot_compile(cfg)
    out[fn.__name__] = aot.offsets64(k.asm["ttir"])
unit = AOTConfig("unit", wide, dict(X=Ptr("fp16"), Y=Ptr("fp16"), stride_xh=1), {"BLOCK": 64}, 4, 1, 90)
sig, ce, attrs = jit_specialization(unit)
out["unit_stride_constexpr"] = sig["stride_xh"] == "constexpr" and ce["stride_xh"] == 1
odd = AOTConfig("odd", wide, dict(X=Ptr("fp16"), Y=Ptr("fp16"), stride_xh=77), {"BLOCK": 64}, 4, 1, 90)
sig, ce, attrs = jit_specialization(odd)
out["odd_stride_plain"] = sig["stride_xh"] == "i32" and (2,) not in attrs and (0,) in attrs and (1,) in attrs
print(json.dumps(out))
'''


def test_checks_catch_what_they_gate(tmp_path):
    """The int64 check flags a kernel multiplying an i32 program id by a stride and passes the
    widened one; the specialisation turns a unit stride into constexpr 1 and gives aligned
    pointers (not odd ints) the divisibility attribute, as the JIT does."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "checker.py"  # a file: triton reads kernels' source with inspect
    script.write_text(CHECKER)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"narrow": False, "wide": True, "unit_stride_constexpr": True, "odd_stride_plain": True}, out


def test_ptxas_log_parsing():
    from fastlm.kernels.aot import _parse_ptxas

    log = ("ptxas info    : Compiling entry function '_attn_fwd' for 'sm_90a'\n"
           "ptxas info    : Function properties for _attn_fwd\n"
           "    1104 bytes stack frame, 680 bytes spill stores, 700 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1104 bytes cumulative stack size\n")
    assert _parse_ptxas(log) == {"registers": 255, "spill_bytes": 1380, "spill_stores": 680, "stack_bytes": 1104}
    assert _parse_ptxas("") == {}
