"""The dynamic int8 passes of csrc/quant_cpu.cpp (quantize_rows_int8, int8_linear_epilogue) against
pure-torch references, Int8DynamicLinear's fused path against its torch fallback, and the packed
oneDNN weight of CPULinear (built once, rebuilt when the weight changes, fused GELU / residual,
the path without oneDNN)."""

import pytest
import torch
import torch.nn.functional as F

from fastlm import _ext, cpu_features
from fastlm import linear as flinear
from fastlm.linear import Int8DynamicLinear
from fastlm.linear_cpu import CPULinear, onednn_packable

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastlm._C is not built")

ROWS = [1, 17, 97, 129]


def _poison_allocator(shape, dtype):
    """Leave NaN-filled blocks of the output's size in the allocator's reach, so an element the op
    forgets to write would likely read NaN (the op allocates its own output)."""
    for _ in range(2):
        t = torch.empty(shape, dtype=torch.float32)
        t.fill_(float("nan"))
        del t


def _quant_ref(x):
    xs = x.abs().amax(dim=1, keepdim=True) / 127.0
    xs = torch.where(xs > 0, xs, torch.ones_like(xs))
    return torch.round(x / xs).clamp(-127, 127).to(torch.int8), xs[:, 0]


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("K", [1, 17, 97, 768])
def test_quantize_rows_int8_equals_torch(M, K):
    x = torch.randn(M, K) * torch.rand(M, 1) * 10  # rows of different ranges
    if M > 1:
        x[M // 2] = 0  # an all-zero row: scale 1, q 0
    q, s = torch.ops.fastlm.quantize_rows_int8(x)
    q_ref, s_ref = _quant_ref(x)
    assert q.dtype == torch.int8 and q.shape == (M, K) and s.dtype == torch.float32 and s.shape == (M,)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


def test_quantize_rows_int8_half_way_rounds_to_even_and_strided_input():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])  # scale 1: ties go to the even integer
    q, s = torch.ops.fastlm.quantize_rows_int8(x)
    assert s.item() == 1.0 and q.tolist() == [[127, 0, 2, 2, 0, -2]]
    xt = torch.randn(97, 40).t()  # (40, 97), not contiguous
    q, s = torch.ops.fastlm.quantize_rows_int8(xt)
    q_ref, s_ref = _quant_ref(xt)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def _epilogue_ref(acc, xs, ws, b, act, r):
    y = acc.double() * xs.double()[:, None] * ws.double()
    if b is not None:
        y = y + b.double()
    if act != "none":
        y = F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    return y if r is None else y + r.double()


def _gemm_out(M, N, bias):
    """Fresh random int32 GEMM accumulators (M, N), per-token and per-channel scales, a bias."""
    acc = torch.randint(-40000, 40000, (M, N), dtype=torch.int32)
    xs, ws = torch.rand(M) * 0.02, torch.rand(N) * 2e-4
    return acc, xs, ws, (torch.randn(N) if bias else None)


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N", [1, 17, 129, 3072])
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (True, True)])
def test_int8_linear_epilogue_matches_float64(M, N, act, bias, residual):
    acc, xs, ws, b = _gemm_out(M, N, bias)
    r = torch.randn(M, N) if residual else None
    _poison_allocator((M, N), torch.float32)
    y = torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b, act, r)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    ref = _epilogue_ref(acc, xs, ws, b, act, r)
    err = (y.double() - ref).abs().max().item()
    assert err <= 2e-6 * max(1.0, ref.abs().max().item()), err


def test_quant_ops_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="x must be float32"):
        torch.ops.fastlm.quantize_rows_int8(torch.randn(4, 8).double())
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.fastlm.quantize_rows_int8(torch.randn(8))
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.fastlm.quantize_rows_int8(torch.randn(0, 8))
    acc, xs, ws = torch.zeros(4, 8, dtype=torch.int32), torch.ones(4), torch.ones(8)
    f = torch.ops.fastlm.int8_linear_epilogue
    with pytest.raises(TypeError, match="acc must be int32"):
        f(acc.float(), xs, ws)
    with pytest.raises(ValueError, match="x_scale must have shape"):
        f(acc, torch.ones(5), ws)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        f(acc, xs, torch.ones(7))
    with pytest.raises(ValueError, match="bias must have shape"):
        f(acc, xs, ws, torch.ones(9))
    with pytest.raises(ValueError, match="residual must have shape"):
        f(acc, xs, ws, None, "none", torch.ones(4, 9))
    with pytest.raises(ValueError, match="activation must be"):
        f(acc, xs, ws, None, "relu")


