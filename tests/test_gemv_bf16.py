"""fastlm._C packed_linear_bf16 (csrc/gemv_bf16.cpp: bf16 pair panels, fp32 activations and
accumulation) against a float64 product of the same bf16 weights: awkward shapes, every epilogue,
every kernel path this CPU runs (avx512_bf16 / avx512 / avx2 / portable; FASTLM_CPU_ISA caps them),
the pair-panel layout, PackedLinear in bfloat16, and bad input."""

import pytest
import torch
import torch.nn.functional as F

from fastlm import _ext
from fastlm.linear import PackedLinear, pack_bf16_panels, unpack_bf16_panels

pytestmark = pytest.mark.skipif(
    not _ext.available() or not hasattr(torch.ops.fastlm, "packed_linear_bf16"),
    reason=f"fastlm._C not built with the bf16 kernels: {_ext.LOAD_ERROR}")
op = torch.ops.fastlm.packed_linear_bf16 if _ext.available() else None

PATHS = ["avx512_bf16", "avx512", "avx2", "portable"]  # best first


def available_paths() -> list[str]:
    best = torch.ops.fastlm.bf16_gemv_path("auto")  # the best under the FASTLM_CPU_ISA cap
    return PATHS[PATHS.index(best):]


@pytest.fixture(params=PATHS)
def path(request):
    if request.param not in available_paths():
        pytest.skip(f"the {request.param} path does not run here (best here: {available_paths()[0]})")
    yield torch.ops.fastlm.bf16_gemv_path(request.param)
    torch.ops.fastlm.bf16_gemv_path("auto")


def reference(x, w, bias, residual, act):
    """float64 product of x and the bf16 weights; the bound of the kernel's error."""
    y = x.double() @ w.double().t()
    mag = x.double().abs() @ w.double().abs().t()
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    if act != "none":
        y = F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    if residual is not None:
        y = y + residual.double()
        mag = mag + residual.double().abs()
    return y, mag


def check(y, ref, mag, K):
    # x enters as fp32 (the avx512_bf16 path as bf16 hi + lo, ~2^-17 relative), products of bf16
    # weights are exact, fp32 accumulation adds ~sqrt(K) ulps: far below bf16 activations' 2^-9
    tol = (2.0**-15 + 2e-7 * K**0.5) * mag + 1e-6
    assert torch.isfinite(y).all()
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.3g}"


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


@pytest.mark.parametrize("M", [1, 2, 7, 17])
@pytest.mark.parametrize("N,K", [(1, 1), (1, 17), (17, 97), (97, 129), (129, 768), (768, 3072), (3072, 64),
                                 (1025, 17), (17, 1025)])
def test_shapes(path, M, N, K):
    x, w, b, r = torch.randn(M, K), bf16(N, K), torch.randn(N), torch.randn(M, N)
    y = op(x, pack_bf16_panels(w), N, b, r, "gelu")
    assert y.dtype == torch.float32 and y.shape == (M, N)
    check(y, *reference(x, w, b, r, "gelu"), K)


@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [None, "fp32", "bf16"])
@pytest.mark.parametrize("res", [False, True])
def test_epilogues(path, act, bias, res):
    M, N, K = 3, 50, 41
    x, w = torch.randn(2, M, K), bf16(N, K)  # leading dims are kept
    b = None if bias is None else torch.randn(N).to(torch.float32 if bias == "fp32" else torch.bfloat16)
    r = torch.randn(2, M, N) if res else None
    y = op(x, pack_bf16_panels(w), N, b, r, act)
    assert y.shape == (2, M, N)
    check(y.view(-1, N), *reference(x.view(-1, K), w, b, None if r is None else r.view(-1, N), act), K)


