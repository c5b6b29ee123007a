"""``sparse_atten_nvfp4_kv_func``: block-sparse prefill over NVFP4-quantised K/V (API.md §5.13).

Fused: the prefill kernel (``prefill._prefill_fwd_kernel`` with ``KV_FMT=1``) reads the packed E2M1
bytes and the 128x4-swizzled E4M3 block scales of every K/V sub-block inside its loop
(``nvfp4_tile.nvfp4_tile``) and never materialises dequantised K/V in memory. Per element it forms
``e2m1 * E4M3(scale)``, which is exact in bf16 and fp16 (at most 5 significant bits, magnitudes in
[2^-10, 2688]); the global scales are not applied per element:

* ``k_global`` is folded into the logit scale inside the kernel (``softmax_scale * k_global``, read
  from its device pointer: no host sync), so the LSE includes it;
* ``v_global`` multiplies the normalised output once (``O = v_global * O_normalised``); the LSE does
  not depend on it.

``None`` global scales mean 1.0 (a constexpr-disabled load, no tensor allocated). Compute dtype: Q's
dtype for bf16/fp16 Q; fp8 Q is widened exactly to bf16 in registers (as the fp8 prefill path does),
so the MMA operands are exact and the result matches ``sparse_atten_func`` on dequantised bf16 K/V
up to the bf16 rounding of the dequantised elements (§3.5: 2e-2). Memory: besides O / LSE, only the
CSR-inversion workspace of ``sparse_atten_func`` is allocated (and a contiguous copy of a scale tensor
if the caller passes a non-contiguous one).

Odd inputs follow docs/POLICIES.md, as ``sparse_atten_func`` (same kernel): query rows outside
``cu_seqlens_q`` (or not owned under a decreasing ``cu_seqlens_q``) get O = 0 and LSE = -inf; empty rows
stay exactly 0 even with an inf / NaN ``v_global_scale``; a NaN block scale (``0x7F``, what the quantiser
writes for a block holding a NaN) makes that block's K/V NaN.
"""

from typing import Optional

import torch

from ._registry import add_op_namespace_prefix
from ._validate import FP8, check_devices, check_gqa, check_head_dim, check_tensor, default_scale
from .nvfp4 import _prod, _round_up
from .prefill import (_prefill_launch, check_prefill_csr, check_prefill_paging, check_prefill_scalars,
                      prefill_returns)

_Q_DTYPES = (torch.bfloat16, torch.float16, FP8)


def _check_scale(name: str, scale: torch.Tensor, rows: int):
    check_tensor(name, scale, dtypes=(torch.uint8,))
    if scale.dim() != 2 or scale.shape[1] < 8:
        raise ValueError(f"{name} must be 2-D with at least 8 columns, got shape {tuple(scale.shape)}")
    need = _round_up(rows, 128) * 8
    if scale.numel() < need or scale.shape[0] < _round_up(rows, 128):
        raise ValueError(f"{name} has shape {tuple(scale.shape)}; the 128x4 layout of {rows} rows needs at least "
                         f"({_round_up(rows, 128)}, 8)")


def _check_global(name: str, gs):
    if gs is None:
        return None
    check_tensor(name, gs, dtypes=(torch.float32,))
    if gs.numel() < 1:
        raise ValueError(f"{name} must have at least one element")
    return gs


@torch.library.custom_op(add_op_namespace_prefix("sparse_prefill_nvfp4_fwd"), mutates_args=())
def _sparse_prefill_nvfp4_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor,
                             v_scale: torch.Tensor, k_global: Optional[torch.Tensor], v_global: Optional[torch.Tensor],
                             k2q_row_ptr: torch.Tensor, k2q_q_indices: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, page_table: Optional[torch.Tensor],
                             seqused_k: Optional[torch.Tensor], topk: int, causal: bool, softmax_scale: float,
                             tau: float, with_tau: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_dtype = torch.bfloat16 if q.dtype == FP8 else q.dtype
    # the kernel reads the scales as logical row-major flat buffers (C = 8): make them so (no-op when contiguous)
    return _prefill_launch(q, k, v, k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k, page_table, seqused_k,
                           topk, causal, softmax_scale, tau, with_tau, out_dtype,
                           nvfp4=(k_scale.contiguous(), v_scale.contiguous(), k_global, v_global))


@_sparse_prefill_nvfp4_op.register_fake
def _(q, k, v, k_scale, v_scale, k_global, v_global, k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k,
      page_table, seqused_k, topk, causal, softmax_scale, tau, with_tau):
    out_dtype = torch.bfloat16 if q.dtype == FP8 else q.dtype
    total_q, hq, d = q.shape
    return (q.new_empty((total_q, hq, d), dtype=out_dtype), q.new_empty((total_q, hq), dtype=torch.float32),
            q.new_empty((total_q, hq) if with_tau else (0,), dtype=torch.float32))


