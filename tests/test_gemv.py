"""fastlm._C packed_linear (CPU decode GEMV) against fp64 references: fp32 and int8 panels,
every epilogue, awkward shapes, both ISA paths, poisoned outputs, and bad input."""

import os

import pytest
import torch
import torch.nn.functional as F

from fastlm import _ext
from fastlm.linear import (
    Int8Linear,
    PackedLinear,
    pack_panels,
    quantize_int8,
    unpack_panels,
)

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C not built: {_ext.LOAD_ERROR}")
op = torch.ops.fastlm.packed_linear if _ext.available() else None


ISAS = ["avx512", "avx2", "portable"]  # best first: "auto" picks the first this CPU runs


def available_isas() -> list[str]:
    best = torch.ops.fastlm.cpu_isa("auto") if _ext.available() else "portable"
    return ISAS[ISAS.index(best):]


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in available_isas():
        pytest.skip(f"this CPU does not run the {request.param} path (best here: {available_isas()[0]})")
    yield torch.ops.fastlm.cpu_isa(request.param)
    torch.ops.fastlm.cpu_isa("auto")


def reference(x, w, bias, residual, act):
    y = x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    if act != "none":
        y = F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    return y if residual is None else y + residual.double()


def check(y, ref, K):
    # fp32 accumulation over K terms: error grows ~sqrt(K) ulps of the dot's magnitude
    tol = 2e-6 * (K ** 0.5) * max(1.0, ref.abs().max().item())
    assert torch.isfinite(y).all()
    err = (y.double() - ref).abs().max().item()
    assert err <= tol, f"max err {err:.3g} > {tol:.3g}"


def packed_weight(w, kind):
    """w (N, K) float32 -> (panels, scale or None, the weight the kernel multiplies by, for the reference)."""
    if kind == "int8":
        q, s = quantize_int8(w)
        return pack_panels(q), s, q.double() * s.double()[:, None]
    return pack_panels(w), None, w


@pytest.mark.parametrize("M", [1, 2, 3, 5, 6, 7, 13, 16, 17, 100])
@pytest.mark.parametrize("N,K", [(1, 17), (17, 97), (97, 129), (129, 768), (768, 33), (3072, 64), (45, 1), (45, 3),
                                 (45, 98), (45, 99)])
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_packed_linear_shapes(isa, M, N, K, kind):
    x, w, b, r = torch.randn(M, K), torch.randn(N, K), torch.randn(N), torch.randn(M, N)
    packed, scale, wref = packed_weight(w, kind)
    y = op(x, packed, N, scale, b, r, "gelu")
    check(y, reference(x, wref, b, r, "gelu"), K)


@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("res", [False, True])
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_packed_linear_epilogues(isa, act, bias, res, kind):
    M, N, K = 3, 50, 40
    x = torch.randn(2, M, K)  # leading dims are kept
    w = torch.randn(N, K)
    b = torch.randn(N) if bias else None
    r = torch.randn(2, M, N) if res else None
    if kind == "int8":
        q, s = quantize_int8(w)
        y = op(x, pack_panels(q), N, s, b, r, act)
        wref = q.double() * s.double()[:, None]
    else:
        y = op(x, pack_panels(w), N, None, b, r, act)
        wref = w
    assert y.shape == (2, M, N)
    check(y, reference(x, wref, b, r, act), K)


@pytest.mark.parametrize("M", [1, 4, 13])
def test_paths_agree(M):
    """Every ISA path this CPU runs gives the same result to fp32 rounding (different sum order)."""
    isas = available_isas()
    if len(isas) < 2:
        pytest.skip("only the portable path runs on this CPU")
    x, w = torch.randn(M, 300), torch.randn(77, 300)
    q, s = quantize_int8(w)
    outs = []
    for isa in isas:
        torch.ops.fastlm.cpu_isa(isa)
        outs.append((op(x, pack_panels(w), 77, None, None, None, "gelu"),
                     op(x, pack_panels(q), 77, s, None, None, "none")))
    torch.ops.fastlm.cpu_isa("auto")
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):  # fp32 sums over K = 300 in other orders
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * 300 ** 0.5 * a.abs().max().item())


