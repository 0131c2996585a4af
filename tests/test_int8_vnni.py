"""fastlm's AVX-512 VNNI / AMX-INT8 int8 GEMM (csrc/int8_gemm_vnni.cpp, int8_gemm_amx.cpp) and the
fused int8 linears built on it (csrc/quant_cpu.cpp int8_linear_vnni*): exact int32 sums against a
float64 product, bit for bit the unfused epilogues on that product, the same bits at any thread count
and on the portable loop, and Int8DynamicLinear keeping its weight as quad panels where the path is
"fastlm_vnni". On a CPU without VNNI the same ops run the portable loop, so every test here runs on
every CPU. The GEMM tests run on the tiles this CPU runs (`tiles`: AMX-INT8, AVX-512 VNNI or the
portable loop) and, on an AMX CPU, once more on the VNNI tiles with AMX turned off."""

import pytest
import torch
import torch.nn.functional as F

from fastlm import _ext, cpu_features
from fastlm.linear import Int8DynamicLinear, Int8TiedEmbedding, pack_int8_quads, unpack_int8_quads

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastlm._C is not built")

ops = torch.ops.fastlm


def _exact(a, w):
    return (a.double() @ w.double().t()).to(torch.int32)  # |sums| < 2^53: float64 is exact


def _operands(M, K, N, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    return a, w


def _poison(shape, dtype):
    """NaN / garbage blocks of the output's size freed just before the op allocates its own."""
    for _ in range(2):
        t = torch.empty(shape, dtype=dtype)
        t.fill_(float("nan") if dtype.is_floating_point else -7)
        del t


@pytest.fixture
def isa():
    before = ops.cpu_isa("")
    yield ops.cpu_isa
    ops.cpu_isa(before)


@pytest.fixture(params=["auto", "vnni"])
def tiles(request):
    """Runs the test on the tiles this CPU runs ("auto": AMX-INT8, AVX-512 VNNI or, capped / without VNNI,
    the portable loop), and once more on the AVX-512 VNNI tiles where "auto" runs AMX
    (torch.ops.fastlm.int8_gemm_tiles("vnni") turns AMX off)."""
    auto = ops.int8_gemm_tiles("auto")
    try:
        if request.param == "vnni":
            if auto != "amx":
                pytest.skip(f"the VNNI tiles with AMX off: this CPU runs {auto} anyway (the 'auto' case)")
            assert ops.int8_gemm_tiles("vnni") == "vnni"
        yield ops.int8_gemm_tiles("")
    finally:
        ops.int8_gemm_tiles("auto")


def test_int8_gemm_tiles_names_and_checks_its_argument():
    assert ops.int8_gemm_tiles("") in ("amx", "vnni", "portable")
    with pytest.raises(ValueError, match="int8_gemm_tiles: set must be"):
        ops.int8_gemm_tiles("amx512")
    flags = cpu_features.cpu_flags()
    if ops.cpu_isa("") == "avx512" and {"avx512bw", "avx512_vnni"} <= flags:
        assert ops.int8_gemm_tiles("") == ("amx" if "amx_int8" in flags else "vnni")
        assert cpu_features.own_int8_tiles() == ops.int8_gemm_tiles("")


def test_quads_layout_round_trips():
    _, w = _operands(3, 13, 37, 0)
    p = pack_int8_quads(w)
    assert p.dtype == torch.uint8 and p.shape == (3, 4, 64) and p.is_contiguous()
    assert p[0, 1, 4 * 5 + 2].item() == w[5, 6].item() + 128  # [p, kk, 4j + t] = w[16p + j, 4kk + t] + 128
    assert (p[2, :, 4 * 5:] == 128).all() and (p[:, 3, 4 * 0 + 1:4] == 128).all()  # past N = 37, past K = 13
    assert torch.equal(unpack_int8_quads(p, 37, 13), w)
    with pytest.raises(ValueError, match="q must be 2-D int8"):
        pack_int8_quads(w.float())


@pytest.mark.parametrize("M", [1, 17, 97, 129, 1025])
@pytest.mark.parametrize("K,N", [(1, 1), (3, 17), (97, 45), (129, 33), (768, 129), (1025, 16), (3073, 48)])
def test_int8_gemm_vnni_is_exact(M, K, N, tiles):
    a, w = _operands(M, K, N, M * 7919 + K * 31 + N)
    _poison((M, N), torch.int32)
    assert torch.equal(ops.int8_gemm_vnni(a, pack_int8_quads(w), N), _exact(a, w))


@pytest.mark.parametrize("K", [4, 4096, 65792])
def test_int8_gemm_vnni_extremes(K, tiles):
    """The largest sums the contract allows: -128 activations against -127 / 127 weights over K."""
    a = torch.full((9, K), -128, dtype=torch.int8)
    a[1::2] = 127
    w = torch.full((20, K), 127, dtype=torch.int8)
    w[::3] = -127
    got = ops.int8_gemm_vnni(a, pack_int8_quads(w), 20)
    assert torch.equal(got, _exact(a, w))
    assert got.abs().max().item() == 128 * 127 * K


@pytest.mark.parametrize("M", [1, 17, 97, 300])
def test_int8_gemm_vnni_threads_and_portable_agree(M, isa, tiles):
    a, w = _operands(M, 257, 200, M)
    p = pack_int8_quads(w)
    want = _exact(a, w)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(ops.int8_gemm_vnni(a, p, 200), want), threads
    finally:
        torch.set_num_threads(before)
    isa("portable")
    assert torch.equal(ops.int8_gemm_vnni(a, p, 200), want)


def test_int8_gemm_vnni_strided_rows(tiles):
    a, w = _operands(33, 100, 40, 3)
    wide = torch.zeros(33, 160, dtype=torch.int8)
    wide[:, 20:120] = a
    view = wide[:, 20:120]  # row stride 160, unit column stride
    assert torch.equal(ops.int8_gemm_vnni(view, pack_int8_quads(w), 40), _exact(a, w))


def _epilogue_inputs(M, N, seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(M, generator=g) * 1e-2 + 1e-4
    ws = torch.rand(N, generator=g) * 1e-2 + 1e-4
    b = torch.randn(N, generator=g)
    r = torch.randn(M, N, generator=g)
    lw, lb = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return xs, ws, b, r, lw, lb


@pytest.mark.parametrize("M", [1, 17, 97, 129])
@pytest.mark.parametrize("K,N", [(97, 45), (768, 129), (129, 768)])
@pytest.mark.parametrize("outliers", [False, True])
def test_fused_ops_equal_the_unfused_epilogues(M, K, N, outliers, tiles):
    """int8_linear_vnni / _quant / _ln_quant give, bit for bit, the epilogue ops of quant_cpu.cpp on
    the exact int32 product (the same row functions, fed block by block)."""
    a, w = _operands(M, K, N, M + K + N)
    p = pack_int8_quads(w)
    acc = _exact(a, w)
    xs, ws, b, r, lw, lb = _epilogue_inputs(M, N, M * N)
    xo = wo = outl = None
    if outliers:
        g = torch.Generator().manual_seed(5)
        xo, wo = torch.randn(M, 3, generator=g), torch.randn(3, N, generator=g)
        outl = torch.tensor([0, N // 2, N - 1])
    for act in ("none", "gelu", "gelu_tanh"):
        want = ops.int8_linear_epilogue(acc, xs, ws, b, act, r if act == "none" else None, xo, wo)
        _poison((M, N), torch.float32)
        got = ops.int8_linear_vnni(a, p, N, xs, ws, b, act, r if act == "none" else None, xo, wo)
        assert torch.equal(got, want), act
        want_q = ops.int8_linear_epilogue_quant(acc, xs, ws, None, act, xo, wo, outl)
        got_q = ops.int8_linear_vnni_quant(a, p, N, xs, ws, None, act, xo, wo, outl)
        for g_, w_ in zip(got_q, want_q, strict=True):
            assert torch.equal(g_, w_), act
    acc2 = acc.clone()
    want_ln = ops.int8_linear_epilogue_ln_quant_(acc2, xs, ws, b, r, lw, lb, 1e-12, xo, wo, outl)
    got_h, *got_ln = ops.int8_linear_vnni_ln_quant(a, p, N, xs, ws, b, r, lw, lb, 1e-12, xo, wo, outl)
    assert torch.equal(got_h, acc2.view(torch.float32))
    for g_, w_ in zip(got_ln, want_ln, strict=True):
        assert torch.equal(g_, w_)
    # and the plain float64 meaning of the first: act(a w^T xs ws + xo wo + b)
    ref = acc.double() * xs.double()[:, None] * ws.double() + b.double()
    if outliers:
        ref += xo.double() @ wo.double()
    y = ops.int8_linear_vnni(a, p, N, xs, ws, b, "gelu", None, xo, wo)
    assert (y.double() - F.gelu(ref)).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


def test_fused_ops_bad_input_names_the_argument():
    a, w = _operands(4, 10, 20, 1)
    p = pack_int8_quads(w)
    xs, ws, b, r, lw, lb = _epilogue_inputs(4, 20, 2)
    with pytest.raises(TypeError, match="a must be int8"):
        ops.int8_gemm_vnni(a.int(), p, 20)
    with pytest.raises(TypeError, match="quads must be uint8"):
        ops.int8_gemm_vnni(a, p.view(torch.int8), 20)
    with pytest.raises(ValueError, match=r"quads must have shape \(3, 3, 64\)"):
        ops.int8_gemm_vnni(a, p, 40)
    with pytest.raises(ValueError, match="n must be positive"):
        ops.int8_gemm_vnni(a, p, 0)
    with pytest.raises(ValueError, match="a must be a non-empty 2-D"):
        ops.int8_gemm_vnni(a[0], p, 20)
    with pytest.raises(ValueError, match="unit column stride"):
        ops.int8_gemm_vnni(a.t().contiguous().t(), p, 20)
    with pytest.raises(ValueError, match="K .* must be at most 65792"):
        ops.int8_gemm_vnni(torch.zeros(1, 65793, dtype=torch.int8), torch.zeros(1, 16449, 64, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="quads must be contiguous"):
        ops.int8_gemm_vnni(a, p.transpose(0, 1).contiguous().transpose(0, 1), 20)
    with pytest.raises(ValueError, match="x_scale must have shape"):
        ops.int8_linear_vnni(a, p, 20, xs[:3], ws)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        ops.int8_linear_vnni_quant(a, p, 20, xs, ws[:3])
    with pytest.raises(ValueError, match="activation must be"):
        ops.int8_linear_vnni(a, p, 20, xs, ws, b, "relu")
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.int8_linear_vnni_ln_quant(a, p, 20, xs, ws, b, r[:, :3], lw, lb, 1e-5)
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        ops.int8_linear_vnni_ln_quant(a, p, 20, xs, ws, b, r, lw[:3], lb, 1e-5)
    with pytest.raises(ValueError, match="outliers must be channel indices"):
        ops.int8_linear_vnni_quant(a, p, 20, xs, ws, None, "none", None, None, torch.tensor([20]))


def test_fused_ops_opcheck():
    a, w = _operands(17, 33, 40, 4)
    p = pack_int8_quads(w)
    xs, ws, b, r, lw, lb = _epilogue_inputs(17, 40, 3)
    torch.library.opcheck(ops.int8_gemm_vnni, (a, p, 40))
    torch.library.opcheck(ops.int8_linear_vnni, (a, p, 40, xs, ws, b, "gelu", None))
    torch.library.opcheck(ops.int8_linear_vnni_quant, (a, p, 40, xs, ws, b, "gelu"))
    torch.library.opcheck(ops.int8_linear_vnni_ln_quant, (a, p, 40, xs, ws, b, r, lw, lb, 1e-5))


@pytest.fixture
def vnni_path(monkeypatch):
    """int8_dynamic's GEMM forced to fastlm's VNNI kernel (its portable loop on a CPU without VNNI)."""
    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "fastlm_vnni")


def _gemm_calls(prof, name):
    return sum(e.count for e in prof.key_averages() if e.key == f"fastlm::{name}")


@pytest.mark.parametrize("M", [1, 17, 97, 129])
@pytest.mark.parametrize("outliers", [None, [0, 5, 40]])
def test_int8_dynamic_on_the_vnni_gemm_equals_the_exact_reference(monkeypatch, M, outliers):
    """Int8DynamicLinear (forward, residual, forward_to_int8, forward_add_layer_norm, outlier
    channels) on the fused VNNI ops gives the bits of the same layer on an exact float64 GEMM."""
    torch.manual_seed(M)
    K, N = 97, 70
    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "fastlm_vnni")
    lin = Int8DynamicLinear.from_linear(torch.nn.Linear(K, N), outliers=outliers)
    assert lin.qweight.dtype == torch.uint8 and lin.qweight.shape == (5, 25, 64)
    x = torch.randn(M, K)
    x[:, 5] *= 30
    r = torch.randn(M, N)
    lw, lb = torch.randn(N), torch.randn(N)

    def run():
        y = lin(x, activation="gelu")
        yr = lin(x, residual=r)
        xq = lin.quantize_input(x)
        q8 = lin.forward_to_int8(x, activation="gelu_tanh", xq=xq)
        h, hq = lin.forward_add_layer_norm(xq, r, lw, lb, 1e-5)
        return y, yr, q8.q, q8.scale, h, hq.q, hq.scale

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = run()
    names = ("int8_linear_vnni", "int8_linear_vnni_quant", "int8_linear_vnni_ln_quant")
    fused = sum(_gemm_calls(prof, n) for n in names)
    assert fused == 4 and _gemm_calls(prof, "int8_gemm_vnni") == 0  # every GEMM fused with its epilogue
    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "float64")
    ref = run()  # quads, path changed: the unfused epilogues on an exact product
    for g_, r_ in zip(got, ref, strict=True):
        assert torch.equal(g_, r_)
    want = F.gelu(x @ lin.dequantized().t() + lin.bias)
    assert (got[0] - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_int8_dynamic_keeps_quads_and_state_dict_crosses_layouts(monkeypatch):
    """The weight is packed once into quads (its only copy); state_dict loads into modules of the
    other layouts and back, and .to() re-lays out for the path in force."""
    torch.manual_seed(0)
    x = torch.randn(17, 97)
    monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "fastlm_vnni")
    m = Int8DynamicLinear.from_linear(torch.nn.Linear(97, 45))
    y = m(x)
    for path, shape in (("torch._int_mm", (45, 97)), ("fastlm_avx2", (3, 49, 32))):
        monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda p=path: p)
        other = Int8DynamicLinear.from_linear(torch.nn.Linear(97, 45))
        other.load_state_dict(m.state_dict())
        assert other.qweight.shape == shape and torch.equal(other.dequantized(), m.dequantized())
        monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: "fastlm_vnni")
        back = Int8DynamicLinear.from_linear(torch.nn.Linear(97, 45))
        back.load_state_dict(other.state_dict())
        assert back.qweight.dtype == torch.uint8 and torch.equal(back.qweight, m.qweight)
        assert torch.equal(back(x), y)
        other.to("cpu")
        assert other.qweight.dtype == torch.uint8 and torch.equal(other(x), y)


