"""Prefill API: ``sparse_atten_func`` (docs/API.md §5.5) and ``sparse_atten_nvfp4_kv_func`` (§5.13).

Both functions validate their arguments (metadata only: no host synchronisation), then call one custom op
each (``sparse_prefill_fwd``, ``sparse_prefill_nvfp4_fwd``) whose implementation is
``prefill_kernel.prefill_launch``: the same Triton kernel, with element K/V (bf16 / fp16 / fp8) or packed
NVFP4 K/V. NVFP4 K/V are staged (each block decoded once into element tiles, then the element kernel) while the
workspace fits ``prefill_kernel.nvfp4_stage_limit``, else read and decoded inside the kernel loop (fused).

Shapes: ``q [total_q, Hq, 128]``; dense ``k, v [total_k, Hkv, 128]`` (NVFP4: uint8 ``[total_k, Hkv, 64]``) or
paged HND ``k, v [num_pages, Hkv, 128, 128]`` (NVFP4: ``[num_pages, Hkv, 128, 64]``) with
``page_table int32 [B, max_pages]`` (+ ``seqused_k int32 [B]``); CSR ``k2q_row_ptr int32 [Hkv, T+1]``,
``k2q_q_indices int32 [Hkv, >= total_q*topK]``. Returns ``O [total_q, Hq, 128]`` (+ fp32 ``LSE [total_q, Hq]``,
+ ``LSE_T``). Odd inputs (rows outside every request, decreasing ``cu_seqlens_q``, NaN scales) follow
docs/API.md §12.
"""

import math
from typing import Optional

import torch

from ._common import KV_BLOCK, MAX_TOPK, prod, round_up
from ._registry import add_op_namespace_prefix
from ._validate import (FP8, attention_out_dtype, check_devices, check_gqa, check_head_dim, check_host_int,
                        check_tensor, default_scale)
from .csr import check_cu_seqlens
from .errors import MsaUnsupportedError
from .prefill_kernel import nvfp4_stage, nvfp4_stage_limit, nvfp4_stage_plan, nvfp4_stage_table, prefill_launch

__all__ = ["sparse_atten_func", "sparse_atten_nvfp4_kv_func"]


@torch.library.custom_op(add_op_namespace_prefix("sparse_prefill_fwd"), mutates_args=())
def _sparse_prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k2q_row_ptr: torch.Tensor,
                       k2q_q_indices: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                       page_table: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor], topk: int,
                       causal: bool, softmax_scale: float, tau: float,
                       with_tau: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_dtype = torch.bfloat16 if q.dtype == FP8 else q.dtype
    return prefill_launch(q, k, v, k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k, page_table, seqused_k,
                           topk, causal, softmax_scale, tau, with_tau, out_dtype)


@_sparse_prefill_op.register_fake
def _(q, k, v, k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k, page_table, seqused_k, topk, causal,
      softmax_scale, tau, with_tau):
    out_dtype = torch.bfloat16 if q.dtype == FP8 else q.dtype
    total_q, hq, d = q.shape
    return (q.new_empty((total_q, hq, d), dtype=out_dtype), q.new_empty((total_q, hq), dtype=torch.float32),
            q.new_empty((total_q, hq) if with_tau else (0,), dtype=torch.float32))


_ATTN_DTYPES = (torch.bfloat16, torch.float16, FP8)
_PARTIAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8)


def _check_opt_dtype(name: str, value):
    if value is None:
        return None
    if not isinstance(value, torch.dtype) or value not in _ATTN_DTYPES:
        raise TypeError(f"{name} must be one of bfloat16, float16, float8_e4m3fn (or None), got {value}")
    return value


