"""fastlm._C attention_decode: the CPU small-attention kernel behind fused.attention and
fused.decode_attention at decode / short-prompt sizes, against fp64 torch math."""

from __future__ import annotations

import pytest
import torch

from fastlm import _ext, fused, reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastlm._C is not built")


def _ref64(q, k, v, scale, causal):
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale  # (B, H, S_q, S_k)
    if causal:
        s = s.masked_fill(~reference.causal_keep(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v.double())  # (B, H, S_q, D)


def _cache_views(B, H, S, D, cap):
    """k, v as views of the first S rows of a NaN-poisoned (B, H, cap, D) cache."""
    kc = torch.full((B, H, cap, D), float("nan"))
    vc = torch.full((B, H, cap, D), float("nan"))
    kc[:, :, :S] = torch.randn(B, H, S, D)
    vc[:, :, :S] = torch.randn(B, H, S, D)
    return kc[:, :, :S], vc[:, :, :S]


@pytest.mark.parametrize("B,H,Q,S,D", [(1, 12, 1, 1, 64), (1, 12, 1, 17, 64), (2, 3, 1, 97, 32), (1, 4, 16, 16, 64),
                                       (2, 2, 5, 17, 8), (1, 1, 1, 129, 1), (3, 5, 1, 2000, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_fp64(B, H, Q, S, D, causal):
    g = torch.Generator().manual_seed(B * 1000 + Q * 100 + S)
    # q as a strided view of a fused QKV buffer, like the models
    qkv = torch.randn(B, Q, 3, H, D, generator=g) * 2
    q = qkv[:, :, 0].transpose(1, 2)  # (B, H, Q, D) strided
    k, v = _cache_views(B, H, S, D, S + 7)
    scale = D**-0.5
    out = torch.ops.fastlm.attention_decode(q, k, v, scale, causal)
    assert out.shape == (B, H, Q, D) and torch.isfinite(out).all()
    ref = _ref64(q, k, v, scale, causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)


def test_fused_paths_use_it_and_agree():
    """fused.attention / fused.decode_attention (the CPU ops) give the fp64 result at decode sizes,
    causal prefill included, and the reference path agrees."""
    torch.manual_seed(0)
    q = torch.randn(1, 12, 1, 64)
    k, v = _cache_views(1, 12, 33, 64, 64)
    torch.testing.assert_close(fused.attention(q, k, v, scale=0.125).double(), _ref64(q, k, v, 0.125, False),
                               rtol=1e-5, atol=2e-5)
    kc, vc = k.as_strided((1, 12, 64, 64), k.stride()), v.as_strided((1, 12, 64, 64), v.stride())
    lens = torch.tensor([33], dtype=torch.int32)
    torch.testing.assert_close(fused.decode_attention(q, kc, vc, lens, 0.125).double(), _ref64(q, k, v, 0.125, False),
                               rtol=1e-5, atol=2e-5)
    qp = torch.randn(1, 12, 16, 64)
    kp, vp = torch.randn(1, 12, 16, 64), torch.randn(1, 12, 16, 64)
    torch.testing.assert_close(fused.attention(qp, kp, vp, causal=True).double(), _ref64(qp, kp, vp, 0.125, True),
                               rtol=1e-5, atol=2e-5)


def test_bad_input():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.fastlm.attention_decode(q.double(), k.double(), k.double(), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        torch.ops.fastlm.attention_decode(q, k, k[:, :, :3], 1.0)
    with pytest.raises(ValueError, match="at least one key"):
        torch.ops.fastlm.attention_decode(q, k[:, :, :0], k[:, :, :0], 1.0)
    with pytest.raises(ValueError, match="as many keys"):
        torch.ops.fastlm.attention_decode(torch.randn(1, 2, 5, 8), k, k, 1.0, True)
    with pytest.raises(ValueError, match=r"\(B, H, S, D\)"):
        torch.ops.fastlm.attention_decode(q[0], k, k, 1.0)
    with pytest.raises(ValueError, match="head dim"):  # was an integer division by zero (SIGFPE)
        torch.ops.fastlm.attention_decode(q[..., :0], k[..., :0], k[..., :0], 1.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_pool_threads(threads):
    """Enough keys to share heads through the work-sharing pool; each head is written once."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q = torch.randn(2, 16, 1, 64)
        k, v = _cache_views(2, 16, 3000, 64, 3001)
        for _ in range(3):
            out = torch.ops.fastlm.attention_decode(q, k, v, 0.125, False)
            torch.testing.assert_close(out.double(), _ref64(q, k, v, 0.125, False), rtol=1e-5, atol=2e-5)
    finally:
        torch.set_num_threads(old)