def test_quant_ops_opcheck():
    torch.library.opcheck(torch.ops.fastlm.quantize_rows_int8, (torch.randn(17, 97),))
    acc = torch.randint(-1000, 1000, (17, 33), dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastlm.int8_linear_epilogue,
                          (acc, torch.rand(17), torch.rand(33), torch.randn(33), "gelu", torch.randn(17, 33)))


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("act", [None, "gelu"])
def test_int8_dynamic_fused_path_equals_torch_path(M, act, monkeypatch):
    lin = torch.nn.Linear(97, 129)
    m = Int8DynamicLinear.from_linear(lin)
    if cpu_features.int8_gemm_path() == "fastlm_avx2":  # the AVX2 int8 GEMM's pair panels, packed once
        assert m.qweight.shape == (9, 49, 32) and m.qweight.is_contiguous()
    elif cpu_features.int8_gemm_path() == "fastlm_vnni":  # the VNNI GEMM's uint8 quad panels, packed once
        assert m.qweight.shape == (9, 25, 64) and m.qweight.dtype == torch.uint8 and m.qweight.is_contiguous()
    else:
        assert m.qweight.shape == (129, 97) and m.qweight.t().is_contiguous()  # (K, N) memory
    x = torch.randn(M, 97)
    r = None if act else torch.randn(M, 129)
    fused = m(x, activation=act, residual=r)
    monkeypatch.setattr(flinear._ext, "available", lambda: False)
    plain = m(x, activation=act, residual=r)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def _ref_linear(x, lin, act=None, r=None):
    y = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    if act is not None:
        y = F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    return y if r is None else y + r.double()


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("act,residual", [(None, False), ("gelu", False), ("gelu_tanh", False), (None, True)])
def test_cpu_linear_packed_fused_matches_float64(M, act, residual):
    lin = CPULinear(97, 129)
    x = torch.randn(M, 97)
    r = torch.randn(M, 129) if residual else None
    with torch.inference_mode():
        y = lin(x, activation=act, residual=r)
    assert torch.isfinite(y).all()
    err = (y.double() - _ref_linear(x, lin, act, r)).abs().max().item()
    assert err <= 2e-5, err


@pytest.mark.skipif(not onednn_packable(), reason="this torch has no oneDNN")
def test_cpu_linear_packs_once_and_follows_the_weight():
    """The weight is packed once (oneDNN's reorder, or fastlm's panels where fastlm._C runs AVX2: run
    on one thread there, where the panels are used), reused by later calls, and repacked when the
    weight changes in place or is replaced."""
    lin = CPULinear(64, 96)
    x = torch.randn(40, 64)
    tiles = lin.panels_layout(x)
    with _threads(1 if tiles else torch.get_num_threads()), torch.inference_mode():
        lin(x)
        packed = lin._panels if tiles else lin._packed
        assert packed is not None and (tiles or packed.is_mkldnn)
        assert (lin._packed is None) if tiles else (lin._panels is None)  # one packed copy, not two
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            y = lin(x)
    names = {e.key for e in p.key_averages()}
    if tiles:
        assert "fastlm::packed_linear" in names and "mkldnn::_linear_pointwise" not in names
        assert lin._panels is packed  # reused
    else:
        assert "mkldnn::_linear_pointwise" in names and "mkldnn::_reorder_linear_weight" not in names
        assert lin._packed is packed  # reused
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # in place: the packed copy must follow
    with _threads(1 if tiles else torch.get_num_threads()), torch.inference_mode():
        y2 = lin(x)
        torch.testing.assert_close(y2, F.linear(x, lin.weight, lin.bias), atol=4e-5, rtol=1e-5)
        lin.weight = torch.nn.Parameter(torch.randn(96, 64))  # another tensor
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=4e-5, rtol=1e-5)


