"""sparse_atten_nvfp4_kv_func against a float64 reference on the dequantised K/V (API.md §5.13, §3.5)."""

import pytest
import torch

from .helpers import msa, requires_cuda
from .reference import attention_ref, q2k_block_mask, visible_from_blocks


def _case(device, *, T, Hq, Hkv, topk, dtype, causal, paged):
    D = 128
    q = torch.randn(T, Hq, D, device=device, dtype=dtype)
    kf = torch.randn(T, Hkv, D, device=device, dtype=dtype)
    vf = torch.randn(T, Hkv, D, device=device, dtype=dtype)
    nb = (T + 127) // 128
    q2k = torch.randint(-1, nb + 1, (Hkv, T, topk), device=device, dtype=torch.int32)
    cu = torch.tensor([0, T], device=device, dtype=torch.int32)
    row_ptr, q_idx = msa.build_k2q_csr(q2k, cu, cu, 128, total_k=T)
    if paged:
        P = nb
        pad = P * 128 - T
        kp = torch.cat([kf, kf.new_zeros(pad, Hkv, D)]).view(P, 128, Hkv, D).permute(0, 2, 1, 3).contiguous()
        vp = torch.cat([vf, vf.new_zeros(pad, Hkv, D)]).view(P, 128, Hkv, D).permute(0, 2, 1, 3).contiguous()
        perm = torch.randperm(P, device=device)
        kp, vp = kp[perm], vp[perm]
        page_table = torch.argsort(perm).to(torch.int32).view(1, P)
        qk, qv = msa.quantize_kv_bf16_to_nvfp4_128x4(kp, vp)
        extra = dict(page_table=page_table, seqused_k=torch.tensor([T], device=device, dtype=torch.int32))
        kd = msa.dequantize_nvfp4_128x4_to_bf16(qk).double()[perm.argsort()].permute(0, 2, 1, 3).reshape(-1, Hkv, D)[:T]
        vd = msa.dequantize_nvfp4_128x4_to_bf16(qv).double()[perm.argsort()].permute(0, 2, 1, 3).reshape(-1, Hkv, D)[:T]
    else:
        qk, qv = msa.quantize_kv_bf16_to_nvfp4_128x4(kf, vf)
        extra = {}
        kd = msa.dequantize_nvfp4_128x4_to_bf16(qk).double()
        vd = msa.dequantize_nvfp4_128x4_to_bf16(qv).double()
    out, lse = msa.sparse_atten_nvfp4_kv_func(
        q, qk.data, qv.data, qk.scale_128x4, qv.scale_128x4, qk.global_scale, qv.global_scale, row_ptr, q_idx,
        topk, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T, causal=causal,
        return_softmax_lse=True, **extra)
    vis = visible_from_blocks(q2k_block_mask(q2k.cpu(), nb), T, T, causal=causal)
    o_ref, lse_ref, _ = attention_ref(q.cpu(), kd.cpu(), vd.cpu(), vis, 128 ** -0.5)
    return out, lse, o_ref, lse_ref


def _check(out, lse, o_ref, lse_ref):
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.double().cpu(), o_ref, atol=2e-2, rtol=2e-2)
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(lse_ref))
    torch.testing.assert_close(lse.double().cpu()[fin], lse_ref[fin], atol=2e-2, rtol=2e-2)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("causal", [False, True])
def test_nvfp4_kv_dense_small(device, causal):
    if device.type == "cpu":
        pytest.importorskip("triton")
    out, lse, o_ref, lse_ref = _case(device, T=150, Hq=4, Hkv=2, topk=3, dtype=torch.float16, causal=causal,
                                     paged=False)
    _check(out, lse, o_ref, lse_ref)


@requires_cuda
@pytest.mark.parametrize("paged", [False, True])
def test_nvfp4_kv_gpu_bf16(cuda_device, paged):
    out, lse, o_ref, lse_ref = _case(cuda_device, T=1000, Hq=64, Hkv=4, topk=16, dtype=torch.bfloat16, causal=True,
                                     paged=paged)
    _check(out, lse, o_ref, lse_ref)


@pytest.mark.kernels_ci
def test_nvfp4_kv_errors(device):
    T, Hkv = 128, 1
    q = torch.randn(T, 2, 128, device=device, dtype=torch.float16)
    k = torch.zeros(T, Hkv, 64, device=device, dtype=torch.uint8)
    sc = torch.zeros(128, 8, device=device, dtype=torch.uint8)
    gs = torch.ones(1, device=device)
    cu = torch.tensor([0, T], device=device, dtype=torch.int32)
    rp = torch.zeros(Hkv, 2, device=device, dtype=torch.int32)
    qi = torch.full((Hkv, T * 4), -1, device=device, dtype=torch.int32)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T)
    f = msa.sparse_atten_nvfp4_kv_func
    with pytest.raises(TypeError, match="k"):
        f(q, k.float(), k, sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(TypeError, match="k_scale"):
        f(q, k, k, sc.float(), sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(TypeError, match="global"):
        f(q, k, k, sc, sc, gs.double(), gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="global"):
        f(q, k, k, sc, sc, gs[:0], gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="64"):
        f(q, k[..., :32], k[..., :32], sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="same shape"):
        f(q, k, k[:64], sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="k_scale"):
        f(q, k, k, sc[:64], sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="rank|3-D"):
        f(q[0], k, k, sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(msa.MsaUnsupportedError):
        f(q[..., :64], k, k, sc, sc, gs, gs, rp, qi, 4, **kw)
    out = f(q, k, k, sc, sc, None, None, rp, qi, 4, **kw)  # None global scale = 1.0; no entries -> zeros
    assert out.shape == q.shape and (out == 0).all()
