"""fastlm._C attention_blocked (csrc/attention_blocked.cpp): fp32 encoder attention without a mask,
read from strided views of a fused QKV projection; against the float64 reference with the 2x rule
(plain SDPA's fp32 error), over awkward lengths and head dims; fastlm.fused routes BERT-sized
attention to it where the CPU has AVX-512; bad input names the argument."""

import pytest
import torch
import torch.nn.functional as F

from fastlm import _ext, fused
from fastlm.testing import close_2x

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastlm._C is not built")


def _ref(q, k, v, scale):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


@pytest.mark.parametrize("S", [1, 17, 97, 128, 129])
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("portable", [False, True])
def test_matches_float64_on_fused_qkv_views(S, D, portable):
    B, H = 2, 3
    qkv = torch.randn(B, S, 3, H, D) * 2  # peaky softmax rows too
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, S, D) strided views
    scale = D**-0.5
    out = torch.ops.fastlm.attention_blocked(q, k, v, scale, portable)
    assert out.shape == (B, H, S, D) and out.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous()  # (B, S, H, D) memory: the output projection reads it as is
    close_2x(out, _ref(q, k, v, scale), F.scaled_dot_product_attention(q, k, v, scale=scale), floor=2e-6,
             what=f"attention_blocked S{S} D{D} portable={portable}")


@pytest.mark.parametrize("sq,sk", [(1, 97), (17, 129), (129, 1), (97, 17)])
def test_cross_lengths_and_contiguous_inputs(sq, sk):
    q, k, v = torch.randn(1, 2, sq, 32), torch.randn(1, 2, sk, 32), torch.randn(1, 2, sk, 32)
    out = torch.ops.fastlm.attention_blocked(q, k, v, 0.3)
    close_2x(torch.ops.fastlm.attention_blocked(q, k, v, 0.3, True), _ref(q, k, v, 0.3),
             F.scaled_dot_product_attention(q, k, v, scale=0.3), floor=2e-6)
    close_2x(out, _ref(q, k, v, 0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3), floor=2e-6)
    # a non-unit stride along D is copied, same result
    kt = torch.randn(1, 2, 32, sk).transpose(2, 3)
    out2 = torch.ops.fastlm.attention_blocked(q, kt, v, 0.3)
    close_2x(out2, _ref(q, kt, v, 0.3), F.scaled_dot_product_attention(q, kt, v, scale=0.3), floor=2e-6)


def test_every_row_written():
    """The op allocates its output: NaN-filled blocks left in the allocator would show as NaN in
    any element the kernel did not write."""
    for _ in range(2):
        torch.empty(2, 97, 3, 64).fill_(float("nan"))
    qkv = torch.randn(2, 97, 3, 3, 64)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert torch.isfinite(torch.ops.fastlm.attention_blocked(q, k, v, 0.125)).all()


def test_fused_routes_encoder_attention_here():
    qkv = torch.randn(2, 128, 3, 4, 64)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        out = fused.attention(q, k, v)
        masked = fused.attention(q, k, v, key_padding_mask=torch.ones(2, 128, dtype=torch.bool))
    names = [e.key for e in p.key_averages()]
    assert ("fastlm::attention_blocked" in names) == fused._has_avx512()
    torch.testing.assert_close(out, masked, atol=2e-6, rtol=1e-5)  # the mask path (SDPA) agrees


def test_bad_input_names_the_argument():
    q = torch.randn(1, 2, 8, 32)
    f = torch.ops.fastlm.attention_blocked
    with pytest.raises(TypeError, match="k must be float32"):
        f(q, q.double(), q, 1.0)
    with pytest.raises(ValueError, match="v must be 4-D"):
        f(q, q, q[0], 1.0)
    with pytest.raises(ValueError, match="head dim"):
        f(q[..., :24], q[..., :24], q[..., :24], 1.0)
    with pytest.raises(ValueError, match="match q"):
        f(q, torch.randn(1, 3, 8, 32), q, 1.0)
    with pytest.raises(ValueError, match="same length"):
        f(q, q, torch.randn(1, 2, 9, 32), 1.0)
    with pytest.raises(ValueError, match="empty"):
        f(torch.randn(1, 2, 0, 32), q, q, 1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            f(q, q, q, bad)


def test_opcheck():
    q = torch.randn(1, 2, 17, 32)
    torch.library.opcheck(torch.ops.fastlm.attention_blocked, (q, torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32),
                                                               0.2))