class _threads:
    """torch.set_num_threads(n) inside the block, the old count after."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


@pytest.mark.parametrize("M", [1, 17, 97, 129])
@pytest.mark.parametrize("act,residual", [(None, False), ("gelu", False), ("gelu_tanh", False), (None, True)])
def test_cpu_linear_on_fastlm_tiles_at_avx2(M, act, residual):
    """Where fastlm._C runs AVX2 (cpu_isa "avx2"), float32 CPULinear runs packed_linear on its panels:
    act(x W^T + b) + r within float32 rounding of a float64 reference, 3-D inputs too."""
    if not {"avx2", "fma"} <= cpu_features.cpu_flags():
        pytest.skip("this CPU has no AVX2 + FMA: fastlm._C cannot run AVX2 here")
    before = torch.ops.fastlm.cpu_isa("")
    try:
        torch.ops.fastlm.cpu_isa("avx2")
        lin = CPULinear(129, 97)
        x = torch.randn(M, 129)
        r = torch.randn(M, 97) if residual else None
        want = _ref_linear(x, lin, act, r)
        assert lin.panels_layout(x)
        with _threads(1), torch.inference_mode():
            assert lin.tiles_here(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                y = lin(x, activation=act, residual=r)
            y3 = lin(x.view(1, M, 129), activation=act, residual=None if r is None else r.view(1, M, 97))
        assert "fastlm::packed_linear" in {e.key for e in p.key_averages()}
        assert lin._panels is not None and lin._packed is None
        assert (y.double() - want).abs().max().item() <= 2e-5 * (1 + want.abs().max().item())
        assert torch.equal(y3.view(M, 97), y)
        with _threads(2), torch.inference_mode():  # more intra-op threads: oneDNN on the plain weight
            assert not lin.tiles_here(x)
            y2 = lin(x, activation=act, residual=r)
        assert lin._packed is None  # still one packed copy, the panels
        assert (y2.double() - want).abs().max().item() <= 2e-5 * (1 + want.abs().max().item())
    finally:
        torch.ops.fastlm.cpu_isa(before)


def test_cpu_linear_without_onednn():
    lin = CPULinear(64, 96)
    x, r = torch.randn(40, 64), torch.randn(40, 96)
    with torch.backends.mkldnn.flags(enabled=False), torch.inference_mode():
        assert lin.onednn_weight() is None
        y = lin(x, residual=r)
        g = lin(x, activation="gelu")
    assert (y.double() - _ref_linear(x, lin, None, r)).abs().max() <= 2e-5
    assert (g.double() - _ref_linear(x, lin, "gelu")).abs().max() <= 2e-5


def test_linear_ext_bad_packed_and_epilogue_args():
    lin = CPULinear(16, 8)
    x = torch.randn(40, 16)
    with pytest.raises(ValueError, match="packed must be"):
        torch.ops.fastlm.linear_ext(x, lin.weight.detach(), None, torch.randn(8, 16))
    with pytest.raises(ValueError, match="activation must be"):
        torch.ops.fastlm.linear_ext(x, lin.weight.detach(), None, None, "relu")
    with pytest.raises(ValueError, match="residual must have shape"):
        torch.ops.fastlm.linear_ext(x, lin.weight.detach(), None, None, "none", torch.randn(40, 9))
    with pytest.raises(ValueError, match="activation must be"):
        lin(x, activation="relu")


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N", [1, 17, 129, 3072])
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_epilogue_quant_equals_epilogue_then_quantize(M, N, act, bias):
    acc, xs, ws, b = _gemm_out(M, N, bias)
    if M > 1:
        acc[M // 2] = 0  # a row that is all zero (without a bias): scale 1
    q, s, yo = torch.ops.fastlm.int8_linear_epilogue_quant(acc, xs, ws, b, act)
    y = torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b, act)
    q_ref, s_ref = _quant_ref(y)
    assert q.dtype == torch.int8 and q.shape == (M, N) and s.shape == (M,) and yo.shape == (M, 0)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


def test_int8_linear_epilogue_quant_bad_input():
    f = torch.ops.fastlm.int8_linear_epilogue_quant
    acc = torch.zeros(4, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="x_scale must have shape"):
        f(acc, torch.ones(3), torch.ones(8))
    with pytest.raises(ValueError, match="activation must be"):
        f(acc, torch.ones(4), torch.ones(8), None, "relu")
    torch.library.opcheck(f, (torch.randint(-99, 99, (17, 33), dtype=torch.int32), torch.rand(17), torch.rand(33),
                              torch.randn(33), "gelu"))


@pytest.mark.parametrize("M", ROWS)
def test_int8_ffn_seam_keeps_the_activation_int8(M, monkeypatch):
    """common.ffn on two Int8DynamicLinear: the d_ff activation goes int8 to int8 (fused epilogue +
    quantization) and equals the unfused path (fc, then proj with its own quantization)."""
    from fastlm.models.common import ffn

    fc = Int8DynamicLinear.from_linear(torch.nn.Linear(97, 129))
    proj = Int8DynamicLinear.from_linear(torch.nn.Linear(129, 97))
    x, r = torch.randn(2, M, 97), torch.randn(2, M, 97)
    got = ffn(fc, proj, x, "gelu", residual=r)
    expect = proj(fc(x, activation="gelu"), residual=r)
    assert got.shape == (2, M, 97)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    monkeypatch.setattr(flinear._ext, "available", lambda: False)  # the torch path: same math
    torch.testing.assert_close(ffn(fc, proj, x, "gelu", residual=r), expect, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not onednn_packable(), reason="this torch has no oneDNN")
def test_cpu_linear_copies_and_moves_drop_the_packed_copy():
    import copy

    lin = CPULinear(64, 96)
    x = torch.randn(40, 64)
    tiles = lin.panels_layout(x)
    attr = "_panels" if tiles else "_packed"  # fastlm's panels at AVX2 (used on one thread), else oneDNN's reorder
    with _threads(1 if tiles else torch.get_num_threads()), torch.inference_mode():
        y = lin(x)
    assert getattr(lin, attr) is not None
    twin = copy.deepcopy(lin)
    assert getattr(twin, attr) is None  # rebuilt on use, not copied
    with _threads(1 if tiles else torch.get_num_threads()), torch.inference_mode():
        torch.testing.assert_close(twin(x), y)
    lin.double()
    assert getattr(lin, attr) is None
    with torch.inference_mode():
        torch.testing.assert_close(lin(x.double()), F.linear(x.double(), lin.weight, lin.bias))


# -- in place: the epilogue written over the GEMM's int32 output, and the fused residual LayerNorm


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N", [1, 17, 129, 3072])
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True)])
def test_int8_linear_epilogue_inplace_equals_out_of_place(M, N, act, bias, residual):
    acc, xs, ws, b = _gemm_out(M, N, bias)
    r = torch.randn(M, N) if residual else None
    expect = torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b, act, r)
    out = torch.ops.fastlm.int8_linear_epilogue_(acc, xs, ws, b, act, r)
    assert out is None
    y = acc.view(torch.float32)  # every int32 slot now holds its float32 result
    assert torch.equal(y, expect)  # a slot left unwritten would read as its int32 bits


def _ln_quant_inputs(M, N, bias):
    acc, xs, ws, b = _gemm_out(M, N, bias)
    r = torch.randn(M, N) * 3
    lw, lb = torch.randn(N), torch.randn(N)
    return acc, xs, ws, b, r, lw, lb


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N", [1, 17, 129, 768])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_epilogue_ln_quant_equals_unfused(M, N, bias):
    """h = LN((acc * xs * ws + b) + r) written over acc, and (q, scale) of h: bit for bit the three
    unfused ops in sequence (the same arithmetic), and h close to a float64 reference."""
    acc, xs, ws, b, r, lw, lb = _ln_quant_inputs(M, N, bias)
    eps = 1e-12
    dense = torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b)
    h_ref = torch.ops.fastlm.add_layer_norm_ext(dense, r, lw, lb, eps)[0]
    q_ref, s_ref = torch.ops.fastlm.quantize_rows_int8(h_ref)
    f64 = F.layer_norm(_epilogue_ref(acc, xs, ws, b, "none", r), (N,), lw.double(), lb.double(), eps)
    _poison_allocator((M, N), torch.float32)
    q, s, ho = torch.ops.fastlm.int8_linear_epilogue_ln_quant_(acc, xs, ws, b, r, lw, lb, eps)
    h = acc.view(torch.float32)
    assert ho.shape == (M, 0)
    assert q.dtype == torch.int8 and q.shape == (M, N) and s.dtype == torch.float32 and s.shape == (M,)
    assert torch.equal(h, h_ref) and torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert (h.double() - f64).abs().max().item() <= 1e-4, "LayerNorm of the epilogue drifted from float64"
    assert torch.equal(q, _quant_ref(h)[0]) and torch.equal(s, _quant_ref(h)[1])  # and the torch quantization


def test_inplace_epilogues_bad_input_names_the_argument():
    acc, xs, ws, b, r, lw, lb = _ln_quant_inputs(4, 8, True)
    f = torch.ops.fastlm.int8_linear_epilogue_ln_quant_
    with pytest.raises(TypeError, match="acc must be int32"):
        f(acc.float(), xs, ws, b, r, lw, lb, 1e-5)
    with pytest.raises(ValueError, match="x_scale must have shape"):
        f(acc, torch.ones(3), ws, b, r, lw, lb, 1e-5)
    with pytest.raises(ValueError, match="residual must have shape"):
        f(acc, xs, ws, b, torch.randn(4, 9), lw, lb, 1e-5)
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        f(acc, xs, ws, b, r, torch.ones(9), lb, 1e-5)
    with pytest.raises(TypeError, match="ln_bias must be float32"):
        f(acc, xs, ws, b, r, lw, lb.double(), 1e-5)
    with pytest.raises(ValueError, match="eps must be positive"):
        f(acc, xs, ws, b, r, lw, lb, 0.0)
    strided = torch.zeros(8, 4, dtype=torch.int32).t()  # (4, 8), not contiguous: cannot be written in place
    with pytest.raises(ValueError, match="acc must be contiguous"):
        f(strided, xs, ws, b, r, lw, lb, 1e-5)
    with pytest.raises(ValueError, match="acc must be contiguous"):
        torch.ops.fastlm.int8_linear_epilogue_(strided, xs, ws)
    with pytest.raises(ValueError, match="activation must be"):
        torch.ops.fastlm.int8_linear_epilogue_(acc, xs, ws, None, "relu")
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.fastlm.int8_linear_epilogue_(acc, xs, ws, torch.ones(7))


def test_inplace_epilogues_opcheck():
    acc, xs, ws, b, r, lw, lb = _ln_quant_inputs(17, 33, True)
    torch.library.opcheck(torch.ops.fastlm.int8_linear_epilogue_ln_quant_, (acc, xs, ws, b, r, lw, lb, 1e-5))
    acc = torch.randint(-1000, 1000, (17, 33), dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastlm.int8_linear_epilogue_, (acc, xs, ws, b, "gelu", r))


# -- the seam: LN(residual + int8 linear) and the next linear's quantization in one pass


def _int8(n_in, n_out):
    return Int8DynamicLinear.from_linear(torch.nn.Linear(n_in, n_out))


def _ln(n):
    ln = torch.nn.LayerNorm(n, eps=1e-12)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    return ln


@pytest.mark.parametrize("M", ROWS)
def test_int8_seam_add_layer_norm_equals_unfused(M, monkeypatch):
    """common.linear_add_layer_norm / ffn_add_layer_norm on Int8DynamicLinear: h bit for bit the
    unfused path (linear, then ops.layer_norm with the residual, on fastlm._C's LayerNorm rows),
    hq = quantize_rows_int8(h), and a linear fed hq equals one that quantizes h itself."""
    from fastlm.models import common

    dense, fc, proj, nxt = _int8(97, 129), _int8(129, 300), _int8(300, 129), _int8(129, 33)
    ln1, ln2 = _ln(129), _ln(129)
    y, x = torch.randn(2, M, 97), torch.randn(2, M, 129)
    a, aq = common.linear_add_layer_norm(dense, y, x, ln1)
    expect_a = torch.ops.fastlm.add_layer_norm_ext(dense(y), x, ln1.weight, ln1.bias, ln1.eps)[0]
    assert a.shape == (2, M, 129) and torch.equal(a, expect_a)
    assert torch.equal(aq.q, torch.ops.fastlm.quantize_rows_int8(a.reshape(-1, 129))[0])
    assert torch.equal(aq.scale, torch.ops.fastlm.quantize_rows_int8(a.reshape(-1, 129))[1])
    h, hq = common.ffn_add_layer_norm(fc, proj, a, "gelu", ln2, xq=aq)
    f = common.ffn(fc, proj, a, "gelu")  # quantizes a itself
    assert h.shape == (2, M, 129) and torch.equal(h, torch.ops.fastlm.add_layer_norm_ext(f, a, ln2.weight, ln2.bias,
                                                                                            ln2.eps)[0])
    assert torch.equal(hq.q, torch.ops.fastlm.quantize_rows_int8(h.reshape(-1, 129))[0])
    assert torch.equal(common.linear(nxt, h, xq=hq), nxt(h))
    assert torch.equal(common.linear(nxt, h, activation="gelu", xq=hq), nxt(h, activation="gelu"))
    # without fastlm._C: the torch path (own quantization, torch LayerNorm), hq None, same math
    monkeypatch.setattr(flinear._ext, "available", lambda: False)
    a2, aq2 = common.linear_add_layer_norm(dense, y, x, ln1)
    assert aq2 is None
    torch.testing.assert_close(a2, a, rtol=1e-5, atol=1e-5)
    h2, hq2 = common.ffn_add_layer_norm(fc, proj, a, "gelu", ln2)  # the same input a: the same int8 rows
    assert hq2 is None
    # torch's GELU differs from fast_math's erf by ~1e-7, which flips the int8 rounding of a few d_ff
    # activations; one flip moves an output by ~1e-3 after the LayerNorm
    torch.testing.assert_close(h2, h, rtol=0, atol=1e-2)
    assert (h2 - h).abs().le(1e-4).float().mean() >= 0.95


def test_seam_add_layer_norm_on_float_linears_is_the_plain_path():
    """fp32 linears: (LN(residual + linear(x)), None), the path the models always took."""
    from fastlm import ops
    from fastlm.models import common

    lin, fc, proj, ln = CPULinear(97, 129), CPULinear(129, 300), CPULinear(300, 129), _ln(129)
    y, x = torch.randn(40, 97), torch.randn(40, 129)
    with torch.inference_mode():
        a, aq = common.linear_add_layer_norm(lin, y, x, ln)
        assert aq is None and torch.equal(a, ops.layer_norm(lin(y), ln.weight, ln.bias, ln.eps, residual=x)[0])
        h, hq = common.ffn_add_layer_norm(fc, proj, a, "gelu", ln)
        f = common.ffn(fc, proj, a, "gelu")
        assert hq is None and torch.equal(h, ops.layer_norm(f, ln.weight, ln.bias, ln.eps, residual=a)[0])


# -- outlier channels (LLM.int8()-style static decomposition, issue 23.3) ---------------------------


def _outlier_idx(K, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(K, generator=g)[:n].sort().values


def _masked_quant_ref(x, idx):
    xm = x.clone()
    xm[:, idx] = 0
    return _quant_ref(xm)


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("K,n_o", [(17, 1), (97, 3), (768, 16)])
def test_quantize_rows_int8_with_outliers(M, K, n_o):
    """Outlier channels are left out of each row's absmax and quantized as 0: bit for bit torch's
    quantization of x with those channels zeroed; they carry the rows' largest values here, so a
    scale that still saw them would differ."""
    x = torch.randn(M, K)
    idx = _outlier_idx(K, n_o, M * K)
    x[:, idx] *= 40.0
    q, s = torch.ops.fastlm.quantize_rows_int8(x, idx)
    q_ref, s_ref = _masked_quant_ref(x, idx)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert (q[:, idx] == 0).all() and not torch.equal(s, _quant_ref(x)[1])


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N", [1, 17, 129])
@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("residual", [True, False])
def test_int8_linear_epilogue_outlier_product(M, N, act, residual):
    """y = act(acc * xs * ws + x_out @ w_out + b) + r against float64, out of place and in place."""
    acc, xs, ws, b = _gemm_out(M, N, True)
    n_o = 5
    xo, wo = torch.randn(M, n_o) * 10, torch.randn(n_o, N) * 0.1
    r = torch.randn(M, N) if residual else None
    pre = acc.double() * xs.double()[:, None] * ws.double() + xo.double() @ wo.double() + b.double()
    ref = F.gelu(pre) if act == "gelu" else pre
    ref = ref + r.double() if residual else ref
    _poison_allocator((M, N), torch.float32)
    y = torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b, act, r, xo, wo)
    tol = 1e-5 * ref.abs().max().item() + 1e-5
    assert (y.double() - ref).abs().max().item() <= tol
    acc2 = acc.clone()
    torch.ops.fastlm.int8_linear_epilogue_(acc2, xs, ws, b, act, r, xo, wo)
    assert torch.equal(acc2.view(torch.float32), y)
    assert not torch.allclose(y, torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b, act, r), atol=1e-3)


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N", [17, 300])
def test_int8_linear_epilogue_quant_with_outliers(M, N):
    """The epilogue (with its own input's outlier product) then quantize_rows_int8(y, outliers);
    y_out = y[:, outliers] in float32."""
    acc, xs, ws, b = _gemm_out(M, N, True)
    xo, wo = torch.randn(M, 3), torch.randn(3, N)
    idx = _outlier_idx(N, 4, N)
    q, s, yo = torch.ops.fastlm.int8_linear_epilogue_quant(acc, xs, ws, b, "gelu", xo, wo, idx)
    y = torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b, "gelu", None, xo, wo)
    q_ref, s_ref = torch.ops.fastlm.quantize_rows_int8(y, idx)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and torch.equal(yo, y[:, idx])


@pytest.mark.parametrize("M", ROWS)
def test_int8_linear_epilogue_ln_quant_with_outliers(M):
    acc, xs, ws, b, r, lw, lb = _ln_quant_inputs(M, 129, True)
    xo, wo = torch.randn(M, 2), torch.randn(2, 129)
    idx = _outlier_idx(129, 3, M)
    dense = torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b, "none", None, xo, wo)
    h_ref = torch.ops.fastlm.add_layer_norm_ext(dense, r, lw, lb, 1e-12)[0]
    q_ref, s_ref = torch.ops.fastlm.quantize_rows_int8(h_ref, idx)
    q, s, ho = torch.ops.fastlm.int8_linear_epilogue_ln_quant_(acc, xs, ws, b, r, lw, lb, 1e-12, xo, wo, idx)
    h = acc.view(torch.float32)
    assert torch.equal(h, h_ref) and torch.equal(q, q_ref) and torch.equal(s, s_ref) and torch.equal(ho, h[:, idx])


def test_outlier_arguments_bad_input_names_the_argument():
    acc, xs, ws, b = _gemm_out(4, 8, True)
    f = torch.ops.fastlm.int8_linear_epilogue
    with pytest.raises(ValueError, match="x_out and w_out go together"):
        f(acc, xs, ws, b, "none", None, torch.randn(4, 2))
    with pytest.raises(ValueError, match="w_out must have shape"):
        f(acc, xs, ws, b, "none", None, torch.randn(4, 2), torch.randn(3, 8))
    with pytest.raises(ValueError, match="x_out must have shape"):
        f(acc, xs, ws, b, "none", None, torch.randn(5, 2), torch.randn(2, 8))
    with pytest.raises(TypeError, match="x_out and w_out must be float32"):
        f(acc, xs, ws, b, "none", None, torch.randn(4, 2).double(), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"outliers must be channel indices in \[0, 8\)"):
        torch.ops.fastlm.quantize_rows_int8(torch.randn(4, 8), torch.tensor([1, 8]))
    with pytest.raises(TypeError, match="outliers must be int64"):
        torch.ops.fastlm.quantize_rows_int8(torch.randn(4, 8), torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="outliers must be channel indices"):
        torch.ops.fastlm.int8_linear_epilogue_quant(acc, xs, ws, b, "none", None, None, torch.tensor([-1]))
    idx = torch.tensor([0, 5])
    torch.library.opcheck(torch.ops.fastlm.quantize_rows_int8, (torch.randn(17, 97), idx))
    torch.library.opcheck(torch.ops.fastlm.int8_linear_epilogue_quant,
                          (acc, xs, ws, b, "gelu", torch.randn(4, 2), torch.randn(2, 8), idx))
    acc2, xs2, ws2, b2, r2, lw, lb = _ln_quant_inputs(17, 33, True)
    torch.library.opcheck(torch.ops.fastlm.int8_linear_epilogue_ln_quant_,
                          (acc2, xs2, ws2, b2, r2, lw, lb, 1e-5, torch.randn(17, 2), torch.randn(2, 33), idx))


@pytest.mark.parametrize("M", ROWS)
def test_int8_seam_with_outlier_channels_equals_unfused(M, monkeypatch):
    """The seam with outlier channels on every linear (each LayerNorm'd output quantized for the
    outlier set of the linear it feeds): the fused chain equals the unfused one (each linear's own
    forward, fastlm._C's LayerNorm), and the torch path without fastlm._C computes the same."""
    from fastlm.models import common

    g = torch.Generator().manual_seed(M)

    def lin(n_in, n_out, n_o):
        return Int8DynamicLinear.from_linear(torch.nn.Linear(n_in, n_out),
                                             torch.randperm(n_in, generator=g)[:n_o])

    dense, proj, nxt = lin(97, 129, 2), lin(300, 129, 4), lin(129, 33, 3)
    fc = Int8DynamicLinear.from_linear(torch.nn.Linear(129, 300), nxt.outliers.clone())  # the 129-wide stream's set
    dense.next_outliers, proj.next_outliers = fc.outliers, nxt.outliers
    ln1, ln2 = _ln(129), _ln(129)
    y, x = torch.randn(2, M, 97), torch.randn(2, M, 129)
    y[..., dense.outliers] *= 30.0
    a, aq = common.linear_add_layer_norm(dense, y, x, ln1)
    expect_a = torch.ops.fastlm.add_layer_norm_ext(dense(y), x, ln1.weight, ln1.bias, ln1.eps)[0]
    assert torch.equal(a, expect_a) and fc.takes(aq) and torch.equal(aq.xo, a.reshape(-1, 129)[:, fc.outliers])
    h, hq = common.ffn_add_layer_norm(fc, proj, a, "gelu", ln2, xq=aq)
    f = common.ffn(fc, proj, a, "gelu")  # quantizes a itself
    assert torch.equal(h, torch.ops.fastlm.add_layer_norm_ext(f, a, ln2.weight, ln2.bias, ln2.eps)[0])
    fused = common.linear(nxt, h, xq=hq)
    assert nxt.takes(hq) and torch.equal(fused, nxt(h))
    dense_fused = dense(y)
    monkeypatch.setattr(flinear._ext, "available", lambda: False)
    torch.testing.assert_close(nxt(h), fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(y), dense_fused, rtol=1e-5, atol=1e-5)


# ---- the AVX-512 / AVX2 rows against the portable (plain C++) rows, bit for bit ----------------

QUANT_ISAS = ["avx512", "avx2", "portable"]
AWKWARD = [1, 15, 16, 17, 31, 33, 97, 1025, 3073]


def _quant_isas():
    """The row paths this process may take, from the current one (capped by FASTLM_CPU_ISA) down."""
    return QUANT_ISAS[QUANT_ISAS.index(torch.ops.fastlm.cpu_isa("")):]


def _per_isa(fn):
    """fn() under every available row path (the ISA restored after), as {isa: result}."""
    prev = torch.ops.fastlm.cpu_isa("")
    out = {}
    try:
        for isa in _quant_isas():
            torch.ops.fastlm.cpu_isa(isa)
            out[isa] = fn()
    finally:
        torch.ops.fastlm.cpu_isa(prev)
    return out


def _awkward_x(M, K, kind, g):
    """Rows of one kind: random ranges, exact .5 ties after the division by the scale (absmax
    127 * 2^e, values (k + .5) * 2^e), ties perturbed by a few ulps, huge values, subnormal
    scales; an all-zero row."""
    e = torch.randint(-30, 30, (M, 1), generator=g).float()
    if kind == "randn":
        x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 10
    elif kind in ("ties", "near_ties"):
        x = torch.randint(-127, 127, (M, K), generator=g).float() + 0.5
        if kind == "near_ties":
            x = x + torch.randint(-3, 4, (M, K), generator=g).float() * 2.0**-17
        x = x * torch.exp2(e)
        x[:, 0] = 127 * torch.exp2(e[:, 0])
    elif kind == "huge":
        x = torch.randn(M, K, generator=g) * 1e37
    else:  # "tiny": absmax / 127 is subnormal
        x = torch.randn(M, K, generator=g) * 1e-38
    if M > 2:
        x[1] = 0
    return x


@pytest.mark.parametrize("K", AWKWARD)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_quantize_rows_int8_isa_paths_equal_torch_bit_for_bit(M, K):
    """quantize_rows_int8 == torch.round(x / scale).clamp(-127, 127) exactly (a true division, ties to
    even) on every row path, with and without outlier channels; with NaN / inf inputs (no torch
    reference) the paths agree with the portable one bit for bit."""
    g = torch.Generator().manual_seed(M * 10007 + K)
    for kind in ["randn", "ties", "near_ties", "huge", "tiny"]:
        x = _awkward_x(M, K, kind, g)
        idx = _outlier_idx(K, min(3, K - 1), K) if K > 1 else None
        def run(x=x, idx=idx):
            return (*torch.ops.fastlm.quantize_rows_int8(x), *torch.ops.fastlm.quantize_rows_int8(x, idx))
        for isa, (q, s, qo, so) in _per_isa(run).items():
            q_ref, s_ref = _quant_ref(x)
            assert torch.equal(s, s_ref) and torch.equal(q, q_ref), (isa, kind)
            if idx is not None:
                qo_ref, so_ref = _masked_quant_ref(x, idx)
                assert torch.equal(so, so_ref) and torch.equal(qo, qo_ref), (isa, kind)
    x = torch.randn(M, K, generator=g)
    x.view(-1)[torch.randint(0, M * K, (max(1, M * K // 8),), generator=g)] = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 3e38])[torch.randint(0, 4, (max(1, M * K // 8),), generator=g)]
    res = _per_isa(lambda: torch.ops.fastlm.quantize_rows_int8(x))
    for isa, (q, s) in res.items():
        assert torch.equal(q, res["portable"][0]) and torch.equal(s, res["portable"][1]), isa


@pytest.mark.parametrize("N", AWKWARD)
@pytest.mark.parametrize("M", [1, 17])
def test_fused_epilogues_isa_paths_bit_for_bit(M, N):
    """On every row path: epilogue_quant == epilogue then quantize_rows_int8, ln_quant == epilogue,
    add_layer_norm_ext, quantize_rows_int8, all exactly, and every path's outputs equal the portable
    path's; acc with .5 ties after the division (x_scale = w_scale = 1, absmax 254)."""
    g = torch.Generator().manual_seed(M * 7919 + N)
    ties = torch.randint(-254, 255, (M, N), generator=g, dtype=torch.int32)
    ties[:, 0] = 254
    cases = [(ties, torch.ones(M), torch.ones(N), None), (*_gemm_out(M, N, True),)]
    r, lw, lb = torch.randn(M, N, generator=g) * 3, torch.randn(N, generator=g), torch.randn(N, generator=g)
    idx = _outlier_idx(N, min(2, N - 1), N) if N > 1 else None
    for acc, xs, ws, b in cases:
        def run(acc=acc, xs=xs, ws=ws, b=b):
            out = []
            for act in ["none", "gelu", "gelu_tanh"]:
                out += torch.ops.fastlm.int8_linear_epilogue_quant(acc, xs, ws, b, act, None, None, idx)
                y = torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b, act)
                out += [y, *torch.ops.fastlm.quantize_rows_int8(y, idx)]
            a2 = acc.clone()
            out += torch.ops.fastlm.int8_linear_epilogue_ln_quant_(a2, xs, ws, b, r, lw, lb, 1e-12, None, None, idx)
            h = torch.ops.fastlm.add_layer_norm_ext(torch.ops.fastlm.int8_linear_epilogue(acc, xs, ws, b), r, lw, lb,
                                                    1e-12)[0]
            out += [a2.view(torch.float32), h, *torch.ops.fastlm.quantize_rows_int8(h, idx)]
            return out
        res = _per_isa(run)
        for isa, out in res.items():
            for k in range(3):  # epilogue_quant (q, scale) == quantize_rows_int8(epilogue)
                q, s, _, _, q2, s2 = out[6 * k:6 * k + 6]
                assert torch.equal(q, q2) and torch.equal(s, s2), (isa, k)
            q, s, _, h_inplace, h, q2, s2 = out[18:]
            assert torch.equal(h_inplace, h) and torch.equal(q, q2) and torch.equal(s, s2), isa
            assert all(torch.equal(a, p) for a, p in zip(out, res["portable"], strict=True)), isa
