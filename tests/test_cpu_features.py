"""int8_dynamic is never slower than float32 without the user being told (issue 19): the decision
comes from the CPU's real flags (torch's int8 GEMM path cannot be forced by any variable), so it
is tested here with the flags mocked, as on an AVX2-only CPU without VNNI."""

import logging
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf

import fastlm
from fastlm import cpu_features, info

ZEN3 = frozenset("fpu sse sse2 avx avx2 fma bmi2 sha_ni".split())  # AVX2 + FMA, no VNNI: int8 GEMM ~30x slower
ZEN4 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
ALDER_LAKE = ZEN3 | {"avx_vnni"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_int8", "amx_bf16", "amx_tile"}


@pytest.fixture
def flags(monkeypatch):
    def set_flags(value, machine="x86_64"):
        monkeypatch.setattr(cpu_features, "int8_gemm_exact", lambda: True)  # the flags alone decide here
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda: value)
        monkeypatch.setattr(cpu_features.platform, "machine", lambda: machine)
    return set_flags


@pytest.fixture
def no_own_gemm(monkeypatch):
    """As without fastlm._C's int8 GEMMs (AVX2 and VNNI): torch's int8 GEMM is all there is."""
    monkeypatch.setattr(cpu_features, "own_int8_gemm", lambda: False)
    monkeypatch.setattr(cpu_features, "own_vnni_gemm", lambda: False)


@pytest.mark.parametrize("cpu, slow", [(ZEN3, True), (ZEN4, False), (ALDER_LAKE, False), (SAPPHIRE_RAPIDS, False)])
def test_the_decision_follows_the_int8_dot_product_flags(flags, no_own_gemm, cpu, slow):
    flags(cpu)
    reason = cpu_features.int8_gemm_slow()
    assert (reason is not None) == slow
    if slow:
        assert "VNNI" in reason and "quantize='int8'" in reason


@pytest.mark.skipif(not cpu_features.own_int8_gemm(), reason="fastlm._C (its AVX2 int8 GEMM) is not loaded")
@pytest.mark.parametrize("cpu", [ZEN3, ZEN4, ALDER_LAKE, SAPPHIRE_RAPIDS])
def test_without_vnni_int8_dynamic_runs_fastlm_s_avx2_gemm(flags, monkeypatch, cpu):
    flags(cpu)
    capped = torch.ops.fastlm.cpu_isa("") != "avx512" and "avx512f" in cpu  # FASTLM_CPU_ISA=avx2 on an AVX-512 CPU
    own = cpu is ZEN3 or capped
    vnni = cpu in (ZEN4, SAPPHIRE_RAPIDS) and not capped  # AVX-512 VNNI (AMX too): fastlm's own GEMM, epilogue fused
    assert cpu_features.int8_gemm_path() == ("fastlm_avx2" if own else "fastlm_vnni" if vnni else "torch._int_mm")
    assert (cpu_features.int8_gemm_slow() is None) == (not own or cpu_features.AVX2_INT8_PAYS)
    note = info.report()["int8_dynamic on this CPU"]
    assert ("fastlm AVX2 kernel" in note) == (own and cpu_features.AVX2_INT8_PAYS)
    for pays in (True, False):  # where it pays: silent; where it does not: told so
        monkeypatch.setattr(cpu_features, "AVX2_INT8_PAYS", pays)
        note = info.report()["int8_dynamic on this CPU"]
        if own:
            assert (cpu_features.int8_gemm_slow() is None) == pays
            assert note.startswith("int8 GEMM (fastlm AVX2 kernel" if pays else "slower than float32: ")
        elif vnni:  # the tiles are the real CPU's (fastlm._C asks CPUID, not these flags)
            tiles = "AMX-INT8" if cpu_features.own_int8_tiles() == "amx" else "AVX-512 VNNI"
            assert note.startswith(f"int8 GEMM (fastlm {tiles} kernel")
        else:
            assert note == "int8 GEMM (torch._int_mm)"


