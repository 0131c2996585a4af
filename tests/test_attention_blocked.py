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


# -- bf16 q / k / v (BERT in bfloat16): fp32 math on exactly converted rows, bf16 output ---------

@pytest.mark.parametrize("S", [1, 17, 97, 129])
@pytest.mark.parametrize("D", [16, 64, 80])
@pytest.mark.parametrize("portable", [False, True])
def test_bf16_is_the_fp32_kernel_on_converted_rows(S, D, portable):
    """bf16 -> fp32 is exact, so the bf16 op must equal the fp32 op on contiguous .float() copies (the
    portable row kernel's summation order follows the layout) rounded to
    bf16 (round to nearest even, torch's .to), bit for bit; and meet the 2x rule against
    torch's own bf16 SDPA error (fp64 reference)."""
    B, H = 2, 3
    qkv = (torch.randn(B, S, 3, H, D) * 2).bfloat16()
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, S, D) strided bf16 views
    scale = D**-0.5
    out = torch.ops.fastlm.attention_blocked(q, k, v, scale, portable)
    assert out.shape == (B, H, S, D) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()
    f32 = torch.ops.fastlm.attention_blocked(*(t.float().contiguous() for t in (q, k, v)), scale, portable)
    assert torch.equal(out, f32.bfloat16()), f"S{S} D{D}: bf16 path differs from fp32 rounded"
    close_2x(out.float(), _ref(q, k, v, scale).float(), F.scaled_dot_product_attention(q, k, v, scale=scale).float(),
             floor=1e-3, what=f"attention_blocked bf16 S{S} D{D} portable={portable}")


def test_bf16_rounding_and_nan():
    """Outputs that sit on bf16 rounding ties and NaN inputs: the kernel's own f32 -> bf16."""
    # v rows all equal: every output row equals v's row exactly (softmax weights sum to 1 up to
    # rounding); take values whose fp32 result needs rounding to bf16
    q = torch.randn(1, 1, 5, 16).bfloat16()
    k = torch.randn(1, 1, 7, 16).bfloat16()
    v = torch.randn(1, 1, 7, 16).bfloat16()
    out = torch.ops.fastlm.attention_blocked(q, k, v, 0.5)
    ref = torch.ops.fastlm.attention_blocked(q.float(), k.float(), v.float(), 0.5).bfloat16()
    assert torch.equal(out, ref)
    v_nan = v.clone()
    v_nan[0, 0, 3, 2] = float("nan")
    out = torch.ops.fastlm.attention_blocked(q, k, v_nan, 0.5)
    assert out[..., 2].isnan().all() and torch.isfinite(out[..., :2]).all()


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