def sparse_atten_func(q, k, v, k2q_row_ptr, k2q_q_indices, topK, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, blk_kv=128, causal=False, softmax_scale=None, lse_temperature_scale=1.0,
                      return_temperature_lse=False, partial_dtype=torch.bfloat16, return_softmax_lse=False,
                      page_table=None, seqused_k=None, schedule=None, usable_SM_count=-1, qk_dtype=None,
                      pv_dtype=None):
    """Block-sparse varlen attention over the KV-major CSR of ``build_k2q_csr`` (docs/API.md §5.5).

    q: [total_q, Hq, 128] bf16/fp16/fp8. Dense k, v: [total_k, Hkv, 128]; paged k, v:
    [num_pages, Hkv, 128, 128] with page_table int32 [B, max_pages] and optional seqused_k int32 [B].
    k2q_row_ptr int32 [Hkv, T+1], k2q_q_indices int32 [Hkv, >= total_q*topK]; cu_seqlens_q/k int32 [B+1].
    Returns O [total_q, Hq, 128] (Q's dtype; bf16 for fp8 Q), plus LSE fp32 [total_q, Hq] with
    ``return_softmax_lse``, plus LSE_T with ``return_temperature_lse`` (the same object as LSE when
    ``|tau - 1| <= 1e-12``).
    """
    # ---- q / k / v ------------------------------------------------------------------------------
    check_tensor("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [total_q, Hq, D], got shape {tuple(q.shape)}")
    if q.dtype not in _ATTN_DTYPES:
        raise TypeError(f"q dtype {q.dtype} is not supported; use bfloat16, float16 or float8_e4m3fn")
    check_tensor("k", k)
    check_tensor("v", v)
    check_devices((("q", q), ("k", k), ("v", v)))
    out_dtype = attention_out_dtype(q, k, v)
    paged = page_table is not None
    if k.dim() != v.dim() or k.dim() != (4 if paged else 3):
        raise ValueError(f"k and v must be {'4-D [num_pages, Hkv, blk_kv, D]' if paged else '3-D [total_k, Hkv, D]'}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"head dims differ: q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}")
    check_head_dim("q", q.shape[-1])
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    check_gqa(hq, hkv)

    batch = _check_prefill_csr(hkv, total_q, k2q_row_ptr, k2q_q_indices, topK, cu_seqlens_q, cu_seqlens_k)

    # ---- dense / paged KV -----------------------------------------------------------------------
    if not paged:
        if seqused_k is not None:
            raise ValueError("seqused_k is only supported together with page_table")
        if k.shape != v.shape or k.shape[1:] != (hkv, d):
            raise ValueError(f"dense k and v must both be [total_k, Hkv, {d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    elif k.shape != v.shape:
        raise ValueError(f"paged k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check_prefill_paging(page_table, seqused_k, batch, blk_kv, int(k.shape[2]) if paged else None)

    # ---- scalars / advisory args ----------------------------------------------------------------
    tau = _check_prefill_scalars(lse_temperature_scale, return_temperature_lse, return_softmax_lse, partial_dtype)
    if _check_opt_dtype("qk_dtype", qk_dtype) is not None and qk_dtype != q.dtype:
        raise ValueError(f"qk_dtype ({qk_dtype}) must equal q.dtype ({q.dtype}); Q fp8->bf16 staging is not supported")
    if _check_opt_dtype("pv_dtype", pv_dtype) is not None:
        if not (pv_dtype == v.dtype or (pv_dtype == torch.bfloat16 and v.dtype == FP8)):
            raise ValueError(f"pv_dtype ({pv_dtype}) must equal v.dtype ({v.dtype}) or be bfloat16 with fp8 v")
    scale = default_scale(softmax_scale, d)

    named = [("q", q), ("k", k), ("v", v), ("k2q_row_ptr", k2q_row_ptr), ("k2q_q_indices", k2q_q_indices),
             ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("page_table", page_table),
             ("seqused_k", seqused_k)]
    check_devices(named)

    with_tau = bool(return_temperature_lse) and abs(tau - 1.0) > 1e-12
    out, lse, lse_t = _sparse_prefill_op(q, k, v, k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k,
                                         page_table, seqused_k, topK, bool(causal), scale, tau, with_tau)
    return _prefill_returns(out, lse, lse_t, return_softmax_lse, return_temperature_lse, with_tau)


def _check_prefill_csr(hkv: int, total_q: int, k2q_row_ptr, k2q_q_indices, topK, cu_seqlens_q, cu_seqlens_k) -> int:
    """CSR / topK / cu_seqlens checks of docs/API.md §5.5 (shared with ``sparse_atten_nvfp4_kv_func``). Returns B."""
    for name, t in (("k2q_row_ptr", k2q_row_ptr), ("k2q_q_indices", k2q_q_indices)):
        check_tensor(name, t, dtypes=(torch.int32,))
        if t.dim() != 2 or t.shape[0] != hkv:
            raise ValueError(f"{name} must be 2-D [Hkv={hkv}, *], got shape {tuple(t.shape)}")
    check_host_int("topK", topK)
    if not 1 <= topK <= MAX_TOPK:
        raise ValueError(f"topK must be in [1, {MAX_TOPK}], got {topK}")
    if k2q_q_indices.shape[1] < total_q * topK:
        raise ValueError(f"k2q_q_indices.shape[1] ({k2q_q_indices.shape[1]}) must be >= total_q*topK "
                         f"({total_q * topK})")
    if k2q_row_ptr.shape[1] < 1:
        raise ValueError("k2q_row_ptr must have at least one column [Hkv, T+1]")
    return check_cu_seqlens(cu_seqlens_q, cu_seqlens_k)


def _check_prefill_paging(page_table, seqused_k, batch: int, blk_kv, page_dim: Optional[int]):
    """blk_kv / page_table / seqused_k checks of docs/API.md §5.5. ``page_dim``: k.shape[2] when paged (else None)."""
    check_host_int("blk_kv", blk_kv)
    if page_table is None:
        if seqused_k is not None:
            raise ValueError("seqused_k is only supported together with page_table")
        if blk_kv != KV_BLOCK:
            raise MsaUnsupportedError(f"blk_kv={blk_kv} is not supported; only 128")
        return
    check_tensor("page_table", page_table, dtypes=(torch.int32,))
    if page_table.dim() != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must be [B={batch}, max_pages], got shape {tuple(page_table.shape)}")
    if page_dim != blk_kv:
        raise ValueError(f"k.shape[2] ({page_dim}) must equal blk_kv ({blk_kv})")
    if blk_kv != KV_BLOCK:
        raise MsaUnsupportedError(f"blk_kv={blk_kv} is not supported; only 128")
    if seqused_k is not None:
        check_tensor("seqused_k", seqused_k, dtypes=(torch.int32,))
        if seqused_k.dim() != 1 or seqused_k.shape[0] != batch:
            raise ValueError(f"seqused_k must be [B={batch}], got shape {tuple(seqused_k.shape)}")


def _check_prefill_scalars(lse_temperature_scale, return_temperature_lse, return_softmax_lse, partial_dtype) -> float:
    """tau / LSE flags / partial_dtype checks of docs/API.md §5.5. Returns tau as a float."""
    tau = float(lse_temperature_scale)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"lse_temperature_scale must be finite and > 0, got {lse_temperature_scale}")
    if return_temperature_lse and not return_softmax_lse:
        raise ValueError("return_temperature_lse=True requires return_softmax_lse=True")
    if not isinstance(partial_dtype, torch.dtype) or partial_dtype not in _PARTIAL_DTYPES:
        raise TypeError(f"partial_dtype must be one of float32, bfloat16, float16, float8_e4m3fn, got {partial_dtype}")
    return tau


def _prefill_returns(out, lse, lse_t, return_softmax_lse, return_temperature_lse, with_tau):
    """O, (O, LSE) or (O, LSE, LSE_T); LSE_T is LSE itself when tau is 1 (identity fast path)."""
    if not return_softmax_lse:
        return out
    if not return_temperature_lse:
        return out, lse
    return out, lse, (lse_t if with_tau else lse)


# ---- NVFP4 K/V (docs/API.md §5.13) --------------------------------------------------------------------------------

_Q_DTYPES = (torch.bfloat16, torch.float16, FP8)


def _check_scale(name: str, scale: torch.Tensor, rows: int):
    check_tensor(name, scale, dtypes=(torch.uint8,))
    if scale.dim() != 2 or scale.shape[1] < 8:
        raise ValueError(f"{name} must be 2-D with at least 8 columns, got shape {tuple(scale.shape)}")
    need = round_up(rows, 128) * 8
    if scale.numel() < need or scale.shape[0] < round_up(rows, 128):
        raise ValueError(f"{name} has shape {tuple(scale.shape)}; the 128x4 layout of {rows} rows needs at least "
                         f"({round_up(rows, 128)}, 8)")


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
    n, gather, nbytes = nvfp4_stage_plan(k, page_table, out_dtype)
    # the kernels read the scales as logical row-major flat buffers (C = 8): make them so (no-op when contiguous)
    k_scale, v_scale = k_scale.contiguous(), v_scale.contiguous()
    if q.shape[0] > 0 and 0 < nbytes <= nvfp4_stage_limit(q.device):
        # decode each K/V block once into element tiles, then the element kernel (prefill_kernel's staging note)
        ks = nvfp4_stage(k, k_scale, page_table, out_dtype, n, gather)
        vs = nvfp4_stage(v, v_scale, page_table, out_dtype, n, gather)
        table = nvfp4_stage_table(page_table, k.shape[0]) if gather else page_table
        return prefill_launch(q, ks, vs, k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k, table, seqused_k,
                              topk, causal, softmax_scale, tau, with_tau, out_dtype, kv_global=(k_global, v_global))
    return prefill_launch(q, k, v, k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k, page_table, seqused_k,
                           topk, causal, softmax_scale, tau, with_tau, out_dtype,
                           nvfp4=(k_scale, v_scale, k_global, v_global))


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
    """Block-sparse attention with NVFP4 K/V (docs/API.md §5.13): staged or fused dequantisation.

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
    rows = prod(int(s) for s in k.shape[:-1])
    _check_scale("k_scale_128x4", k_scale_128x4, rows)
    _check_scale("v_scale_128x4", v_scale_128x4, rows)
    kg = _check_global("k_global_scale", k_global_scale)
    vg = _check_global("v_global_scale", v_global_scale)
    total_q, hq, d = q.shape
    hkv = int(k.shape[1])
    check_gqa(hq, hkv)
    batch = _check_prefill_csr(hkv, total_q, k2q_row_ptr, k2q_q_indices, topK, cu_seqlens_q, cu_seqlens_k)
    _check_prefill_paging(page_table, seqused_k, batch, blk_kv, int(k.shape[2]) if paged else None)
    tau = _check_prefill_scalars(lse_temperature_scale, return_temperature_lse, return_softmax_lse, partial_dtype)
    scale = default_scale(softmax_scale, d)
    check_devices([("q", q), ("k", k), ("v", v), ("k_scale_128x4", k_scale_128x4), ("v_scale_128x4", v_scale_128x4),
                   ("k_global_scale", kg), ("v_global_scale", vg), ("k2q_row_ptr", k2q_row_ptr),
                   ("k2q_q_indices", k2q_q_indices), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                   ("page_table", page_table), ("seqused_k", seqused_k)])

    with_tau = bool(return_temperature_lse) and abs(tau - 1.0) > 1e-12
    out, lse, lse_t = _sparse_prefill_nvfp4_op(q, k, v, k_scale_128x4, v_scale_128x4, kg, vg, k2q_row_ptr,
                                               k2q_q_indices, cu_seqlens_q, cu_seqlens_k, page_table, seqused_k,
                                               topK, bool(causal), scale, tau, with_tau)
    return _prefill_returns(out, lse, lse_t, return_softmax_lse, return_temperature_lse, with_tau)
