"""Host helpers: ``get_cu_seqblocks`` (API.md 6.7) and ``robust_allocator`` (6.8)."""

import pytest
import torch

from .helpers import msa, requires_cuda


def _expected(cu, bs):
    lens = (cu[1:] - cu[:-1]).tolist()
    blocks = [-(-L // bs) for L in lens]
    out = [0]
    for n in blocks:
        out.append(out[-1] + n)
    return out


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_values(dtype):
    f = msa.get_cu_seqblocks
    f.cache_clear()
    cu = torch.tensor([0, 5, 5, 133, 400, 1000], dtype=dtype)
    res = f(cu, 600, 64, 128)
    assert len(res) == 6
    cq, mq, aq, ck, mk, ak = res
    assert cq.dtype == dtype and cq.device == cu.device and ck.dtype == dtype
    assert cq.tolist() == _expected(cu, 64) and ck.tolist() == _expected(cu, 128)
    assert mq == 10 and mk == 5  # from the host max_seqlen, not from data
    assert isinstance(aq, int) and isinstance(ak, int)
    assert aq == _expected(cu, 64)[-1] and ak == _expected(cu, 128)[-1]


@pytest.mark.kernels_ci
def test_identity_lru():
    f = msa.get_cu_seqblocks
    f.cache_clear()
    assert f.cache_info() == {"size": 0, "maxsize": 8}
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    r1 = f(cu, 200, 64, 64)
    r2 = f(cu, 200, 64, 64)
    assert r1 is r2
    cu.add_(1000)  # in-place change of a cached tensor: stale result, by design
    assert f(cu, 200, 64, 64) is r1
    other = cu.clone()  # equal contents, different identity: recomputed
    r3 = f(other, 200, 64, 64)
    assert r3 is not r1
    assert f.cache_info()["size"] == 2
    keep = [torch.tensor([0, i], dtype=torch.int32) for i in range(10)]
    for t in keep:
        f(t, 16, 16, 16)
    assert f.cache_info() == {"size": 8, "maxsize": 8}
    assert f(keep[-1], 16, 16, 16) is f(keep[-1], 16, 16, 16)
    f.cache_clear()
    assert f.cache_info()["size"] == 0


@pytest.mark.kernels_ci
def test_empty_batch_and_errors():
    f = msa.get_cu_seqblocks
    cq, mq, aq, ck, mk, ak = f(torch.zeros(1, dtype=torch.int32), 0, 64, 128)
    assert cq.tolist() == [0] and aq == 0 and mq == 0 and ck.tolist() == [0]
    with pytest.raises(TypeError):
        f(torch.zeros(3), 1, 64, 64)
    with pytest.raises(ValueError):
        f(torch.zeros(2, 2, dtype=torch.int32), 1, 64, 64)
    with pytest.raises(ValueError):
        f(torch.zeros(3, dtype=torch.int32), 1, 0, 64)


@requires_cuda
def test_cuda_tensor_and_allocator():
    f = msa.get_cu_seqblocks
    cu = torch.tensor([0, 300, 301], dtype=torch.int32, device="cuda")
    cq, _, aq, *_ = f(cu, 300, 128, 128)
    assert cq.is_cuda and cq.tolist() == [0, 3, 4] and aq == 4
    buf = msa.robust_allocator(1000, 128, None)
    assert buf.dtype == torch.uint8 and buf.numel() == 1000 and buf.is_cuda
    assert buf.data_ptr() % 256 == 0


def _utils_module():
    import sys

    return sys.modules[msa.robust_allocator.__module__]


@requires_cuda
def test_allocator_keeps_last_200():
    mod = _utils_module()
    for i in range(205):
        msa.robust_allocator(64 + i, 16, 0)
    assert len(mod._ALLOCATIONS) == 200
    import triton

    triton.set_allocator(msa.robust_allocator)