def test_output_is_fresh_not_poisoned_memory():
    """Every output element is written: poison the allocator's recent blocks with NaN first."""
    for _ in range(3):
        torch.full((64, 1000), float("nan"))
    x, w = torch.randn(16, 64), torch.randn(1000, 64)
    y = op(x, pack_panels(w), 1000, None, None, None, "none")
    assert torch.isfinite(y).all()
    check(y, reference(x, w, None, None, "none"), 64)


def test_pack_roundtrip_and_layout():
    w = torch.randn(37, 5)
    p = pack_panels(w)
    assert p.shape == (3, 5, 16) and p.is_contiguous()
    assert torch.equal(p[1, 2, 3], w[19, 2]) and torch.equal(p[2, :, 5:], torch.zeros(5, 11))
    assert torch.equal(unpack_panels(p, 37), w)


def test_quantize_int8_spec():
    w = torch.randn(33, 70) * torch.rand(33, 1) * 3
    w[5] = 0  # an all-zero row
    q, s = quantize_int8(w)
    absmax = w.abs().amax(1)
    assert torch.equal(s, absmax / 127)
    expect = torch.round(w / torch.where(s > 0, s, 1)[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(q, expect) and q.dtype == torch.int8
    assert q.abs().max() == 127 and (q[5] == 0).all() and s[5] == 0
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_modules_forward_and_relayout():
    lin = torch.nn.Linear(70, 45)
    x = torch.randn(2, 3, 70)
    p = PackedLinear.from_linear(lin)
    assert p.weight is None and p.packed.shape == (3, 70, 16)
    torch.testing.assert_close(p(x, activation="gelu_tanh", residual=x[..., :45]),
                               F.gelu(lin(x), approximate="tanh") + x[..., :45], rtol=1e-5, atol=1e-5)
    p.double()  # not fp32: plain layout, torch fallback
    assert p.packed is None and p.weight.dtype == torch.float64
    p.float()
    assert p.packed is not None
    q = Int8Linear.from_linear(lin)
    assert q.qweight.dtype == torch.int8 and q.qweight.dim() == 3 and q.scale.dtype == torch.float32
    ref = F.linear(x, q.dequantized(), lin.bias)
    # up to 16 rows the CPU GEMV rounds x to int16 per block of 64: at most absmax(x row) / 65534 per
    # element times sum |w| (tests/test_gemv_int8.py checks the per-block bound), plus fp32 rounding
    bound = x.abs().amax(-1, keepdim=True) / 65534 * q.dequantized().abs().sum(1) + 1e-5
    assert ((q(x) - ref).abs() <= bound).all()
    q.half()  # scales stay fp32; weights stay int8
    assert q.scale.dtype == torch.float32 and q.qweight.dtype == torch.int8


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.randn(2, 8, dtype=torch.float64)), TypeError, "x must be float32"),
        (dict(w=torch.randn(1, 8, 16, dtype=torch.float64)), TypeError, "float32 or int8"),
        (dict(w=torch.randn(2, 8, 16)), ValueError, r"ceil\(n/16\)"),
        (dict(w=torch.randn(1, 9, 16)), ValueError, "packed panels"),
        (dict(w=torch.randn(1, 16, 8).transpose(1, 2)), ValueError, "contiguous"),
        (dict(n=0), ValueError, "must be positive"),
        (dict(bias=torch.randn(11)), ValueError, "bias must have shape"),
        (dict(bias=torch.randn(10, dtype=torch.float64)), TypeError, "bias must be"),
        (dict(residual=torch.randn(2, 11)), ValueError, "residual must have shape"),
        (dict(activation="relu"), ValueError, "activation must be"),
        (dict(w=torch.zeros(1, 8, 16, dtype=torch.int8)), ValueError, "scale"),
        (dict(scale=torch.ones(10, dtype=torch.float64)), TypeError, "scale must be"),
        (dict(x=torch.randn(0, 8)), ValueError, "empty"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(x=torch.randn(2, 8), w=torch.randn(1, 8, 16), n=10, scale=None, bias=None, residual=None,
                activation="none")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        op(args["x"], args["w"], args["n"], args["scale"], args["bias"], args["residual"], args["activation"])


def test_cpu_isa_bad_name():
    with pytest.raises(ValueError, match="isa must be"):
        torch.ops.fastlm.cpu_isa("sse9")


def test_cpu_isa_auto_picks_the_best():
    caps = torch.backends.cpu.get_cpu_capability()  # torch's own detection: "AVX512", "AVX2", ...
    best = torch.ops.fastlm.cpu_isa("auto")
    want = {"AVX512": "avx512", "AVX2": "avx2"}.get(caps, best)
    order = ["portable", "avx2", "avx512"]
    cap = os.environ.get("FASTLM_CPU_ISA")  # "auto" still honours fastlm's own cap (torch's is separate)
    if cap in order:
        want = order[min(order.index(want), order.index(cap))]
    assert best == want


def test_fake_and_compile():
    x, w = torch.randn(3, 8), torch.randn(10, 8)
    torch.library.opcheck(op, (x, pack_panels(w), 10, None, torch.randn(10), None, "gelu"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_hugepage_copy(dtype):
    src = (torch.randn(40, 3000, 16) * 50).to(dtype).transpose(0, 1)  # not contiguous, 7.7 MB as fp32
    out = torch.ops.fastlm.hugepage_copy(src)
    assert out.is_contiguous() and out.dtype == dtype and torch.equal(out, src)
    assert out.data_ptr() % (2 << 20) == 0  # 2 MiB aligned, advised for huge pages
    out.add_(1)  # writable, and its own memory
    assert not torch.equal(out, src)
    del out  # freed by its deleter (no crash, no leak checker here)
    torch.library.opcheck(torch.ops.fastlm.hugepage_copy, (src,), test_utils=("test_schema", "test_faketensor"))


def test_large_panels_are_huge_page_aligned_small_ones_plain():
    from fastlm.linear import HUGEPAGE_MIN_BYTES

    big, small = torch.randn(3072, 768), torch.randn(40, 64)
    pb, ps = pack_panels(big), pack_panels(small)
    assert pb.numel() * 4 >= HUGEPAGE_MIN_BYTES and pb.data_ptr() % (2 << 20) == 0
    assert torch.equal(unpack_panels(pb, 3072), big) and torch.equal(unpack_panels(ps, 40), small)
    x = torch.randn(3, 768)
    check(op(x, pb, 3072, None, None, None, "none"), reference(x, big, None, None, "none"), 768)


@pytest.mark.parametrize("M", [1, 5, 7, 17, 32, 33, 97])
@pytest.mark.parametrize("K", [129, 1025, 3073])
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_register_tiles_balanced_rows(isa, M, K, kind):
    """The row tiles (AVX2: named-register 2..6-row tiles, rows split into balanced tiles, 32 rows as
    6, 6, 5, 5, 5, 5) against the fp64 reference at batched-decode row counts, long odd K, N = 45 (not a
    multiple of 16), bias and residual; the allocator's recent blocks poisoned with NaN first."""
    N = 45
    x, w, b, r = torch.randn(M, K), torch.randn(N, K), torch.randn(N), torch.randn(M, N)
    packed, scale, wref = packed_weight(w, kind)
    for _ in range(3):
        torch.full((M, N), float("nan"))
    y = op(x, packed, N, scale, b, r, "none")
    check(y, reference(x, wref, b, r, "none"), K)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_avx2_rows_independent_of_the_tile_height(kind):
    """On AVX2 every tile of 3 to 6 rows runs one FMA chain per row and channel in K order, so a row's
    result is the same bits whatever tile it falls in: 32 rows (tiles 6, 6, 5, 5, 5, 5) equal the same
    rows run 3, 4, 5 or 6 at a time (how a batched decode row can match a smaller batch's)."""
    if "avx2" not in available_isas():
        pytest.skip("this CPU does not run the AVX2 path")
    K, N = 1025, 45
    x, w = torch.randn(32, K), torch.randn(N, K)
    if kind == "int8":
        q, s = quantize_int8(w)
        packed, scale = pack_panels(q), s
    else:
        packed, scale = pack_panels(w), None
    torch.ops.fastlm.cpu_isa("avx2")
    try:
        whole = op(x, packed, N, scale, None, None, "none")
        for h in (3, 4, 5, 6):
            parts = torch.cat([op(x[i:i + h], packed, N, scale, None, None, "none") for i in range(0, 30, h)])
            assert torch.equal(parts, whole[: parts.shape[0]]), h
    finally:
        torch.ops.fastlm.cpu_isa("auto")
