"""The int8 decode GEMV on pair panels (csrc/gemv.cpp "int8 pair panels", fastlm.linear.pack_int8_panels):
activations quantized to int16 per block of 64, int8 x int16 products summed in int32 (AVX-512 VNNI,
AVX-512BW, AVX2, portable), against an fp64 reference of the same int8 weights with a stated bound:

    |y - y_ref| <= sum_b absmax(x_b) / 65534 * sum_{k in b} |w_k|   (the int16 rounding of x, exact)
                   + 2e-6 * sqrt(K) * max(1, |y_ref|)               (fp32 sums, as test_gemv.check)

and the fp32-activation mode (int8_gemv_mode(0)) against the same reference at fp32 rounding."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastlm import _ext
from fastlm.linear import Int8Linear, pack_int8_panels, pack_panels, quantize_int8, unpack_int8_panels

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C not built: {_ext.LOAD_ERROR}")
op = torch.ops.fastlm.packed_linear if _ext.available() else None
QB = 64  # activation block of the int16 quantization (csrc/gemv.cpp kQB)
ISAS = ["avx512", "avx2", "portable"]


def available_isas() -> list[str]:
    best = torch.ops.fastlm.cpu_isa("auto")
    return ISAS[ISAS.index(best):]


@pytest.fixture(params=[(isa, mode) for isa in ISAS for mode in (1, 2)], ids=lambda p: f"{p[0]}-mode{p[1]}")
def path(request):
    isa, mode = request.param
    if isa not in available_isas():
        pytest.skip(f"this CPU does not run the {isa} path")
    if mode == 2 and isa != "avx512":
        pytest.skip("mode 2 (VNNI) differs from mode 1 only on the AVX-512 path")
    torch.ops.fastlm.cpu_isa(isa)
    torch.ops.fastlm.int8_gemv_mode(mode)
    yield isa, mode
    torch.ops.fastlm.cpu_isa("auto")
    torch.ops.fastlm.int8_gemv_mode(2)


def reference(x, w, bias=None, residual=None, act="none"):
    y = x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    if act != "none":
        y = F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    return y if residual is None else y + residual.double()


def act_bound(x, w):
    """Per output element: the largest change of x @ w^T that rounding x to int16 per block can make."""
    M, K = x.shape
    nb = -(-K // QB)
    xp = torch.zeros(M, nb * QB, dtype=torch.float64)
    xp[:, :K] = x.double()
    wp = torch.zeros(w.shape[0], nb * QB, dtype=torch.float64)
    wp[:, :K] = w.double().abs()
    amax = xp.abs().view(M, nb, QB).amax(-1)  # (M, nb)
    wsum = wp.view(-1, nb, QB).sum(-1)  # (N, nb)
    return (amax / 65534) @ wsum.t()  # (M, N)


def check(y, ref, K, extra=0.0):
    assert torch.isfinite(y).all()
    err = (y.double() - ref).abs()
    tol = 2e-6 * K ** 0.5 * max(1.0, ref.abs().max().item()) + extra
    assert (err <= tol).all(), f"max err {err.max().item():.3g} over the bound (max {torch.as_tensor(tol).max():.3g})"


def case(M, N, K, outlier=False):
    x, w = torch.randn(M, K), torch.randn(N, K)
    if outlier:  # GPT-2 style: a few dimensions ~100x the others
        x[:, torch.randperm(K)[: max(1, K // 97)]] *= 100
    q, s = quantize_int8(w)
    return x, q, s, q.double() * s.double()[:, None]


@pytest.mark.parametrize("M", [1, 2, 3, 5, 7, 8, 9, 15, 16])
@pytest.mark.parametrize("N,K", [(1, 1), (17, 97), (97, 129), (129, 768), (768, 17), (3072, 64), (45, 3072),
                                 (33, 1025), (19, 3073)])
def test_int16_gemv_within_the_bound(path, M, N, K):
    x, q, s, wref = case(M, N, K, outlier=True)
    b, r = torch.randn(N), torch.randn(M, N)
    y = op(x, pack_int8_panels(q), N, s, b, r, "none")
    ref = reference(x, wref, b, r)
    check(y, ref, K, act_bound(x, wref))


@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh"])
def test_int16_gemv_epilogues_and_leading_dims(path, act):
    x, w = torch.randn(2, 3, 130), torch.randn(50, 130)
    q, s = quantize_int8(w)
    wref = q.double() * s.double()[:, None]
    b, r = torch.randn(50), torch.randn(2, 3, 50)
    y = op(x, pack_int8_panels(q), 50, s, b, r, act)
    assert y.shape == (2, 3, 50)
    # GELU is 1.13-Lipschitz: the bound carries through it
    check(y, reference(x, wref, b, r, act), 130, 1.13 * act_bound(x.reshape(-1, 130), wref).view(2, 3, 50))


@pytest.mark.parametrize("K", [1, 17, 97, 768])
def test_fp32_activation_mode_is_exact_weight_only(K):
    """int8_gemv_mode(0): fp32 activations on the same pair panels, fp32 rounding only; and the old
    (K, 16) int8 panels give the same values as pair panels there."""
    x, q, s, wref = case(3, 45, K)
    try:
        torch.ops.fastlm.int8_gemv_mode(0)
        y = op(x, pack_int8_panels(q), 45, s, None, None, "none")
    finally:
        torch.ops.fastlm.int8_gemv_mode(2)
    check(y, reference(x, wref), K)
    check(op(x, pack_panels(q), 45, s, None, None, "none"), reference(x, wref), K)


def test_int16_error_is_far_below_the_int8_weight_error():
    """GPT-2 c_fc-sized GEMV, max error over the outputs: with 100x outlier activations the error the
    int16 activations add is < 2% of the error int8 weights already make (measured 1.2%), without
    outliers < 0.5% (both in fp64 against the fp32 weights)."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 768), torch.randn(3072, 768) * 0.02
    x[:, [7, 300, 555]] *= 100
    q, s = quantize_int8(w)
    wref = q.double() * s.double()[:, None]
    y = op(x, pack_int8_panels(q), 3072, s, None, None, "none").double()
    exact = reference(x, w)
    act_err = (y - reference(x, wref)).abs().max().item()
    w_err = (reference(x, wref) - exact).abs().max().item()
    assert 0 < act_err < 0.02 * w_err, (act_err, w_err)
    x = torch.randn(1, 768)
    y = op(x, pack_int8_panels(q), 3072, s, None, None, "none").double()
    act_err = (y - reference(x, wref)).abs().max().item()
    w_err = (reference(x, wref) - reference(x, w)).abs().max().item()
    assert 0 < act_err < 0.005 * w_err, (act_err, w_err)


