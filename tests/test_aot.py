"""Every registered Triton kernel configuration compiles ahead of time for sm_80 and sm_90 on
this machine, fits shared memory, and (sm_90, fp16/bf16 matrix work) uses wgmma.

Compilation needs the interpreter off, so it runs `python -m fastlm.kernels.aot` in a
subprocess once per session."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def aot_records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "fastlm.kernels.aot", "--json"], capture_output=True, text=True,
                         env=env, timeout=1200)
    recs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert recs, f"no configurations compiled:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return recs


def test_all_kernels_registered(aot_records):
    ops = {r["op"] for r in aot_records}
    assert {"attention", "softmax", "decode_attention", "ffn", "layer_norm"} <= ops
    assert {r["cap"] for r in aot_records} == {80, 90}


def test_every_config_compiles_and_fits(aot_records):
    bad = [r for r in aot_records if not r["ok"] or not r["fits"]]
    assert not bad, "\n".join(f"{r['name']}: {r.get('error') or r['shared']}" for r in bad)
    for r in aot_records:
        print(f"{r['name']}: shared {r['shared']} B, wgmma={r['wgmma']}, mma={r['mma']}, {r['seconds']} s")


def test_matrix_work_uses_tensor_cores(aot_records):
    for r in aot_records:
        if not r["uses_dot"] or " fp32 " in r["name"]:  # fp32 runs exact (ieee) dots on FMA units
            continue
        if r["cap"] == 90:
            assert r["wgmma"], f"{r['name']}: no wgmma on sm_90"
        else:
            assert r["mma"], f"{r['name']}: no mma.sync on sm_80"