def test_tied_embedding_reads_quads(vnni_path):
    torch.manual_seed(1)
    head = Int8DynamicLinear.from_linear(torch.nn.Linear(37, 50, bias=False))
    assert head.qweight.dtype == torch.uint8
    emb = Int8TiedEmbedding(head, torch.float32)
    ids = torch.tensor([[0, 17, 49], [16, 31, 3]])
    assert torch.equal(emb(ids), head.dequantized()[ids])


def test_the_path_on_this_cpu():
    """fastlm_vnni exactly where the CPU has AVX-512 VNNI (AMX-INT8 CPUs too: its AMX tiles run there)
    and fastlm._C runs AVX-512."""
    flags = cpu_features.cpu_flags()
    want = {"avx512bw", "avx512_vnni"} <= flags and ops.cpu_isa("") == "avx512"
    assert (cpu_features.int8_gemm_path() == "fastlm_vnni") == want


@pytest.mark.parametrize("src", ["fastlm_vnni", "fastlm_avx2", "torch._int_mm"])
@pytest.mark.parametrize("dst", ["fastlm_vnni", "fastlm_avx2", "torch._int_mm"])
def test_state_dict_of_another_size_is_refused_in_any_layout(monkeypatch, src, dst):
    """A weight saved for a wider layer is refused (size mismatch), whichever layouts it was saved
    and is loaded in: relaying it out would crop it to this layer's in_features."""
    def build(path, k):
        monkeypatch.setattr(cpu_features, "int8_gemm_path", lambda: path)
        return Int8DynamicLinear.from_linear(torch.nn.Linear(k, 32))

    saved = build(src, 64).state_dict()
    target = build(dst, 56)
    before = target.qweight.clone()
    with pytest.raises(RuntimeError, match="size mismatch for qweight"):
        target.load_state_dict(saved)
    assert torch.equal(target.qweight, before)
