"""``sparse_atten_nvfp4_kv_func``: block-sparse prefill over NVFP4-quantised K/V (API.md §5.13).

Current implementation (interim, correct, NOT yet fused): K and V are dequantised on the device to
bf16 with the package's Triton dequantiser (bit-identical to ``dequantize_nvfp4_128x4_to_bf16``,
global scale read on the device, no host sync) and then ``sparse_atten_func`` runs on them. The
result is exactly the spec's reference construction (§3.5: ``sparse_atten_func`` on dequantised
bf16 K/V), but it materialises bf16 K/V for the whole cache, so it moves ~3.6x the bytes a fused
kernel would. The fused kernel (packed FP4 + scales read inside the attention loop) is open work.
"""

import torch

from ._validate import check_devices, check_head_dim, check_tensor
from .nvfp4 import _prod, _round_up, native_nvfp4_dequant_swizzled_to_bf16
from .prefill import sparse_atten_func

_Q_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def _check_scale(name: str, scale: torch.Tensor, rows: int):
    check_tensor(name, scale, dtypes=(torch.uint8,))
    if scale.dim() != 2 or scale.shape[1] < 8:
        raise ValueError(f"{name} must be 2-D with at least 8 columns, got shape {tuple(scale.shape)}")
    need = _round_up(rows, 128) * 8
    if scale.numel() < need:
        raise ValueError(f"{name} has {scale.numel()} elements; the 128x4 layout of {rows} rows needs {need}")


def _check_global(name: str, gs):
    if gs is None:
        return 1.0
    check_tensor(name, gs, dtypes=(torch.float32,))
    if gs.numel() < 1:
        raise ValueError(f"{name} must have at least one element")
    return gs.reshape(-1)[:1]


def _dequant(packed: torch.Tensor, scale: torch.Tensor, gs) -> torch.Tensor:
    # The dequantiser reads the 2-D scale tensor in its logical row-major order (C = 8), as §5.13 says.
    return native_nvfp4_dequant_swizzled_to_bf16(packed, scale, gs)


def sparse_atten_nvfp4_kv_func(q, k, v, k_scale_128x4, v_scale_128x4, k_global_scale, v_global_scale,
                               k2q_row_ptr, k2q_q_indices, topK, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, blk_kv=128, causal=False, softmax_scale=None,
                               lse_temperature_scale=1.0, return_temperature_lse=False,
                               partial_dtype=torch.bfloat16, return_softmax_lse=False, page_table=None,
                               seqused_k=None, schedule=None, usable_SM_count=-1, qk_dtype=None, pv_dtype=None):
    """Block-sparse attention with NVFP4 K/V.

    q [total_q, Hq, 128] bf16/fp16/fp8; k, v uint8 packed E2M1: dense [total_k, Hkv, 64] or paged
    [num_pages, Hkv, 128, 64]; scales uint8 2-D 128x4-swizzled (rows = total_k*Hkv or
    num_pages*Hkv*128, 8 logical columns); global scales fp32 (element 0) or None (= 1.0). Other
    arguments as ``sparse_atten_func``. Returns O (bf16 for fp8 Q, else Q's dtype) [+ LSE [+ LSE_T]].
    ``qk_dtype``/``pv_dtype`` are accepted and ignored (K/V are bf16 after dequantisation).
    """
    check_tensor("q", q, ndim=3, dtypes=_Q_DTYPES)
    check_head_dim("q", int(q.shape[-1]))
    check_tensor("k", k, dtypes=(torch.uint8,))
    check_tensor("v", v, dtypes=(torch.uint8,))
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dim() not in (3, 4):
        raise ValueError(f"k must be [total_k, Hkv, 64] or [num_pages, Hkv, 128, 64], got {tuple(k.shape)}")
    if k.shape[-1] != 64:
        raise ValueError(f"k/v packed last dim must be 64 (head dim 128), got {k.shape[-1]}")
    if k.dim() == 4 and k.shape[2] != blk_kv:
        raise ValueError(f"k.shape[2] ({k.shape[2]}) must equal blk_kv ({blk_kv})")
    rows = _prod(int(s) for s in k.shape[:-1])
    _check_scale("k_scale_128x4", k_scale_128x4, rows)
    _check_scale("v_scale_128x4", v_scale_128x4, rows)
    kg = _check_global("k_global_scale", k_global_scale)
    vg = _check_global("v_global_scale", v_global_scale)
    check_devices([("q", q), ("k", k), ("v", v), ("k_scale_128x4", k_scale_128x4),
                   ("v_scale_128x4", v_scale_128x4)])
    kb = _dequant(k, k_scale_128x4, kg)
    vb = _dequant(v, v_scale_128x4, vg)
    qq = q.to(torch.bfloat16) if q.dtype == torch.float8_e4m3fn else q  # fp8 -> bf16 is exact
    if qq.dtype == torch.float16:
        kb, vb = kb.to(torch.float16), vb.to(torch.float16)
    return sparse_atten_func(
        qq, kb, vb, k2q_row_ptr, k2q_q_indices, topK, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, blk_kv=blk_kv, causal=causal,
        softmax_scale=softmax_scale, lse_temperature_scale=lse_temperature_scale,
        return_temperature_lse=return_temperature_lse, partial_dtype=partial_dtype,
        return_softmax_lse=return_softmax_lse, page_table=page_table, seqused_k=seqused_k, schedule=schedule,
        usable_SM_count=usable_SM_count)