def test_paths_agree():
    """Every ISA and mode sums the same int32 per block: outputs agree to fp32 rounding of the
    per-block fp32 sums (a few ulps), not to the int16 bound."""
    x, q, s, _ = case(5, 77, 300, outlier=True)
    p = pack_int8_panels(q)
    outs = []
    try:
        for isa in available_isas():
            torch.ops.fastlm.cpu_isa(isa)
            for mode in (1, 2):
                torch.ops.fastlm.int8_gemv_mode(mode)
                outs.append(op(x, p, 77, s, None, None, "none"))
    finally:
        torch.ops.fastlm.cpu_isa("auto")
        torch.ops.fastlm.int8_gemv_mode(2)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6 * outs[0].abs().max().item())


def test_nan_and_inf_propagate():
    x, q, s, _ = case(2, 33, 200)
    x[0, 150] = float("nan")
    x[1, 3] = float("inf")
    y = op(x, pack_int8_panels(q), 33, s, None, None, "none")
    assert torch.isnan(y).all()


def test_pack_int8_panels_layout_and_roundtrip():
    q = torch.randint(-127, 128, (37, 5), dtype=torch.int8)
    p = pack_int8_panels(q)
    assert p.shape == (3, 3, 32) and p.dtype == torch.int8 and p.is_contiguous()
    assert p[1, 1, 2 * 3 + 1] == q[19, 3] and p[1, 1, 2 * 3] == q[19, 2]
    assert torch.equal(p[:, 2, 1::2], torch.zeros(3, 16, dtype=torch.int8))  # k = 5 is padding
    assert torch.equal(p[2, :, 2 * 5:], torch.zeros(3, 22, dtype=torch.int8))  # channels past 37
    assert torch.equal(unpack_int8_panels(p, 37, 5), q)
    assert torch.equal(unpack_int8_panels(pack_panels(q), 37, 5), q)
    with pytest.raises(ValueError, match="pack_int8_panels: q must be 2-D int8"):
        pack_int8_panels(q.float())