# -- bf16 q / k / v (BERT in bfloat16) ------------------------------------------------------------
# Two kernels: "avx512_bf16" (vdpbf16ps on the bf16 rows, fp32 accumulation, P rounded to bf16 for
# PV) where the CPU has AVX512_BF16, else "avx512" (fp32 math on exactly converted rows, bf16 out);
# "portable" below AVX-512. attention_blocked_bf16_path() says / forces which one runs.

BF16_PATH = torch.ops.fastlm.attention_blocked_bf16_path if _ext.available() else None


def _bf16_paths() -> list[str]:
    """The bf16 kernels this CPU (and FASTLM_CPU_ISA) can run."""
    ok = ["portable"]
    for p in ("avx512", "avx512_bf16"):
        try:
            BF16_PATH(p)
            ok.append(p)
        except ValueError:
            pass
    BF16_PATH("auto")
    return ok


@pytest.fixture
def bf16_path():
    """Force a bf16 kernel for the test: bf16_path("avx512") etc.; the CPU's choice is restored after."""
    yield BF16_PATH
    BF16_PATH("auto")


def _bf16_qkv(B, S, H, D):
    qkv = (torch.randn(B, S, 3, H, D) * 2).bfloat16()  # peaky softmax rows too
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, S, D) strided bf16 views


@pytest.mark.parametrize("S", [1, 17, 97, 129])
@pytest.mark.parametrize("D", [16, 64, 80])
@pytest.mark.parametrize("path", ["avx512", "portable"])
def test_bf16_fp32_math_is_the_fp32_kernel_on_converted_rows(S, D, path, bf16_path):
    """The fp32-math kernels: bf16 -> fp32 is exact, so the bf16 op must equal the fp32 op on
    contiguous .float() copies (the portable row kernel's summation order follows the layout)
    rounded to bf16 (round to nearest even, torch's .to), bit for bit; and meet the 2x rule
    against torch's own bf16 SDPA error (fp64 reference)."""
    if path not in _bf16_paths():
        pytest.skip(f"this CPU cannot run the {path} bf16 attention kernel")
    B, H = 2, 3
    q, k, v = _bf16_qkv(B, S, H, D)
    scale = D**-0.5
    bf16_path(path)
    out = torch.ops.fastlm.attention_blocked(q, k, v, scale)
    assert out.shape == (B, H, S, D) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()
    f32 = torch.ops.fastlm.attention_blocked(*(t.float().contiguous() for t in (q, k, v)), scale, path == "portable")
    assert torch.equal(out, f32.bfloat16()), f"S{S} D{D}: bf16 path differs from fp32 rounded"
    close_2x(out.float(), _ref(q, k, v, scale).float(), F.scaled_dot_product_attention(q, k, v, scale=scale).float(),
             floor=1e-3, what=f"attention_blocked bf16 S{S} D{D} {path}")


