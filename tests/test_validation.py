"""Bad input to every public op gets ValueError / TypeError naming the argument."""

import pytest
import torch

import fastlm
from fastlm import ops


def qkv(B=2, H=3, S=5, D=16, dtype=torch.float32):
    return [torch.randn(B, H, S, D, dtype=dtype) for _ in range(3)]


def raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


def test_attention_bad_inputs():
    q, k, v = qkv()
    raises(ValueError, "q must be 4-D", ops.attention, q[0], k, v)
    raises(TypeError, "k has dtype", ops.attention, q, k.half(), v)
    raises(TypeError, "q must be float32", ops.attention, q.double(), k.double(), v.double())
    raises(ValueError, "head dims differ", ops.attention, q, k[..., :8], v)
    raises(ValueError, "head dim 300 is not supported", ops.attention, *qkv(D=300))
    raises(ValueError, "k and v lengths differ", ops.attention, q, k, v[:, :, :4])
    raises(ValueError, "batch sizes differ", ops.attention, q, k[:1], v[:1])
    raises(ValueError, "key_padding_mask must have shape", ops.attention, q, k, v,
           key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    raises(TypeError, "key_padding_mask must be a bool", ops.attention, q, k, v, key_padding_mask=torch.ones(2, 5))
    raises(ValueError, "q is empty", ops.attention, *qkv(S=0))
    raises(ValueError, "scale must be a finite", ops.attention, q, k, v, scale=float("nan"))
    raises(TypeError, "q must be a torch.Tensor", ops.attention, 1.0, k, v)


def test_attention_varlen_bad_cu_seqlens():
    q = torch.randn(10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    raises(TypeError, "cu_seqlens must be int32", ops.attention_varlen, q, q, q, good.long(), 6)
    cu = lambda *v: torch.tensor(v, dtype=torch.int32)
    raises(ValueError, "end at the token count 10", ops.attention_varlen, q, q, q, cu(0, 4, 9), 6)
    raises(ValueError, "start at 0", ops.attention_varlen, q, q, q, torch.tensor([1, 4, 10], dtype=torch.int32), 6)
    raises(ValueError, "non-decreasing", ops.attention_varlen, q, q, q, cu(0, 6, 4, 10), 6)
    raises(ValueError, "max_seqlen must be", ops.attention_varlen, q, q, q, good, 5)
    raises(ValueError, "q must be 3-D", ops.attention_varlen, q[None], q, q, good, 6)


def test_softmax_bad_inputs():
    x = torch.randn(3, 8)
    raises(ValueError, "does not broadcast", ops.softmax, x, mask=torch.ones(3, 7, dtype=torch.bool))
    raises(TypeError, "mask must be bool", ops.softmax, x, mask=torch.ones(3, 8, dtype=torch.int64))
    raises(ValueError, "dim 2 is out of range", ops.softmax, x, dim=2)
    raises(ValueError, "x is empty", ops.softmax, torch.randn(0, 8))


def test_decode_attention_bad_inputs():
    q = torch.randn(2, 3, 1, 16)
    kc = torch.randn(2, 3, 9, 16)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    raises(ValueError, "one query per sequence", ops.decode_attention, torch.randn(2, 3, 2, 16), kc, kc, lens)
    raises(TypeError, "cache_seqlens must be int32", ops.decode_attention, q, kc, kc, lens.long())
    raises(ValueError, "cache_seqlens must have shape", ops.decode_attention, q, kc, kc, lens[:1])


def test_ffn_bad_inputs():
    x = torch.randn(4, 8)
    w1, b1, w2, b2 = torch.randn(32, 8), torch.randn(32), torch.randn(8, 32), torch.randn(8)
    raises(ValueError, "w1 must have shape", ops.ffn, x, w1[:, :7], b1, w2, b2)
    raises(ValueError, "b1 must have shape", ops.ffn, x, w1, b1[:31], w2, b2)
    raises(ValueError, "w2 must have shape", ops.ffn, x, w1, b1, w2[:, :31], b2)
    raises(ValueError, "activation must be one of", ops.ffn, x, w1, b1, w2, b2, activation="relu")
    raises(TypeError, "w2 has dtype", ops.ffn, x, w1, b1, w2.half(), b2)
    raises(ValueError, "w1 must be contiguous", ops.ffn, x, torch.randn(32, 16)[:, ::2], b1, w2, b2)
    raises(ValueError, "x is empty", ops.ffn, x[:0], w1, b1, w2, b2)
    raises(ValueError, "residual must have shape", ops.ffn, x, w1, b1, w2, b2, residual=x[:2])


def test_layer_norm_and_bias_gelu_bad_inputs():
    x = torch.randn(4, 8)
    raises(ValueError, "weight must have shape", ops.layer_norm, x, torch.ones(7), torch.zeros(8), 1e-5)
    raises(ValueError, "eps must be a positive", ops.layer_norm, x, torch.ones(8), torch.zeros(8), 0.0)
    raises(ValueError, "bias must have shape", ops.bias_gelu, x, torch.randn(7))
    raises(ValueError, 'approximate must be "none" or "tanh"', ops.bias_gelu, x, torch.randn(8), approximate="fast")


def test_backend_selection(monkeypatch):
    from fastlm import backend

    monkeypatch.setenv("FASTLM_BACKEND", "bogus")
    raises(ValueError, "FASTLM_BACKEND must be one of", backend.current)
    monkeypatch.setenv("FASTLM_BACKEND", "torch")
    assert backend.current() == "torch"
    monkeypatch.delenv("FASTLM_BACKEND")
    assert backend.current() == "auto"
    with fastlm.use_backend("cuda"):
        assert backend.current() == "cuda"
        with fastlm.use_backend("torch"):
            assert backend.pick("bias_gelu", torch.device("cpu"), cuda=True) == "torch"
    raises(ValueError, "use_backend", lambda: fastlm.use_backend("fast").__enter__())
