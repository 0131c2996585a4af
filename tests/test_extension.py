"""fastlm._C: the C++ CPU ops, their input checks, and their torch.library registration."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext, ops, testing
from fastlm.testing import close_2x, ffn_weights

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C not built: {_ext.LOAD_ERROR}")


@pytest.mark.parametrize("shape", [(1, 1), (17, 97), (3, 5, 768), (2, 1025)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bias_gelu_cpu(shape, approximate, dtype):
    x = torch.randn(shape) * 3
    b = torch.randn(shape[-1])
    ref32 = F.gelu(x.double() + b.double(), approximate=approximate)
    with fastlm.use_backend("cuda"):  # fastlm._C, whose CPU twin runs on CPU tensors
        out = ops.bias_gelu(x.to(dtype), b.to(dtype), approximate=approximate)
    plain = F.gelu(x.to(dtype) + b.to(dtype), approximate=approximate)
    assert out.dtype == dtype and out.shape == x.shape
    close_2x(out, ref32, plain, floor=1e-6 if dtype == torch.float32 else None, what="bias_gelu")


def test_bias_gelu_cpu_noncontiguous_input():
    x = torch.randn(64, 40).T  # (40, 64), transposed strides
    b = torch.randn(64)
    with fastlm.use_backend("cuda"):
        out = ops.bias_gelu(x, b)
    assert torch.allclose(out, F.gelu(x + b), atol=1e-6)


def test_cpp_checks_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.fastlm.bias_gelu(x, torch.randn(7), "none")
    with pytest.raises(TypeError, match="bias dtype"):
        torch.ops.fastlm.bias_gelu(x, torch.randn(8).half(), "none")
    with pytest.raises(TypeError, match="x must be float32"):
        torch.ops.fastlm.bias_gelu(x.long(), torch.randn(8).long(), "none")
    with pytest.raises(ValueError, match="approximate must be"):
        torch.ops.fastlm.bias_gelu(x, torch.randn(8), "erf")
    with pytest.raises(ValueError, match="x is empty"):
        fastlm._C.bias_gelu(x[:0], torch.randn(8))


def test_opcheck_and_compile():
    x, b = torch.randn(5, 24), torch.randn(24)
    torch.library.opcheck(torch.ops.fastlm.bias_gelu, (x, b, "tanh"))
    fn = torch.compile(lambda x, b: torch.ops.fastlm.bias_gelu(x, b, "none") * 2, fullgraph=True, backend="eager")
    assert torch.equal(fn(x, b), 2 * torch.ops.fastlm.bias_gelu(x, b, "none"))  # compiled == eager op


# -- FFN and LayerNorm: the C++ CPU twins, and the CUDA kernels where a GPU exists -----------

def check_ffn(out, x, w1, b1, w2, b2, act, r):
    testing.check_ffn(out, x, w1, b1, w2, b2, act, r, fp32_floor=2e-5, what=f"ffn {tuple(x.shape)} {x.dtype}")


@pytest.mark.parametrize("M", [1, 3, 17, 128])
@pytest.mark.parametrize("d", [96, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ffn_cpu_twin(M, d, dtype):
    act = "gelu" if M % 2 else "gelu_tanh"
    x = torch.randn(M, d).to(dtype)
    r = torch.randn(M, d).to(dtype) if M > 1 else None
    w1, b1, w2, b2 = ffn_weights(d, 4 * d, dtype)
    with fastlm.use_backend("cuda"):
        out = ops.ffn(x, w1, b1, w2, b2, activation=act, residual=r)
    check_ffn(out, x, w1, b1, w2, b2, act, r)


@pytest.mark.parametrize("n", [1, 17, 768, 1025])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_norm_cpu_twin(n, dtype):
    from fastlm import reference as ref

    x, r = (torch.randn(3, 7, n) * 2 + 0.5).to(dtype), torch.randn(3, 7, n).to(dtype)
    w, b = (1 + 0.1 * torch.randn(n)).to(dtype), torch.randn(n).to(dtype)
    with fastlm.use_backend("cuda"):
        y, s = ops.layer_norm(x, w, b, 1e-5, residual=r)
        y0 = ops.layer_norm(x, w, b, 1e-5)
    up = torch.float64 if dtype == torch.float32 else torch.float32
    floor = 1e-5 if dtype == torch.float32 else None
    ey, es = ref.layer_norm(x.to(up), w.to(up), b.to(up), 1e-5, r.to(up))
    close_2x(y, ey, F.layer_norm(x + r, (n,), w, b, 1e-5), floor=floor, what="add_layer_norm")
    close_2x(s, es, x + r, floor=1e-6 if dtype == torch.float32 else None, what="sum")
    close_2x(y0, ref.layer_norm(x.to(up), w.to(up), b.to(up), 1e-5), F.layer_norm(x, (n,), w, b, 1e-5), floor=floor,
             what="layer_norm")


def test_cpp_ffn_and_layer_norm_checks():
    x = torch.randn(4, 8)
    w1, b1, w2, b2 = ffn_weights(8, 32, torch.float32)
    f = torch.ops.fastlm.ffn_ext
    with pytest.raises(ValueError, match=r"w1 must have shape \(d_ff, 8\)"):
        f(x, w1[:, :7], b1, w2, b2, "gelu", None)
    with pytest.raises(ValueError, match=r"b1 must have shape \(32,\)"):
        f(x, w1, b1[:5], w2, b2, "gelu", None)
    with pytest.raises(ValueError, match=r"w2 must have shape \(8, 32\)"):
        f(x, w1, b1, w2[:, :31], b2, "gelu", None)
    with pytest.raises(TypeError, match="w2 has dtype"):
        f(x, w1, b1, w2.half(), b2, "gelu", None)
    with pytest.raises(ValueError, match="activation must be"):
        f(x, w1, b1, w2, b2, "relu", None)
    with pytest.raises(ValueError, match="w1 must be contiguous"):
        f(x, torch.randn(32, 16)[:, ::2], b1, w2, b2, "gelu", None)
    # the transpose of a contiguous weight is the CPU layout: accepted, same result
    wt1, wt2 = w1.t().contiguous().t(), w2.t().contiguous().t()
    assert torch.allclose(f(x, wt1, b1, wt2, b2, "gelu", None), f(x, w1, b1, w2, b2, "gelu", None), atol=1e-6)
    with pytest.raises(ValueError, match="x is empty"):
        fastlm._C.ffn(x[:0], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        f(x, w1, b1, w2, b2, "gelu", x[:2])
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        torch.ops.fastlm.layer_norm_ext(x, torch.ones(7), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="eps must be positive"):
        torch.ops.fastlm.add_layer_norm_ext(x, x, torch.ones(8), torch.zeros(8), 0.0)
    torch.library.opcheck(f, (x, w1, b1, w2, b2, "gelu_tanh", x))
    torch.library.opcheck(torch.ops.fastlm.add_layer_norm_ext, (x, x, torch.ones(8), torch.zeros(8), 1e-5))


def poison_cuda_allocator(nbytes=1 << 28):
    """Fill free cached GPU memory with NaN so a kernel that skips an output element shows it."""
    junk = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del junk  # back to the caching allocator, still NaN-filled; the op's outputs reuse it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA FFN kernels run only on a GPU "
                    "(they are compile-checked by nvcc in test_compile_cuda.py)")
@pytest.mark.skipif(not _ext.cuda_enabled(), reason="fastlm._C was built without CUDA kernels")
@pytest.mark.parametrize("M", [1, 2, 3, 7, 8, 16, 128, 1000])
@pytest.mark.parametrize("d", [768, 1024, 1600, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ffn_cuda(M, d, dtype):
    act = "gelu" if d % 2 == 0 and M % 2 else "gelu_tanh"
    x = torch.randn(M, d, device="cuda").to(dtype)
    r = torch.randn(M, d, device="cuda").to(dtype) if M % 2 == 0 else None
    w1, b1, w2, b2 = ffn_weights(d, 4 * d, dtype, "cuda")
    poison_cuda_allocator()
    out = torch.ops.fastlm.ffn_ext(x, w1, b1, w2, b2, act, r)
    torch.cuda.synchronize()
    check_ffn(out, x, w1, b1, w2, b2, act, r)


@pytest.mark.skipif(not torch.cuda.is_available() or not _ext.cuda_enabled(), reason="no CUDA device / CUDA build")
@pytest.mark.parametrize("shape", [(1, 1), (17, 97), (3, 5, 768), (2, 3072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bias_gelu_cuda(shape, dtype):
    x = torch.randn(shape, device="cuda") * 3
    b = torch.randn(shape[-1], device="cuda")
    for approximate in ("none", "tanh"):
        poison_cuda_allocator()
        out = torch.ops.fastlm.bias_gelu(x.to(dtype), b.to(dtype), approximate)
        close_2x(out, F.gelu(x.double() + b.double(), approximate=approximate),
                 F.gelu(x.to(dtype) + b.to(dtype), approximate=approximate),
                 floor=1e-6 if dtype == torch.float32 else None, what=f"bias_gelu cuda {dtype}")