def test_bf16_activations_give_bf16_output(path):
    M, N, K = 5, 33, 97
    x, w, b, r = bf16(M, K), bf16(N, K), bf16(N), bf16(M, N)
    y = op(x, pack_bf16_panels(w), N, b, r, "gelu_tanh")
    assert y.dtype == torch.bfloat16
    ref, mag = reference(x, w, b, r, "gelu_tanh")
    err = (y.double() - ref).abs()
    assert bool((err <= 2.0**-8 * ref.abs() + 1e-3 * mag).all())  # one bf16 rounding of the output


def test_fp32_activations_are_not_rounded_to_bf16():
    """x with more than bf16's 8 bits: the result must see them (the vdpbf16ps path splits x)."""
    for p in available_paths():
        torch.ops.fastlm.bf16_gemv_path(p)
        try:
            x = torch.full((1, 2), 1.0 + 2.0**-12)
            w = torch.ones(1, 2, dtype=torch.bfloat16)
            y = op(x, pack_bf16_panels(w), 1)
            assert y.item() == pytest.approx(2 * (1.0 + 2.0**-12), abs=2.0**-20), p
        finally:
            torch.ops.fastlm.bf16_gemv_path("auto")


@pytest.mark.parametrize("M", [1, 6, 40])
def test_paths_agree(M):
    N, K = 77, 300
    x, w, b = torch.randn(M, K), bf16(N, K), torch.randn(N)
    wp = pack_bf16_panels(w)
    ref, mag = reference(x, w, b, None, "gelu")
    for p in available_paths():
        torch.ops.fastlm.bf16_gemv_path(p)
        try:
            check(op(x, wp, N, b, None, "gelu"), ref, mag, K)
        finally:
            torch.ops.fastlm.bf16_gemv_path("auto")


@pytest.fixture
def knobs():
    names = ("prefetch", "chunk_kb", "tail_kb", "avx2_tile1")
    old = {k: torch.ops.fastlm.bf16_gemv_knob(k) for k in names}
    yield torch.ops.fastlm.bf16_gemv_knob
    for k, v in old.items():
        torch.ops.fastlm.bf16_gemv_knob(k, v)


@pytest.mark.parametrize("M", [1, 3])
def test_chunk_schedules_and_prefetch(path, knobs, M):
    """Several chunks shared with the pool's helpers (guided and uniform schedules, chunks of a few
    panels, prefetch on / off): every channel is still computed once, by the same arithmetic."""
    torch.set_num_threads(2)
    N, K = 1025, 1025  # 65 panels of 513 rows: 66 KB each, a job of ~4 MB
    x, w, b = torch.randn(M, K), bf16(N, K), torch.randn(N)
    wp = pack_bf16_panels(w)
    ref, mag = reference(x, w, b, None, "none")
    first = None
    for pf, chunk, tail in [(1024, 512, 64), (0, 512, 0), (4096, 64, 1), (64, 1, 1), (1024, 100000, 100000)]:
        knobs("prefetch", pf), knobs("chunk_kb", chunk), knobs("tail_kb", tail)
        y = op(x, wp, N, b)
        check(y, ref, mag, K)
        if first is None:
            first = y
        assert torch.equal(y, first), (pf, chunk, tail)


@pytest.mark.parametrize("N,K", [(1, 1), (17, 97), (129, 768), (33, 1025), (1025, 64)])
def test_avx2_one_row_tile_matches_the_array_tile(knobs, N, K):
    """The register-only one-row AVX2 tile (decode) against the tile it replaced (avx2_tile1 0):
    the same sums in the same order, so bit-equal, and within the float64 bound; odd K included."""
    if "avx2" not in available_paths():
        pytest.skip("the avx2 path does not run here")
    torch.ops.fastlm.bf16_gemv_path("avx2")
    try:
        x, w, b, r = torch.randn(1, K), bf16(N, K), torch.randn(N), torch.randn(1, N)
        wp = pack_bf16_panels(w)
        knobs("avx2_tile1", 0)
        old = op(x, wp, N, b, r, "gelu_tanh")
        knobs("avx2_tile1", 1)
        new = op(x, wp, N, b, r, "gelu_tanh")
        check(new, *reference(x, w, b, r, "gelu_tanh"), K)
        assert torch.equal(new, old)
    finally:
        torch.ops.fastlm.bf16_gemv_path("auto")