def sparse_atten_nvfp4_kv_func(q, k, v, k_scale_128x4, v_scale_128x4, k_global_scale, v_global_scale,
                               k2q_row_ptr, k2q_q_indices, topK, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, blk_kv=128, causal=False, softmax_scale=None,
                               lse_temperature_scale=1.0, return_temperature_lse=False,
                               partial_dtype=torch.bfloat16, return_softmax_lse=False, page_table=None,
                               seqused_k=None, schedule=None, usable_SM_count=-1, qk_dtype=None, pv_dtype=None):
    """Block-sparse attention with NVFP4 K/V, dequantised inside the attention kernel (API.md §5.13).

    q [total_q, Hq, 128] bf16/fp16/fp8; k, v uint8 packed E2M1: dense [total_k, Hkv, 64] or paged
    [num_pages, Hkv, 128, 64] (with page_table int32 [B, max_pages], optional seqused_k int32 [B]);
    scales uint8 2-D 128x4-swizzled, >= (round_up(R, 128), 8) with R = total_k*Hkv (dense) or
    num_pages*Hkv*128 (paged), read as flat buffers with 8 logical columns; global scales fp32 tensors
    (element 0, read on the device) or None (= 1.0). CSR k2q_row_ptr int32 [Hkv, T+1], k2q_q_indices int32
    [Hkv, >= total_q*topK], cu_seqlens_q/k int32 [B+1]; other arguments as ``sparse_atten_func``.
    Returns O [total_q, Hq, 128] (bf16 for fp8 Q, else Q's dtype) [+ LSE fp32 [total_q, Hq] [+ LSE_T]].
    ``schedule``, ``usable_SM_count``, ``qk_dtype``, ``pv_dtype`` are accepted and ignored.
    """
    check_tensor("q", q, ndim=3, dtypes=_Q_DTYPES)
    check_head_dim("q", int(q.shape[-1]))
    check_tensor("k", k, dtypes=(torch.uint8,))
    check_tensor("v", v, dtypes=(torch.uint8,))
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    paged = page_table is not None
    if k.dim() != (4 if paged else 3):
        raise ValueError(f"k must be {'[num_pages, Hkv, 128, 64] (page_table given)' if paged else '[total_k, Hkv, 64]'}"
                         f", got {tuple(k.shape)}")
    if k.shape[-1] != 64:
        raise ValueError(f"k/v packed last dim must be 64 (head dim 128), got {k.shape[-1]}")
    if paged and k.shape[2] != blk_kv:
        raise ValueError(f"k.shape[2] ({k.shape[2]}) must equal blk_kv ({blk_kv})")
    rows = _prod(int(s) for s in k.shape[:-1])
    _check_scale("k_scale_128x4", k_scale_128x4, rows)
    _check_scale("v_scale_128x4", v_scale_128x4, rows)
    kg = _check_global("k_global_scale", k_global_scale)
    vg = _check_global("v_global_scale", v_global_scale)
    total_q, hq, d = q.shape
    hkv = int(k.shape[1])
    check_gqa(hq, hkv)
    batch = check_prefill_csr(hkv, total_q, k2q_row_ptr, k2q_q_indices, topK, cu_seqlens_q, cu_seqlens_k)
    check_prefill_paging(page_table, seqused_k, batch, blk_kv, int(k.shape[2]) if paged else None)
    tau = check_prefill_scalars(lse_temperature_scale, return_temperature_lse, return_softmax_lse, partial_dtype)
    scale = default_scale(softmax_scale, d)
    check_devices([("q", q), ("k", k), ("v", v), ("k_scale_128x4", k_scale_128x4), ("v_scale_128x4", v_scale_128x4),
                   ("k_global_scale", kg), ("v_global_scale", vg), ("k2q_row_ptr", k2q_row_ptr),
                   ("k2q_q_indices", k2q_q_indices), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                   ("page_table", page_table), ("seqused_k", seqused_k)])

    with_tau = bool(return_temperature_lse) and abs(tau - 1.0) > 1e-12
    out, lse, lse_t = _sparse_prefill_nvfp4_op(q, k, v, k_scale_128x4, v_scale_128x4, kg, vg, k2q_row_ptr,
                                               k2q_q_indices, cu_seqlens_q, cu_seqlens_k, page_table, seqused_k,
                                               topK, bool(causal), scale, tau, with_tau)
    return prefill_returns(out, lse, lse_t, return_softmax_lse, return_temperature_lse, with_tau)
