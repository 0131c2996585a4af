"""fastlm._C copy_rows_ (csrc/copy_rows.cpp: a strided copy on the calling thread, no OpenMP region)
and its Python front fastlm._ext.copy_rows_, against aten's copy_: cache slices, transposed views,
awkward shapes, dtypes, the rest of dst untouched, and bad input."""

import pytest
import torch

from fastlm import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C not built: {_ext.LOAD_ERROR}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 1), (3, 5, 17, 7), (32, 12, 16, 64), (2, 3, 97, 129)])
def test_cache_slice_from_a_qkv_view(dtype, B, H, T, D):
    """The prefill's copies: a (B, H, T, D) strided view of a fused QKV projection into rows [0, T) of a
    bigger cache (the rest of the cache must keep its poison), and a transposed attention output."""
    qkv = (torch.randn(B, T, 3, H, D) * 100).to(dtype)
    k = qkv[:, :, 1].transpose(1, 2)  # (B, H, T, D), strided
    cache = torch.full((2, B + 1, H, T + 5, D), 7, dtype=dtype)
    want = cache.clone()
    want[1, :B, :, :T] = k
    out = torch.ops.fastlm.copy_rows_(cache[1, :B, :, :T], k)
    assert out.data_ptr() == cache[1].data_ptr()
    assert torch.equal(cache, want)
    y = (torch.randn(B, H, T, D) * 100).to(dtype)  # attention output -> (B, T, H, D)
    dst = torch.full((B, T, H, D), float("nan")).to(dtype)
    torch.ops.fastlm.copy_rows_(dst, y.transpose(1, 2))
    assert torch.equal(dst, y.transpose(1, 2).contiguous())


@pytest.mark.parametrize("shape", [(5,), (4, 1), (3, 1, 9), (2, 3, 4, 5, 6, 7)])
def test_dims_and_unit_rows(shape):
    src = torch.randn(shape)
    dst = torch.full(shape, float("nan"))
    torch.ops.fastlm.copy_rows_(dst, src)
    assert torch.equal(dst, src)
    empty = torch.empty(0, 3)
    assert torch.ops.fastlm.copy_rows_(empty, torch.empty(0, 3)).shape == (0, 3)


def test_python_front_falls_back_to_copy():
    """_ext.copy_rows_ takes aten's copy_ where the op does not apply (strided rows, dtype change)."""
    src = torch.randn(6, 8)[:, ::2]  # stride 2 along the last dimension
    dst = torch.zeros(6, 4)
    assert torch.equal(_ext.copy_rows_(dst, src), src)
    dst64 = torch.zeros(6, 4, dtype=torch.float64)
    assert torch.equal(_ext.copy_rows_(dst64, src), src.double())
    a = torch.randn(2, 3, 4)
    assert torch.equal(_ext.copy_rows_(torch.empty(2, 3, 4), a), a)


@pytest.mark.parametrize("dst,src,exc,match", [
    (torch.zeros(2, 3), torch.zeros(3, 2), ValueError, "one shape"),
    (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), TypeError, "one dtype"),
    (torch.zeros(2, 6)[:, ::2], torch.zeros(2, 3), ValueError, "unit stride"),
    (torch.zeros(()), torch.zeros(()), ValueError, "1 to 6 dimensions"),
    (torch.zeros((1,) * 7), torch.zeros((1,) * 7), ValueError, "1 to 6 dimensions"),
])
def test_bad_input(dst, src, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.fastlm.copy_rows_(dst, src)