def test_bad_pair_panel_shape_is_a_clear_error():
    q, s = quantize_int8(torch.randn(20, 9))
    with pytest.raises(ValueError, match="pair panels"):
        op(torch.randn(1, 9), pack_int8_panels(q)[:, :4].contiguous(), 20, s, None, None, "none")
    with pytest.raises(ValueError, match="int8_gemv_mode: level must be"):
        torch.ops.fastlm.int8_gemv_mode(3)


def test_int8_linear_uses_pair_panels_on_cpu():
    lin = torch.nn.Linear(71, 45)
    m = Int8Linear.from_linear(lin)
    assert m.qweight.shape == (3, 36, 32)
    x = torch.randn(4, 71)
    wref = m.dequantized().double()
    check(m(x), reference(x, wref, lin.bias.detach()), 71, act_bound(x, wref))
    xs = torch.randn(40, 71)  # prefill (> 16 rows): fp32 activations, fp32 rounding only
    check(m(xs), reference(xs, wref, lin.bias.detach()), 71)


@pytest.fixture
def two_threads():
    prev, prev_pf = torch.get_num_threads(), torch.ops.fastlm.int8_gemv_prefetch(-1)
    yield
    torch.set_num_threads(prev)
    torch.ops.fastlm.int8_gemv_prefetch(prev_pf)


# one row, work large enough to be shared (>= 64 KB of panels per thread): 1, 2 and 3 threads (chunks
# of output channels claimed from the pool's counter), with and without software prefetch; the same
# tiles on the same panels, so the outputs are identical, and within the fp64 bound
@pytest.mark.parametrize("N,K", [(1025, 1025), (4099, 129), (97, 3073), (3000, 768)])
def test_one_row_threads_agree_bit_for_bit(path, two_threads, N, K):
    x, q, s, wref = case(1, N, K, outlier=True)
    b, r = torch.randn(N), torch.randn(1, N)
    p = pack_int8_panels(q)
    ref = reference(x, wref, b, r, "gelu_tanh")
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for pf in (0, 1024):
            torch.ops.fastlm.int8_gemv_prefetch(pf)
            torch.full((N + 64,), float("nan")).sum()  # leave NaN-filled memory for the output to land on
            y = op(x, p, N, s, b, r, "gelu_tanh")
            check(y, ref, K, 1.13 * act_bound(x, wref))
            outs.append(y)
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


# Rows per int16 tile (csrc/gemv.cpp i16_rows: AVX-512BW 16, the wide tiles from 5 rows on; AVX2 4, at
# most 6; portable 2), capped with int8_tile_rows: every row's int32 block sums and its fp32 sum order
# are the same at any tile size, so the outputs are the same bits; each within the fp64 bound, written
# over NaN-filled memory (poisoned outputs)
@pytest.fixture
def tile_rows():
    yield
    torch.ops.fastlm.int8_tile_rows(0)