def test_unknown_flags_or_other_machines_are_not_judged(flags):
    flags(frozenset())
    assert cpu_features.int8_gemm_slow() is None
    flags(ZEN3, machine="aarch64")
    assert cpu_features.int8_gemm_slow() is None


def test_the_real_flags_are_read():
    real = cpu_features.cpu_flags.__wrapped__()
    with open("/proc/cpuinfo") as f:
        text = f.read()
    assert real and all(f in text for f in real)
    has_dot = any(f in real for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    assert cpu_features.has_int8_dot() == has_dot
    path = cpu_features.int8_gemm_path()
    if path == "fastlm_vnni":  # AVX-512 VNNI, fastlm not capped below it: fastlm's own GEMM (AMX tiles with AMX-INT8)
        assert "avx512_vnni" in real and cpu_features.int8_gemm_slow() is None
        assert torch.ops.fastlm.cpu_isa("") == "avx512"
        assert cpu_features.own_int8_tiles() == ("amx" if "amx_int8" in real else "vnni")
        note = info.report()["int8_dynamic on this CPU"]
        assert ("AMX-INT8" in note) == ("amx_int8" in real) and ("AVX-512 VNNI" in note) == ("amx_int8" not in real)
    elif path == "torch._int_mm":  # an int8 dot-product instruction, exact sums, fastlm not capped below it
        assert has_dot and cpu_features.int8_gemm_exact() and cpu_features.int8_gemm_slow() is None
    else:  # no VNNI, or the AVX2 subset of CI (FASTLM_CPU_ISA=avx2; ONEDNN_MAX_CPU_ISA=AVX2 makes torch's saturate)
        assert path == "fastlm_avx2"


def tiny_bert():
    return tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)


def test_loading_int8_dynamic_on_a_cpu_without_vnni_warns(flags, no_own_gemm, caplog):
    flags(ZEN3)
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        model = fastlm.from_pretrained(tiny_bert(), quantize="int8_dynamic")
    msgs = [r.getMessage() for r in caplog.records if "int8_dynamic" in r.getMessage()]
    assert len(msgs) == 1 and "slower than float32" in msgs[0], msgs
    ids = torch.randint(0, 97, (2, 9))
    assert torch.isfinite(model(ids).last_hidden_state).all()  # still runs: a warning, not a refusal
    rep = info.report()
    assert rep["int8_dynamic on this CPU"].startswith("slower than float32")
    assert "int8: none" in rep["CPU features"] and "avx2 fma" in rep["CPU features"]


def test_no_warning_where_the_int8_gemm_pays(flags, caplog):
    flags(ZEN4)
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        fastlm.from_pretrained(tiny_bert(), quantize="int8_dynamic")
        fastlm.from_pretrained(tiny_bert(), quantize="int8")
    warned = [r for r in caplog.records if "slower than float32" in r.getMessage()]
    rep = info.report()
    if cpu_features.int8_gemm_path() == "fastlm_vnni":
        assert not warned  # the tiles are the real CPU's (fastlm._C asks CPUID, not these flags)
        tiles = "AMX-INT8" if cpu_features.own_int8_tiles() == "amx" else "AVX-512 VNNI"
        assert rep["int8_dynamic on this CPU"].startswith(f"int8 GEMM (fastlm {tiles} kernel")
    elif cpu_features.int8_gemm_path() == "torch._int_mm":
        assert not warned
        assert rep["int8_dynamic on this CPU"] == "int8 GEMM (torch._int_mm)"
    else:  # the AVX2 subset: fastlm capped at AVX2 takes its own int8 GEMM, and says whether it pays there
        pays = cpu_features.AVX2_INT8_PAYS
        assert len(warned) == (0 if pays else 1)
        assert rep["int8_dynamic on this CPU"].startswith("int8 GEMM (fastlm AVX2 kernel" if pays else
                                                          "slower than float32")
    assert "int8: avx512_vnni" in rep["CPU features"] and "bf16: avx512_bf16" in rep["CPU features"]


