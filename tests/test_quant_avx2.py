"""The AVX2 GEMMs (issue 19.2): csrc/quant_avx2.cpp's exact int8 GEMM (int8_dynamic on CPUs without
an int8 dot-product instruction) against a pure-torch int64 product, and the float32 prefill GEMM on
the decode panels (csrc/gemv.cpp's register tiles, packed_linear) against float64; both ISA paths (AVX2 and portable,
forced at run time), awkward shapes, the outlier-channel variant of int8_dynamic, and that
int8_dynamic / PackedLinear really take these kernels where fastlm's ISA is AVX2. Runs plain and
under the AVX2 caps (.ci/avx2_subset)."""

import pytest
import torch
import torch.nn.functional as F

from fastlm import _ext, cpu_features
from fastlm.linear import Int8DynamicLinear, PackedLinear, pack_int8_panels, pack_panels
from fastlm.testing import max_err

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C did not load: {_ext.LOAD_ERROR}")

ISAS = ["auto", "portable"]


@pytest.fixture
def isa(request):
    """Run under torch.ops.fastlm.cpu_isa(request.param), restored afterwards."""
    before = torch.ops.fastlm.cpu_isa("")
    torch.ops.fastlm.cpu_isa(request.param)
    yield torch.ops.fastlm.cpu_isa("")
    torch.ops.fastlm.cpu_isa(before)