def test_knob_bad_input(knobs):
    with pytest.raises(ValueError, match="name must be"):
        knobs("grain", 3)
    with pytest.raises(ValueError, match="value must be"):
        knobs("prefetch", -5)
    with pytest.raises(ValueError, match="chunk_kb must be"):
        knobs("chunk_kb", 0)


def test_auto_path_follows_the_isa_cap():
    isa = torch.ops.fastlm.cpu_isa("")
    got = torch.ops.fastlm.bf16_gemv_path("auto")
    if isa == "avx512":
        assert got in ("avx512_bf16", "avx512")
    else:
        assert got == isa  # FASTLM_CPU_ISA=avx2 runs the AVX2 path, portable the portable one


def test_pack_layout_and_roundtrip():
    N, K = 19, 7
    w = bf16(N, K)
    p = pack_bf16_panels(w)
    assert p.shape == (2, 4, 32) and p.dtype == torch.bfloat16 and p.is_contiguous()
    for n, k in [(0, 0), (3, 5), (18, 6), (16, 1)]:
        assert p[n // 16, k // 2, 2 * (n % 16) + k % 2] == w[n, k]
    assert (p[1, :, 2 * 3:] == 0).all() and (p[:, 3, 1::2] == 0).all()  # padding past N and K
    assert torch.equal(unpack_bf16_panels(p, N, K), w)
    with pytest.raises(ValueError, match="2-D bfloat16"):
        pack_bf16_panels(torch.randn(3, 4))


def test_packed_linear_module_bf16():
    lin = torch.nn.Linear(97, 45)
    m = PackedLinear.from_linear(lin).to(torch.bfloat16)  # fp32 panels -> bf16 pair panels, not a cast of them
    assert m.weight is None and m.packed.shape == (3, 49, 32) and m.packed.dtype == torch.bfloat16
    wb = lin.weight.detach().to(torch.bfloat16)
    assert torch.equal(m.dense_weight(), wb)
    x, r = torch.randn(4, 97), torch.randn(4, 45)
    assert m.fused_ready(x) and m.fused_ready(x.bfloat16())
    ref, mag = reference(x, wb, m.bias, r, "gelu")
    check(m(x, activation="gelu", residual=r), ref, mag, 97)
    back = m.to(torch.float32)  # pair panels -> fp32 panels of the same (bf16-valued) weights
    assert back.packed.dtype == torch.float32 and back.packed.shape == (3, 97, 16)
    assert torch.equal(back.dense_weight(), wb.float())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(w=torch.zeros(2, 4, 32)), TypeError, "w must be bfloat16"),
        (dict(w=torch.zeros(2, 5, 32, dtype=torch.bfloat16)), ValueError, "pair panels of shape"),
        (dict(n=0), ValueError, "must be positive"),
        (dict(x=torch.randn(3, 8).double()), TypeError, "x must be float32 or bfloat16"),
        (dict(bias=torch.randn(7)), ValueError, "bias must be"),
        (dict(residual=torch.randn(3, 7)), ValueError, "residual must be"),
        (dict(residual=torch.randn(3, 20).bfloat16()), TypeError, "residual has dtype"),
        (dict(activation="relu"), ValueError, "activation must be"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(x=torch.randn(3, 8), w=pack_bf16_panels(bf16(20, 8)), n=20, bias=None, residual=None,
                activation="none")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        op(args["x"], args["w"], args["n"], args["bias"], args["residual"], args["activation"])


def test_path_bad_name():
    with pytest.raises(ValueError, match="path must be"):
        torch.ops.fastlm.bf16_gemv_path("sse")


def test_fake():
    x, w = torch.randn(3, 8), pack_bf16_panels(bf16(10, 8))
    torch.library.opcheck(op, (x, w, 10, torch.randn(10), None, "gelu"), test_utils=("test_schema", "test_faketensor"))
