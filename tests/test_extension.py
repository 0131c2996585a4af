"""fastlm._C: the C++ CPU ops, their input checks, and their torch.library registration."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext, ops
from fastlm.testing import close_2x

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