def _int64_ref(a, b):
    return (a.long() @ b.long()).to(torch.int32)  # exact: |sums| < 128 * 128 * K < 2^31


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("M", [1, 17, 97, 129])
@pytest.mark.parametrize("K, N", [(1, 5), (33, 7), (96, 16), (301, 40), (768, 100)])
def test_int8_gemm_is_exact(isa, M, K, N):
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + N)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=g)
    a[0, : K // 2] = -128  # the extremes: pair sums of 2 * 128^2, exact only without int16 saturation
    b[: K // 2, 0] = -128
    if M > 1:
        a[1] = 127
        b[:, -1] = -127
    got = torch.ops.fastlm.int8_gemm_avx2(a, b)
    assert got.dtype == torch.int32 and got.shape == (M, N)
    assert torch.equal(got, _int64_ref(a, b))


def _f64_ref(a, b):
    return (a.double() @ b.double()).to(torch.int32)  # exact: |sums| < 2^31 < 2^53


def _gemm(layout, a, b):
    """The kernel on b (K, N) as given ("kn": packed per call) or packed once into int8 pair panels."""
    if layout == "kn":
        return torch.ops.fastlm.int8_gemm_avx2(a, b)
    return torch.ops.fastlm.int8_gemm_avx2_panels(a, pack_int8_panels(b.t()), b.shape[1])


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("layout", ["kn", "panels"])
@pytest.mark.parametrize("M", [1, 17, 97, 1025])
@pytest.mark.parametrize("K", [129, 768, 1025, 3073])
@pytest.mark.parametrize("N", [45, 768])
def test_int8_gemm_register_tiles_exact_on_awkward_shapes(isa, layout, M, K, N):
    """Every row remainder of the 6-row tiles (1025 = 6 * 170 + 5, 97, 17, 1), channel tails of the
    16-channel panels (45 = 32 + 13), odd K (the zero second row of the last pair), K beyond one
    row block, and on int8 pair panels both routes (M < 256: widened in the tiles; 1025: widened
    into an int16 copy first): bit-equal to a float64 product, on a heap poisoned with a pattern
    first (the output is allocated inside the op: a tile that skipped a row or a channel shows it)."""
    if isa == "portable" and M * K * N > 700e6:
        pytest.skip("the portable loop is scalar: the large shapes run on the AVX2 path only")
    g = torch.Generator().manual_seed(M * 131 + K * 7 + N)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=g)
    poison = torch.full((M * N + 64,), 0x7F7F7F7F, dtype=torch.int32)
    del poison  # the op's at::empty output likely reuses these bytes
    got = _gemm(layout, a, b)
    assert got.dtype == torch.int32 and got.shape == (M, N)
    assert torch.equal(got, _f64_ref(a, b))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("layout", ["kn", "panels"])
@pytest.mark.parametrize("va, vb", [(-128, -128), (127, 127), (-128, 127), (-127, 127)])
def test_int8_gemm_extreme_values_everywhere(isa, layout, va, vb):
    """Constant extreme operands: every pair sum is 2 * va * vb (32768 for -128 * -128, which no
    int16 sum can hold), and with K = 131071 (the op's limit) the int32 sums reach
    131071 * 16384 = 2^31 - 16384, exact."""
    for M, K, N in [(5, 3073, 45), (300, 3073, 45), (1, 131071, 24)]:
        a = torch.full((M, K), va, dtype=torch.int8)
        b = torch.full((K, N), vb, dtype=torch.int8)
        got = _gemm(layout, a, b)
        assert torch.equal(got, torch.full((M, N), K * va * vb, dtype=torch.int32))
        assert torch.equal(got, _f64_ref(a, b))


def test_int8_gemm_reads_strided_operands_in_place():
    # b as Int8DynamicLinear keeps it (qweight.t(): (K, N) with a row stride > N), a a slice of wider rows
    g = torch.Generator().manual_seed(3)
    big_a = torch.randint(-127, 128, (29, 200), dtype=torch.int8, generator=g)
    big_b = torch.randint(-127, 128, (150, 70), dtype=torch.int8, generator=g)
    a, b = big_a[:, 7:157], big_b[:, 3:53]
    assert a.stride(1) == 1 and b.stride(1) == 1 and not b.is_contiguous()
    assert torch.equal(torch.ops.fastlm.int8_gemm_avx2(a, b), _int64_ref(a, b))
    bt = torch.randint(-127, 128, (40, 150), dtype=torch.int8, generator=g).t()  # column-major b: copied
    assert torch.equal(torch.ops.fastlm.int8_gemm_avx2(a, bt), _int64_ref(a, bt))


def test_int8_gemm_bad_input_names_the_argument():
    a = torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        torch.ops.fastlm.int8_gemm_avx2(a.float(), torch.zeros(8, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\(K, N\)"):
        torch.ops.fastlm.int8_gemm_avx2(a, torch.zeros(9, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.fastlm.int8_gemm_avx2(a[0], torch.zeros(8, 4, dtype=torch.int8))


def test_int8_gemm_panels_bad_input_names_the_argument():
    a = torch.zeros(3, 8, dtype=torch.int8)
    pan = pack_int8_panels(torch.zeros(20, 8, dtype=torch.int8))  # (2, 4, 32)
    assert torch.equal(torch.ops.fastlm.int8_gemm_avx2_panels(a, pan, 20), torch.zeros(3, 20, dtype=torch.int32))
    with pytest.raises(TypeError, match="int8"):
        torch.ops.fastlm.int8_gemm_avx2_panels(a.float(), pan, 20)
    with pytest.raises(ValueError, match="panels must be"):
        torch.ops.fastlm.int8_gemm_avx2_panels(a, pan, 40)  # n needs 3 panels
    with pytest.raises(ValueError, match="panels must be"):
        torch.ops.fastlm.int8_gemm_avx2_panels(torch.zeros(3, 10, dtype=torch.int8), pan, 20)  # K2 5 != 4
    with pytest.raises(ValueError, match="not contiguous"):
        torch.ops.fastlm.int8_gemm_avx2_panels(a, pan.transpose(0, 1).contiguous().transpose(0, 1), 20)
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.fastlm.int8_gemm_avx2_panels(a[0], pan, 20)


@pytest.fixture
def own_int8(monkeypatch):
    """int8_dynamic's GEMM forced to fastlm's AVX2 kernel (as on a CPU without VNNI)."""
    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "fastlm_avx2")


@pytest.mark.parametrize("M", [1, 17, 97, 129])
@pytest.mark.parametrize("outliers", [None, [0, 5, 40]])
def test_int8_dynamic_on_the_avx2_gemm_equals_the_exact_reference(monkeypatch, M, outliers):
    """Int8DynamicLinear (fused quantization / epilogue ops, LayerNorm variant, the outlier
    decomposition) with the AVX2 GEMM gives the bits of the same layer on an exact float64 GEMM."""
    torch.manual_seed(M)
    K, N = 97, 70
    lin = Int8DynamicLinear.from_linear(torch.nn.Linear(K, N), outliers=outliers)
    x = torch.randn(M, K)
    x[:, 5] *= 30  # an outlier channel's scale
    r = torch.randn(M, N)
    lw, lb = torch.randn(N), torch.randn(N)

    def run():
        y = lin(x, activation="gelu")
        yr = lin(x, residual=r)
        xq = lin.quantize_input(x)
        q8 = lin.forward_to_int8(x, activation="gelu_tanh", xq=xq)
        h, hq = lin.forward_add_layer_norm(xq, r, lw, lb, 1e-5)
        return y, yr, q8.q, q8.scale, h, hq.q

    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "float64")
    ref = run()
    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "fastlm_avx2")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = run()
    calls = _gemm_calls(prof, "int8_gemm_avx2") + _gemm_calls(prof, "int8_gemm_avx2_panels")
    assert calls == 4  # every GEMM of the layer went through the kernel (panels where built under the AVX2 caps)
    for g_, r_ in zip(got, ref, strict=True):
        assert torch.equal(g_, r_)
    # and the layer is what it claims: close to the float32 product on its dequantized weight
    want = F.gelu(x @ lin.dequantized().t() + lin.bias)
    assert max_err(got[0], want) < 0.05 * want.abs().max().item()


def _gemm_calls(prof, name):
    return sum(e.count for e in prof.key_averages() if e.key == f"fastlm::{name}")


def test_int8_dynamic_keeps_pair_panels_where_the_avx2_gemm_runs(monkeypatch):
    """Where the int8 GEMM is fastlm's AVX2 kernel the weight is packed once into int8 pair panels
    (its only copy) and read in place; state_dict round-trips to and from a module of the other
    layout (built where torch._int_mm runs), and a path change after the layout was made still
    gives the exact product."""
    torch.manual_seed(0)
    x = torch.randn(17, 97)
    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "fastlm_avx2")
    m = Int8DynamicLinear.from_linear(torch.nn.Linear(97, 45))
    assert m.qweight.shape == (3, 49, 32) and m.qweight.is_contiguous()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = m(x)
    assert _gemm_calls(prof, "int8_gemm_avx2_panels") == 1 and _gemm_calls(prof, "int8_gemm_avx2") == 0
    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "float64")
    assert torch.equal(m(x), y)  # panels, but the path changed: unpacked per call, the same sums
    m2 = Int8DynamicLinear.from_linear(torch.nn.Linear(97, 45))
    assert m2.qweight.shape == (45, 97) and m2.qweight.t().is_contiguous()
    m2.load_state_dict(m.state_dict())
    assert m2.qweight.shape == (45, 97) and m2.qweight.t().is_contiguous()
    assert torch.equal(m2(x), y) and torch.equal(m2.dequantized(), m.dequantized())
    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "fastlm_avx2")
    m3 = Int8DynamicLinear.from_linear(torch.nn.Linear(97, 45))
    m3.load_state_dict(m2.state_dict())
    assert m3.qweight.shape == (3, 49, 32) and torch.equal(m3.qweight, m.qweight)
    assert torch.equal(m3(x), y)
    m2.to("cpu")  # .to() re-lays out for the path now in force
    assert m2.qweight.shape == (3, 49, 32) and torch.equal(m2(x), y)