@pytest.mark.parametrize("S", [1, 2, 17, 64, 97, 129, 200])
@pytest.mark.parametrize("D", [16, 48, 64, 80, 128])
def test_bf16_dpbf16_within_2x_of_torch_bf16(S, D, bf16_path):
    """vdpbf16ps kernel (bf16 products, fp32 accumulation): error vs the fp64 reference within 2x
    torch's own bf16 SDPA error (+ a floor of 1e-3 on outputs of size ~1), at odd and even key
    counts (V pairs along the keys), head dims with a 16 / 32 / 48 column tail (PV tiles), queries
    not a multiple of the 6-row block, and cross lengths."""
    if "avx512_bf16" not in _bf16_paths():
        pytest.skip("this CPU has no AVX512_BF16 (or FASTLM_CPU_ISA caps it): the fp32-math kernels run")
    bf16_path("avx512_bf16")
    B, H = 2, 3
    q, k, v = _bf16_qkv(B, S, H, D)
    q2 = (torch.randn(B, H, max(1, S // 3 + 1), D) * 2).bfloat16()  # fewer queries than keys
    for qq in (q, q2):
        scale = D**-0.5
        out = torch.ops.fastlm.attention_blocked(qq, k, v, scale)
        assert out.shape == qq.shape and out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
        close_2x(out.float(), _ref(qq, k, v, scale).float(),
                 F.scaled_dot_product_attention(qq, k, v, scale=scale).float(), floor=1e-3,
                 what=f"attention_blocked avx512_bf16 Sq{qq.shape[2]} S{S} D{D}")
    # a negative scale flips which key is the row max (the max is taken after scaling)
    out = torch.ops.fastlm.attention_blocked(q, k, v, -0.3)
    close_2x(out.float(), _ref(q, k, v, -0.3).float(), F.scaled_dot_product_attention(q, k, v, scale=-0.3).float(),
             floor=1e-3, what=f"attention_blocked avx512_bf16 scale -0.3 S{S} D{D}")


def test_bf16_dpbf16_rows_are_convex_combinations(bf16_path):
    """All value rows equal: every output row must equal that row exactly (P's sum is taken over
    the bf16-rounded probabilities PV uses); a kernel normalising by the wrong sum, or reading a
    stale / padded key, is off by more than bf16 rounding."""
    if "avx512_bf16" not in _bf16_paths():
        pytest.skip("this CPU has no AVX512_BF16 (or FASTLM_CPU_ISA caps it)")
    bf16_path("avx512_bf16")
    for S, D in ((1, 16), (17, 80), (97, 64), (129, 48)):
        q, k, _ = _bf16_qkv(2, S, 3, D)
        row = torch.randn(D).bfloat16()
        v = row.expand(2, 3, S, D)
        out = torch.ops.fastlm.attention_blocked(q, k, v, D**-0.5)
        assert torch.equal(out, row.expand_as(out)), f"S{S} D{D}: max diff {(out.float() - row.float()).abs().max()}"


def test_bf16_rounding_and_nan(bf16_path):
    """Outputs that need rounding to bf16, and NaN inputs: the kernels' own f32 -> bf16."""
    q = torch.randn(1, 1, 5, 16).bfloat16()
    k = torch.randn(1, 1, 7, 16).bfloat16()
    v = torch.randn(1, 1, 7, 16).bfloat16()
    if "avx512" in _bf16_paths():
        bf16_path("avx512")
        out = torch.ops.fastlm.attention_blocked(q, k, v, 0.5)
        ref = torch.ops.fastlm.attention_blocked(q.float(), k.float(), v.float(), 0.5).bfloat16()
        assert torch.equal(out, ref)
    v_nan = v.clone()
    v_nan[0, 0, 3, 2] = float("nan")
    for path in _bf16_paths():
        bf16_path(path)
        out = torch.ops.fastlm.attention_blocked(q, k, v_nan, 0.5)
        finite = torch.cat([out[..., :2], out[..., 3:]], -1)
        assert out[..., 2].isnan().all() and torch.isfinite(finite).all(), path


def test_bf16_path_query_and_bad_names(bf16_path):
    assert bf16_path("") in ("avx512_bf16", "avx512", "portable")
    assert bf16_path("portable") == "portable" and bf16_path("") == "portable"
    with pytest.raises(ValueError, match="path must be"):
        bf16_path("amx")


def test_bf16_mixed_dtypes_refused():
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(TypeError, match="k has dtype"):
        torch.ops.fastlm.attention_blocked(q, q.bfloat16(), q, 1.0)
    with pytest.raises(TypeError, match="v has dtype"):
        torch.ops.fastlm.attention_blocked(q.bfloat16(), q.bfloat16(), q, 1.0)


def test_fused_routes_bf16_encoder_attention_here():
    qkv = torch.randn(2, 128, 3, 4, 64).bfloat16()
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        out = fused.attention(q, k, v)
    names = [e.key for e in p.key_averages()]
    assert ("fastlm::attention_blocked" in names) == fused._has_avx512()
    assert out.dtype == torch.bfloat16
    close_2x(out.float(), _ref(q, k, v, 0.125).float(), F.scaled_dot_product_attention(q, k, v).float(), floor=1e-3)