@pytest.mark.parametrize("M", [5, 7, 8, 9, 15, 16])
@pytest.mark.parametrize("N,K", [(45, 129), (97, 1025), (19, 3073)])
def test_tile_sizes_agree_bit_for_bit(path, tile_rows, M, N, K):
    x, q, s, wref = case(M, N, K, outlier=True)
    b, r = torch.randn(N), torch.randn(M, N)
    p = pack_int8_panels(q)
    ref = reference(x, wref, b, r, "gelu")
    bound = 1.13 * act_bound(x, wref)
    outs = []
    for cap in (1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 0):
        assert torch.ops.fastlm.int8_tile_rows(cap) == cap
        torch.full((M * N + 64,), float("nan")).sum()  # leave NaN-filled memory for the output to land on
        y = op(x, p, N, s, b, r, "gelu")
        check(y, ref, K, bound)
        outs.append(y)
    for cap, y in zip((2, 3, 4, 5, 6, 7, 8, 11, 16, 0), outs[1:], strict=True):
        assert torch.equal(y, outs[0]), f"rows per tile {cap} differ from 1"


def test_int8_prefetch_default_follows_the_cpu_vendor():
    """2048 bytes ahead on Intel CPUs (measured faster there), none elsewhere (csrc/gemv.cpp), read in a
    fresh process without FASTLM_INT8_GEMV_PREFETCH."""
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    env = {k: v for k, v in os.environ.items() if k != "FASTLM_INT8_GEMV_PREFETCH"}
    code = "import torch, fastlm; print(torch.ops.fastlm.int8_gemv_prefetch(-1))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout.split()[-1]) == (2048 if intel else 0)


def test_schedule_knobs_refuse_bad_values():
    with pytest.raises(ValueError, match="int8_gemv_prefetch: bytes must be"):
        torch.ops.fastlm.int8_gemv_prefetch(-2)
    with pytest.raises(ValueError, match="gemv_prefetch: bytes must be"):
        torch.ops.fastlm.gemv_prefetch(1 << 21)
    with pytest.raises(ValueError, match="int8_tile_rows: rows must be"):
        torch.ops.fastlm.int8_tile_rows(17)
    with pytest.raises(ValueError, match="int8_tile_rows: rows must be"):
        torch.ops.fastlm.int8_tile_rows(-2)
    assert torch.ops.fastlm.int8_tile_rows(-1) == 0
    assert torch.ops.fastlm.int8_gemv_prefetch(-1) >= 0


# ---- prefill: more than 16 rows on pair panels (fp32 activations, fp32 rounding only) ----------------
@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in available_isas():
        pytest.skip(f"this CPU does not run the {request.param} path")
    torch.ops.fastlm.cpu_isa(request.param)
    yield request.param
    torch.ops.fastlm.cpu_isa("auto")


@pytest.mark.parametrize("M", [17, 24, 33, 64, 95, 96, 97, 200])
@pytest.mark.parametrize("N,K", [(45, 129), (45, 1025), (45, 3073), (129, 768), (33, 1)])
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_prefill_rows_are_exact_weight_only(isa, M, N, K, act):
    """Pair panels at prefill row counts (17-95 rows: one block of rows; 96, 97, 200: blocks of 96): the
    fp32-activation contract of Int8Linear, x @ (q * scale)^T + bias (+ GELU) + residual to fp32 rounding
    (test_gemv.check's bound, no int16 term), odd K, N = 45 (a partial last panel and an odd panel
    count for the AVX-512 two-panel tiles), outliers in x; written over NaN-filled memory."""
    x, q, s, wref = case(M, N, K, outlier=True)
    b, r = torch.randn(N), torch.randn(M, N)
    p = pack_int8_panels(q)
    torch.full((M * N + 64,), float("nan")).sum()  # leave NaN-filled memory for the output to land on
    y = op(x, p, N, s, b, r, act)
    check(y, reference(x, wref, b, r, act), K)
    # the same fp32 values the older (K, 16) int8 panels run with (dequantised to the same fp32 panels,
    # the same register tiles): the same bits
    assert torch.equal(y, op(x, pack_panels(q), N, s, b, r, act))


def test_prefill_rows_threads_agree(two_threads):
    """Prefill on pair panels shared by 1, 2 and 3 threads (chunks of panels): the same bits."""
    x, q, s, wref = case(48, 2304, 768)
    p = pack_int8_panels(q)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(op(x, p, 2304, s, None, None, "none"))
    check(outs[0], reference(x, wref), 768)
    for y in outs[1:]:
        assert torch.equal(y, outs[0])