def test_the_forced_avx2_route_takes_fastlm_s_int8_gemm():
    """With fastlm._C's ISA capped below the CPU's (FASTLM_CPU_ISA=avx2 on an AVX-512 CPU, or at run
    time), int8_dynamic takes the route of an AVX2-only CPU; on this CPU's own ISA, fastlm's VNNI GEMM or
    torch's where it has an int8 dot-product instruction."""
    before = torch.ops.fastlm.cpu_isa("")
    try:
        torch.ops.fastlm.cpu_isa("avx2")
        if "avx512f" in cpu_features.cpu_flags() or not cpu_features.has_int8_dot():
            assert cpu_features.int8_gemm_path() == "fastlm_avx2"
        torch.ops.fastlm.cpu_isa("auto")
        if torch.ops.fastlm.cpu_isa("") == "avx512" and cpu_features.has_int8_dot() and cpu_features.int8_gemm_exact():
            assert cpu_features.int8_gemm_path() in ("torch._int_mm", "fastlm_vnni")
    finally:
        torch.ops.fastlm.cpu_isa(before)


def _ref_linear(x, w, b, act, res):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    if act != "none":
        y = F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    return y if res is None else y + res.double()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("shape", [(1, 33), (17, 97), (2, 49, 300), (129, 768)])