def test_optimize_with_int8_dynamic_on_a_cpu_without_vnni_warns(flags, no_own_gemm, caplog):
    flags(ZEN3)
    hf = tf.BertModel(tiny_bert()).eval()
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        fastlm.optimize(hf, quantize="int8_dynamic")
    assert len([r for r in caplog.records if "slower than float32" in r.getMessage()]) == 1


def test_the_exactness_probe_agrees_with_a_thorough_check():
    # In fresh processes, with oneDNN free and capped at AVX2 (where its int8 GEMM, without VNNI,
    # saturates int16 pair sums): the one-shot probe says what 20 random products of many shapes say.
    code = """
import torch
from fastlm import cpu_features
g = torch.Generator().manual_seed(1)
ok = True
for M, K, N in [(1, 64, 64), (17, 768, 96), (64, 3072, 32), (5, 33, 7)] * 5:
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (K, N), dtype=torch.int8, generator=g)
    ok &= torch.equal(torch._int_mm(a, b), (a.double() @ b.double()).to(torch.int32))
print(cpu_features.int8_gemm_exact(), ok)
"""
    for cap in (None, "AVX2"):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        if cap:
            env["ONEDNN_MAX_CPU_ISA"] = cap
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        probe, thorough = r.stdout.split()
        assert probe == thorough, (cap, r.stdout)


def test_without_an_exact_int8_gemm_int8_dynamic_stays_exact(monkeypatch, caplog):
    from fastlm.linear import Int8DynamicLinear, int_mm

    torch.manual_seed(0)
    a = torch.randint(-127, 128, (9, 300), dtype=torch.int8)
    b = torch.randint(-127, 128, (300, 40), dtype=torch.int8)
    exact = (a.double() @ b.double()).to(torch.int32)
    lin = Int8DynamicLinear.from_linear(torch.nn.Linear(300, 40))
    x = torch.randn(3, 7, 300)
    expect = lin(x)
    monkeypatch.setattr(cpu_features, "own_int8_gemm", lambda: False)  # no fastlm AVX2 int8 GEMM to fall back on
    monkeypatch.setattr(cpu_features, "own_vnni_gemm", lambda: False)  # nor its VNNI one
    monkeypatch.setattr(cpu_features, "int8_gemm_exact", lambda: False)
    assert cpu_features.int8_gemm_path() == "float64"
    assert torch.equal(int_mm(a, b), exact)
    assert torch.equal(lin(x), expect)  # the fallback's sums are the exact ones: the same bits
    assert "inexact" in cpu_features.int8_gemm_slow()
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        fastlm.from_pretrained(tiny_bert(), quantize="int8_dynamic")
    assert any("inexact" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cpu, native", [(ZEN3, False), (ALDER_LAKE, False), (ZEN4, True), (SAPPHIRE_RAPIDS, True)])
def test_bf16_encoder_on_a_cpu_without_native_bf16_warns(flags, caplog, cpu, native):
    """issue 25: an encoder in bfloat16 where bf16 is emulated (no AVX512_BF16 / AMX-BF16) warns at
    load and `fastlm info` says so; GPT-2 (decode streams half the bytes, faster anyway) does not warn."""
    flags(cpu)
    assert cpu_features.bf16_native() == native
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        model = fastlm.from_pretrained(tiny_bert(), dtype="bf16")
        fastlm.from_pretrained(tf.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=97, n_positions=32),
                               dtype="bf16")
    msgs = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(msgs) == (0 if native else 1), msgs
    if not native:
        assert "BertModel" in msgs[0] and "emulated" in msgs[0]
    ids = torch.randint(0, 97, (2, 9))
    assert torch.isfinite(model(ids).last_hidden_state.float()).all()
    rep = info.report()
    assert rep["bfloat16 on this CPU"].startswith("native" if native else "emulated")
    assert ("bf16: none (emulated)" in rep["CPU features"]) != native
    assert ("amx: amx_tile amx_bf16 amx_int8" in rep["CPU features"]) == (cpu is SAPPHIRE_RAPIDS)
