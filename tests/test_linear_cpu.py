"""The CPU linears on oneDNN (csrc/linear_cpu.cpp): fastlm::linear_ext and the oneDNN branch of
ops.ffn against float64 references, across the row threshold (32) and awkward shapes; the fast
path is really taken (profiled); bad input is a clear error; CPULinear is an nn.Linear."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext, ops, testing
from fastlm.linear_cpu import CPULinear

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastlm._C is not built")


def _ref(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def _onednn_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        fn()
    return sum(e.count for e in p.key_averages() if e.key == "mkldnn::_linear_pointwise")


@pytest.mark.parametrize("shape", [(1, 97), (17, 97), (31, 64), (32, 64), (2, 65, 129), (129, 768)])
@pytest.mark.parametrize("N", [1, 17, 2304])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ext_matches_float64(shape, N, bias, dtype):
    g = torch.Generator().manual_seed(shape[0] * 1000 + N)
    x = torch.randn(*shape, generator=g).to(dtype)
    K = shape[-1]
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    out = torch.ops.fastlm.linear_ext(x, w, b)
    assert out.shape == (*shape[:-1], N) and out.dtype == dtype
    ref = _ref(x, w, b)
    torch_err = (F.linear(x, w, b).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + (2e-5 if dtype == torch.float32 else 1e-2), (err, torch_err)


def test_linear_ext_transposed_weight_and_strided_input():
    """The GPT-2 decode layout (a transposed view) and a strided x take the ATen path, same result."""
    x = torch.randn(40, 200)[:, ::2]  # (40, 100), not contiguous
    w = torch.randn(100, 48).t()  # (48, 100) viewed from (100, 48) memory
    b = torch.randn(48)
    torch.testing.assert_close(torch.ops.fastlm.linear_ext(x, w, b), F.linear(x, w, b), atol=2e-5, rtol=1e-5)


def test_onednn_runs_for_encoder_rows_only():
    w, b = torch.randn(256, 64), torch.randn(256)
    big, small = torch.randn(64, 64), torch.randn(8, 64)
    assert _onednn_calls(lambda: torch.ops.fastlm.linear_ext(big, w, b)) == 1
    assert _onednn_calls(lambda: torch.ops.fastlm.linear_ext(small, w, b)) == 0  # decode rows: BLAS GEMV
    w1, b1, w2, b2 = testing.ffn_weights(64, 256, torch.float32)
    with fastlm.use_backend("cuda"):  # fastlm._C's CPU twin
        assert _onednn_calls(lambda: ops.ffn(big, w1, b1, w2, b2, activation="gelu", residual=big)) == 2


@pytest.mark.parametrize("M", [31, 32, 97, 129])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("residual", [False, True])
def test_ffn_onednn_branch_matches_reference(M, act, residual):
    d = 80
    x = torch.randn(M, d)
    r = torch.randn(M, d) if residual else None
    w1, b1, w2, b2 = testing.ffn_weights(d, 4 * d, torch.float32)
    with fastlm.use_backend("cuda"):
        out = ops.ffn(x, w1, b1, w2, b2, activation=act, residual=r)
    testing.check_ffn(out, x, w1, b1, w2, b2, act, r, fp32_floor=2e-5, what=f"ffn onednn M{M} {act}")


def test_linear_ext_bad_input_names_the_argument():
    x, w, b = torch.randn(40, 16), torch.randn(8, 16), torch.randn(8)
    with pytest.raises(ValueError, match="w must have shape"):
        torch.ops.fastlm.linear_ext(x, torch.randn(8, 15), b)
    with pytest.raises(ValueError, match="b must have shape"):
        torch.ops.fastlm.linear_ext(x, w, torch.randn(9))
    with pytest.raises(TypeError, match="w has dtype"):
        torch.ops.fastlm.linear_ext(x, w.double(), b)
    with pytest.raises(ValueError, match="x is empty"):
        torch.ops.fastlm.linear_ext(torch.randn(0, 16), w, b)
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.fastlm.linear_ext(x.long(), w, b)


def test_cpu_linear_is_an_nn_linear():
    lin = CPULinear(64, 96)
    assert isinstance(lin, torch.nn.Linear) and set(lin.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 40, 64)
    with torch.inference_mode():
        out = lin(x)
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), atol=2e-5, rtol=1e-5)
    out = lin(x)  # with autograd on: nn.Linear's own forward, gradients flow
    out.sum().backward()
    assert lin.weight.grad is not None
    torch.library.opcheck(torch.ops.fastlm.linear_ext, (torch.randn(40, 64), lin.weight.detach(), None))


@pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C not built: {_ext.LOAD_ERROR}")
def test_cpu_linear_follows_in_place_updates_of_an_inference_weight():
    """A layer built under torch.inference_mode holds an inference tensor, which has no version
    counter: an in-place update there (load_state_dict inside inference mode) cannot be seen, so
    no packed copy may be reused for it (it was, and the layer kept computing with the old weight)."""
    x = torch.randn(64, 96)
    with torch.inference_mode():
        lin = CPULinear(96, 80)
        assert lin.weight.is_inference()
        lin(x)  # a first call, which may pack the weight
        lin.load_state_dict({"weight": torch.randn(80, 96), "bias": torch.randn(80)})
        got = lin(x)
        lin.weight.mul_(-2.0)
        got2 = lin(x)
    want = x.double() @ lin.weight.double().t() + lin.bias.double()
    torch.testing.assert_close(got2.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), -0.5 * (want - lin.bias.double()) + lin.bias.double(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act,res", [(None, False), ("gelu", False), ("gelu_tanh", False), (None, True)])
@pytest.mark.parametrize("rows,K,N", [(33, 17, 97), (129, 96, 40)])
def test_bf16_without_onednn_bf16_runs_fp32_copies(monkeypatch, act, res, rows, K, N):
    """Where oneDNN has no bf16 inner product (AVX2; forced here by the probe's answer) a bf16
    CPULinear computes in fp32 on fp32 copies and rounds once: equal to the fp32 op on .float()
    copies rounded, and within bf16's rounding of a float64 reference."""
    import fastlm.linear_cpu as lc

    monkeypatch.setattr(lc, "onednn_bf16_ok", lambda: False)
    lin = lc.CPULinear(K, N).bfloat16().eval()
    x = torch.randn(rows, K).bfloat16()
    r = torch.randn(rows, N).bfloat16() if res else None
    assert lin._bf16_as_fp32(x)
    with torch.no_grad():
        y = lin(x, activation=act, residual=r)
        f32 = torch.ops.fastlm.linear_ext(x.float(), lin.weight.float(), lin.bias.float(), None, act or "none",
                                          None if r is None else r.float())
    assert y.dtype == torch.bfloat16 and torch.equal(y, f32.bfloat16())
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    if act:
        ref = torch.nn.functional.gelu(ref, approximate="tanh" if act == "gelu_tanh" else "none")
    if r is not None:
        ref = ref + r.double()
    assert (y.double() - ref).abs().max() <= 2**-8 * ref.abs().max() + 1e-5