@pytest.mark.parametrize("N", [7, 40, 257])
@pytest.mark.parametrize("act, bias, res", [("none", True, False), ("gelu", False, False),
                                            ("gelu_tanh", True, False), ("none", False, True)])
def test_packed_gemm_matches_float64(isa, shape, N, act, bias, res):
    g = torch.Generator().manual_seed(shape[0] * 1000 + N)
    K = shape[-1]
    x = torch.randn(*shape, generator=g)
    w = torch.randn(N, K, generator=g) * K**-0.5
    b = torch.randn(N, generator=g) if bias else None
    r = torch.randn(*shape[:-1], N, generator=g) if res else None
    out = torch.ops.fastlm.packed_linear(x, pack_panels(w), N, None, b, r, act)
    assert out.shape == (*shape[:-1], N) and torch.isfinite(out).all()
    ref = _ref_linear(x, w, b, act, r)
    torch_err = max_err(F.linear(x, w, b), _ref_linear(x, w, b, "none", None))
    assert max_err(out, ref) <= 2 * torch_err + 2e-5, (max_err(out, ref), torch_err)


def test_packed_gemm_bad_input_names_the_argument():
    x, w = torch.randn(20, 32), pack_panels(torch.randn(40, 32))
    with pytest.raises(ValueError, match="panels of shape"):
        torch.ops.fastlm.packed_linear(x, w, 50, None, None, None, "none")
    with pytest.raises(ValueError, match="residual"):
        torch.ops.fastlm.packed_linear(x, w, 40, None, None, torch.randn(20, 41), "none")
    with pytest.raises(ValueError, match="activation"):
        torch.ops.fastlm.packed_linear(x, w, 40, None, None, None, "relu")
    with pytest.raises(TypeError, match="float32"):
        torch.ops.fastlm.packed_linear(x.double(), w, 40, None, None, None, "none")


def test_packed_linear_prefill_routes_on_avx2():
    """Prefill rows on AVX2 take gemv.cpp's register tiles (packed_linear), bit for bit, as decode rows do."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 70)
    p = PackedLinear.from_linear(lin)
    x = torch.randn(3, 40, 300)
    before = torch.ops.fastlm.cpu_isa("")
    try:
        torch.ops.fastlm.cpu_isa("avx2")
        got = tiles = p(x, activation="gelu_tanh")
        assert torch.equal(tiles, torch.ops.fastlm.packed_linear(x, p.packed, 70, None, p.bias, None, "gelu_tanh"))
        decode = p(x[:, :1])
        assert torch.equal(decode, torch.ops.fastlm.packed_linear(x[:, :1], p.packed, 70, None, p.bias, None, "none"))
    finally:
        torch.ops.fastlm.cpu_isa(before)
    ref = F.gelu(F.linear(x.double(), lin.weight.double(), lin.bias.double()), approximate="tanh")
    assert max_err(got, ref) < 1e-4 and max_err(tiles, ref) < 1e-4
