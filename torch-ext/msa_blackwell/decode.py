"""Sparse paged decode attention (docs/API.md §5.1, §5.2, §6.2).

All three entry points run the same Triton kernel (``decode_kernel.msa_decode_kernel``) with the same
shape-only split policy, so equivalent inputs give bitwise-identical outputs:

- ``sparse_decode_atten_func``: paged HND ``k, v [num_pages, Hkv, 128, 128]`` + ``page_table``.
- ``SparseDecodePagedAttentionWrapper``: the same call, planned once per step; ``run`` is
  CUDA-graph capturable and uses workspaces allocated in ``plan``.
- ``flash_decode_with_gqa_share_sparse``: token-major ``k_cache [max_slots, Hkv, D]`` +
  ``req_to_token`` (peer/SGLang layout).

Split-KV workspaces. When the policy splits the KV work of a (request, KV head), the kernel needs
fp32 partials and a zeroed int32 counter per (request, KV head, M tile); the counter is reset to
zero by the kernel itself after use. Eager functional calls reuse one workspace set per (device,
stream) (``_eager_workspaces``); calls made while a stream is being captured into a CUDA graph, and
calls traced by torch.compile (the custom ops), allocate their own (``torch.empty`` partials +
``torch.zeros`` counter), so a graph never shares scratch memory with anything else. The wrapper
allocates them once in ``plan`` and reuses them in every ``run``: one launch per run. As a
consequence, one planned wrapper must not run concurrently on two streams.

Eager fast path. Each functional entry point validates a call signature (dtypes, shapes, strides,
devices and host arguments, ``_launch.tensor_key``) once and caches the launch plan for it; later
eager calls with that signature skip the checks and the custom-op dispatcher and launch the compiled
Triton kernel directly (``_launch.TritonLauncher``). ``wrapper.run`` caches the signatures of its
``(q, k, v, out, lse)`` against the plan. Inside a ``tuning.override`` block (docs/API.md §9) the fast
paths are skipped, so a launch never uses a plan made under other overrides; the wrapper's fast path
runs only under the overrides its ``plan`` saw. Under ``torch.compile`` every call goes through the custom
ops (``_sparse_decode_fwd``, ``_sparse_decode_fwd_out``; NVFP4 K/V through their optional scale
arguments), which compute the same launch.

FP8 (e4m3) KV is read as fp8 and widened to q's dtype in registers right before each ``tl.dot``; the
MMA shapes and accumulation order are the same as for bf16 KV, but the two are different Triton
compilations, so the result is within bf16 tolerance of running on ``k.to(bfloat16)`` and may differ
from it in the last bits (docs/API.md §3.1; the tests check it with a tolerance and report the
difference).

NVFP4 K/V (package extension; docs/API.md §5.1 / §5.2, with the conventions of §5.13
``sparse_atten_nvfp4_kv_func``):

- ``sparse_decode_atten_func(..., k_scale_128x4=None, v_scale_128x4=None, k_global_scale=None,
  v_global_scale=None)`` and ``SparseDecodePagedAttentionWrapper.run(q, k, v, *, k_scale_128x4=...,
  v_scale_128x4=..., k_global_scale=..., v_global_scale=..., ...)``. When ``k``/``v`` are uint8 they are
  packed E2M1 paged HND ``[num_pages, Hkv, 128, 64]`` (head dim 128; byte j of a row = element 2j in
  the low nibble, 2j+1 in the high nibble; any strides). Scales: uint8 2-D 128x4-swizzled E4M3 bytes,
  read as logical row-major flat buffers with C = 8 (a non-contiguous scale tensor is copied per call),
  at least ``round_up(num_pages*Hkv*128, 128) x 8`` elements; the scale row of (page, head h, slot s)
  is ``(page*Hkv + h)*128 + s`` (what ``quantize_kv_bf16_to_nvfp4_128x4`` of the HND cache produces).
  Global scales: fp32 tensors, element 0 read on the device (no host sync), or None (= 1.0).
  ``k``/``v`` may also be ``Nvfp4QuantizedTensor``s (unpacked into data, scale_128x4, global_scale).
- Errors: scales / global scales with non-uint8 k/v, uint8 k/v without both scales, or an
  ``Nvfp4QuantizedTensor`` together with explicit scales for it: ValueError naming the argument;
  otherwise §5.13's table (k/v or scales not uint8, global scale not fp32: TypeError; shapes, packed
  dim != 64, scale rank / columns / size, empty global scale, page dim != blk_kv: ValueError; head
  dim, blk_kv, GQA: MsaUnsupportedError) plus §5.1's metadata checks. q: bf16 / fp16 / fp8; output bf16
  for fp8 q, else q's dtype. ``flash_decode_with_gqa_share_sparse`` rejects NVFP4 caches
  (MsaUnsupportedError).
- Semantics: attention over ``K = e2m1(k) * E4M3(k_scale) * k_global`` and likewise V (LSE included).
  The dequantisation is fused into the decode kernel (``decode_kernel._fp4_kv_tiles``): every K/V tile
  is read as packed bytes + scale bytes and decoded in registers (bf16 K/V are never materialised).
  The MMAs run in fp16 for every q dtype with exact operands (tile value ``e2m1 * scale * 2^-7``; bf16
  / fp8 q scaled per row by a power of two into fp16), ``k_global`` and the 2^7 fold into the logit
  scale inside the kernel (so the LSE is that of attention over the dequantised K), ``v_global`` and
  the 2^7 multiply the final output once (split partials stay unscaled). Accuracy: P is rounded to
  fp16 before PV (finer than bf16 P on the native path); within docs/API.md §3.5's NVFP4 criterion of
  ``sparse_decode_atten_func`` on the dequantised bf16 K/V (which rounds ``K * k_global`` to bf16).
- Same launch policy and workspaces as the native path (one launch per call / run, CUDA-graph
  capturable); NVFP4 launches may use their own tile config (``decode_kernel.NVFP4_CONFIG_OVERRIDES``),
  so the wrapper's ``plan`` sizes its workspaces for both formats.
"""

from typing import Optional, Tuple

import torch

from . import tuning
from ._common import MAX_TOPK, round_up
from ._registry import add_op_namespace_prefix
from ._validate import (
    FP8,
    attention_out_dtype,
    check_devices,
    check_gqa,
    check_head_dim,
    check_positive_int,
    check_shape,
    check_tensor,
    default_scale,
)
from ._launch import SignatureCache, eager, tensor_key
from .decode_kernel import LAYOUT_HND, LAYOUT_TOKEN, launch, make_plan, workspace_sizes
from .errors import MsaUnsupportedError
from .nvfp4 import Nvfp4QuantizedTensor

BLK_KV = 128
HEAD_DIM = 128
DIRECT_HEAD_DIMS = (64, 128, 256)
DIRECT_MAX_GQA = 64
_I32 = (torch.int32,)
_INT = (torch.int32, torch.int64)
NVFP4_PACKED_DIM = HEAD_DIM // 2  # packed E2M1 bytes per row
NVFP4_SCALE_COLS = HEAD_DIM // 16  # logical E4M3 scale columns (C = 8)
_NVFP4_Q_DTYPES = (torch.bfloat16, torch.float16, FP8)


_SIG = SignatureCache()  # validated call signatures of the functional entry points -> (plan, softmax scale)


def _out_dtype(q_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if q_dtype == FP8 else q_dtype


def _plan_for(q, k, idx, table, layout, block_size, seqlen_q, hint_blocks, split_override=0, max_grid=0,
              nvfp4=False):
    if layout == LAYOUT_HND:
        hkv, d = k.shape[1], q.shape[2]  # q's head dim (= k's; packed NVFP4 k holds d / 2 bytes)
        b = table.shape[0]
    else:
        hkv, d = k.shape[1], k.shape[2]
        b = q.shape[0]
    g = q.shape[1] // hkv
    topk = 0 if idx is None else idx.shape[2]
    return make_plan(q.device, B=b, Hkv=hkv, G=g, SQ=seqlen_q, D=d, BS=block_size, topk=topk,
                     hint_blocks=hint_blocks, split_override=split_override, max_grid=max_grid, nvfp4=nvfp4,
                     kv_bytes=k.element_size())


def _workspaces(p, device):
    """Fresh split workspaces for one launch (the counter zeroed by a memset)."""
    no, nml, nc = workspace_sizes(p)
    if nc == 0:
        return None, None, None
    return (torch.empty(no, dtype=torch.float32, device=device), torch.empty(nml, dtype=torch.float32, device=device),
            torch.zeros(nc, dtype=torch.int32, device=device))


_STREAM_WS = {}  # (device index, raw stream) -> (o_part, ml_part, counter), grown on demand


def _eager_workspaces(p, device):
    """Split workspaces for an eager launch: one set per (device, stream), reused across calls (the kernel leaves
    the counter zeroed). While the stream is being captured into a CUDA graph, fresh ones (``_workspaces``), so a
    graph never shares scratch memory with eager calls or other graphs."""
    no, nml, nc = workspace_sizes(p)
    if nc == 0:
        return None, None, None
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return _workspaces(p, device)
    skey = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    ws = _STREAM_WS.get(skey)
    if ws is None or ws[0].numel() < no or ws[1].numel() < nml or ws[2].numel() < nc:
        ws = (torch.empty(max(no, 1 << 16), dtype=torch.float32, device=device),
              torch.empty(max(nml, 1 << 10), dtype=torch.float32, device=device),
              torch.zeros(max(nc, 256), dtype=torch.int32, device=device))
        _STREAM_WS[skey] = ws
    return ws


def _run_eager(p, slot, layout, q, k, v, idx, table, lens, slot_ids, sink, causal, scale, return_lse):
    """Eager launch without the custom-op dispatcher (same kernel, same plan): ``(out, lse or None)``."""
    t, hq, d = q.shape
    out = torch.empty((t, hq, d), dtype=_out_dtype(q.dtype), device=q.device)
    lse = torch.empty((t, hq), dtype=torch.float32, device=q.device) if return_lse else None
    if p is None:  # no slot can hold a token (token layout, empty cache): every row is empty
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    o_part, ml_part, counter = _eager_workspaces(p, q.device)
    launch(p, layout=layout, q=q, k=k, v=v, idx=idx, table=table, lens=lens, slot_ids=slot_ids, sink=sink, out=out,
           lse=lse, o_part=o_part, ml_part=ml_part, counter=counter, causal=causal, scale=scale,
           write_lse=return_lse, slot=slot)
    return out, lse


def _host_key(*values):
    """Host scalars with their types (``True`` and ``1`` must not share a cache entry)."""
    return values + tuple(map(type, values))


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------


def _fp4_args(k_scale, v_scale, k_global, v_global):
    """The kernel's NVFP4 operands, or None for native (bf16 / fp16 / fp8) K/V."""
    return None if k_scale is None else (k_scale, v_scale, k_global, v_global)


@torch.library.custom_op(add_op_namespace_prefix("sparse_decode_fwd"), mutates_args=())
def _sparse_decode_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: Optional[torch.Tensor],
                       table: torch.Tensor, lens: torch.Tensor, slot_ids: Optional[torch.Tensor],
                       sink: Optional[torch.Tensor], layout: int, block_size: int, seqlen_q: int, causal: bool,
                       scale: float, hint_blocks: int, return_lse: bool, k_scale: Optional[torch.Tensor] = None,
                       v_scale: Optional[torch.Tensor] = None, k_global: Optional[torch.Tensor] = None,
                       v_global: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Functional decode. Returns ``(out [T, Hq, D], lse fp32 [T, Hq] or [0])`` (T = q.shape[0]).

    Native K/V, or packed NVFP4 K/V (paged HND only) when ``k_scale`` is given: ``k, v`` uint8
    ``[P, Hkv, 128, 64]``, ``k_scale`` / ``v_scale`` flat uint8 128x4-swizzled scale bytes (logical row
    ``(page*Hkv+h)*128+s``, 8 columns), ``k_global`` / ``v_global`` fp32 (element 0) or None (= 1).
    """
    t, hq, d = q.shape
    out = torch.empty((t, hq, d), dtype=_out_dtype(q.dtype), device=q.device)
    lse = torch.empty((t, hq) if return_lse else (0,), dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    if layout == LAYOUT_TOKEN and k.shape[0] == 0:  # no slot can hold a token: every row is empty
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    fp4 = _fp4_args(k_scale, v_scale, k_global, v_global)
    p = _plan_for(q, k, idx, table, layout, block_size, seqlen_q, hint_blocks, nvfp4=fp4 is not None)
    o_part, ml_part, counter = _workspaces(p, q.device)
    launch(p, layout=layout, q=q, k=k, v=v, idx=idx, table=table, lens=lens, slot_ids=slot_ids, sink=sink,
           out=out, lse=lse, o_part=o_part, ml_part=ml_part, counter=counter, causal=causal, scale=scale,
           write_lse=return_lse, nvfp4=fp4)
    return out, lse


@_sparse_decode_fwd.register_fake
def _(q, k, v, idx, table, lens, slot_ids, sink, layout, block_size, seqlen_q, causal, scale, hint_blocks,
      return_lse, k_scale=None, v_scale=None, k_global=None, v_global=None):
    t, hq, d = q.shape
    out = q.new_empty((t, hq, d), dtype=_out_dtype(q.dtype))
    lse = q.new_empty((t, hq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(add_op_namespace_prefix("sparse_decode_fwd_out"),
                         mutates_args=("out", "lse", "o_part", "ml_part", "counter"))
def _sparse_decode_fwd_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: Optional[torch.Tensor],
                           page_table: torch.Tensor, seqused_k: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           o_part: torch.Tensor, ml_part: torch.Tensor, counter: torch.Tensor, seqlen_q: int,
                           causal: bool, scale: float, hint_blocks: int, return_lse: bool, split_override: int,
                           max_grid: int, k_scale: Optional[torch.Tensor] = None,
                           v_scale: Optional[torch.Tensor] = None, k_global: Optional[torch.Tensor] = None,
                           v_global: Optional[torch.Tensor] = None) -> None:
    """Paged-HND decode into ``out`` (and ``lse`` if ``return_lse``) with caller-owned workspaces.

    o_part / ml_part: fp32, counter: int32 (all zeros between launches; the kernel keeps it so),
    each at least ``workspace_sizes(plan)`` elements (any size when the plan does not split). NVFP4
    K/V when ``k_scale`` is given (as ``_sparse_decode_fwd``).
    """
    if q.shape[0] == 0:
        return
    fp4 = _fp4_args(k_scale, v_scale, k_global, v_global)
    p = _plan_for(q, k, idx, page_table, LAYOUT_HND, BLK_KV, seqlen_q, hint_blocks, split_override, max_grid,
                  nvfp4=fp4 is not None)
    no, nml, nc = workspace_sizes(p)
    if nc and (o_part.numel() < no or ml_part.numel() < nml or counter.numel() < nc):
        raise RuntimeError("decode workspace too small for this launch; call plan() again")
    launch(p, layout=LAYOUT_HND, q=q, k=k, v=v, idx=idx, table=page_table, lens=seqused_k, slot_ids=None,
           sink=None, out=out, lse=lse, o_part=o_part, ml_part=ml_part, counter=counter, causal=causal,
           scale=scale, write_lse=return_lse, nvfp4=fp4)


@_sparse_decode_fwd_out.register_fake
def _(q, k, v, idx, page_table, seqused_k, out, lse, o_part, ml_part, counter, seqlen_q, causal, scale, hint_blocks,
      return_lse, split_override, max_grid, k_scale=None, v_scale=None, k_global=None, v_global=None):
    return None


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _validate_paged_meta(page_table, seqused_k, seqlen_q, max_seqlen_k):
    check_tensor("page_table", page_table, dtypes=_I32)
    check_tensor("seqused_k", seqused_k, dtypes=_I32)
    if page_table.dim() != 2:
        raise ValueError(f"page_table must be 2-D [B, max_pages], got shape {tuple(page_table.shape)}")
    b = page_table.shape[0]
    check_shape("seqused_k", seqused_k, (b,))
    check_positive_int("seqlen_q", seqlen_q)
    check_positive_int("max_seqlen_k", max_seqlen_k)
    return b


def _validate_q2k(q2k_indices, hkv, total_q):
    if q2k_indices is None:
        return
    check_tensor("q2k_indices", q2k_indices, dtypes=_I32)
    if q2k_indices.dim() != 3 or q2k_indices.shape[0] != hkv or q2k_indices.shape[1] != total_q:
        raise ValueError(f"q2k_indices must have shape [Hkv={hkv}, B*seqlen_q={total_q}, topK], "
                         f"got {tuple(q2k_indices.shape)}")
    if not 1 <= q2k_indices.shape[2] <= MAX_TOPK:
        raise ValueError(f"q2k_indices: topK must be in [1, {MAX_TOPK}], got {q2k_indices.shape[2]}")


def _validate_blk_kv(blk_kv):
    if isinstance(blk_kv, bool) or not isinstance(blk_kv, int):
        raise TypeError(f"blk_kv must be an int, got {type(blk_kv).__name__}")
    if blk_kv != BLK_KV:
        raise MsaUnsupportedError(f"blk_kv={blk_kv} is not supported; only {BLK_KV}")


def _validate_paged_kv(k, v):
    """k / v: 4-D paged caches of one shape ``[P, Hkv, page, last]``."""
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")


def _validate_page_size(k, blk_kv):
    """``blk_kv`` is the supported page size and the pages of ``k`` have it."""
    _validate_blk_kv(blk_kv)
    if k.shape[2] != blk_kv:
        raise ValueError(f"k.shape[2] (page size {k.shape[2]}) must equal blk_kv={blk_kv}")


def _validate_rows(q, hkv, q2k_indices, page_table, seqused_k, seqlen_q, max_seqlen_k):
    """Paged metadata, ``q`` rows = B * seqlen_q, the GQA ratio and the index tensor ``[Hkv, B*seqlen_q, topK]``."""
    b = _validate_paged_meta(page_table, seqused_k, seqlen_q, max_seqlen_k)
    if q.shape[0] != b * seqlen_q:
        raise ValueError(f"q.shape[0] ({q.shape[0]}) must equal B*seqlen_q = {b}*{seqlen_q}")
    check_gqa(q.shape[1], hkv)
    _validate_q2k(q2k_indices, hkv, q.shape[0])


def _validate_official(q, k, v, q2k_indices, page_table, seqused_k, seqlen_q, max_seqlen_k, blk_kv):
    check_tensor("q", q, ndim=3)
    _validate_paged_kv(k, v)
    check_head_dim("q", q.shape[2], (HEAD_DIM,))
    check_head_dim("k", k.shape[3], (HEAD_DIM,))
    _validate_page_size(k, blk_kv)
    attention_out_dtype(q, k, v)
    _validate_rows(q, k.shape[1], q2k_indices, page_table, seqused_k, seqlen_q, max_seqlen_k)
    check_devices([("q", q), ("k", k), ("v", v), ("q2k_indices", q2k_indices), ("page_table", page_table),
                   ("seqused_k", seqused_k)])


# ---- NVFP4 K/V (the decode extension of docs/API.md §5.13's conventions) ------------------------------


def _unpack_quantized(name, t, scale, global_scale):
    """``Nvfp4QuantizedTensor`` -> ``(data, scale_128x4, global_scale)``; raw tensors pass through."""
    if isinstance(t, Nvfp4QuantizedTensor):
        given = [n for n, x in ((f"{name}_scale_128x4", scale), (f"{name}_global_scale", global_scale))
                 if x is not None]
        if given:
            raise ValueError(f"{name} is an Nvfp4QuantizedTensor, which carries its own scales; do not also pass "
                             f"{' / '.join(given)}")
        return t.data, t.scale_128x4, t.global_scale
    return t, scale, global_scale


def _resolve_kv(k, v, k_scale, v_scale, k_global, v_global):
    """Classify K/V: returns ``(k, v, None)`` for native K/V or ``(k, v, (k_scale, v_scale, k_global,
    v_global))`` for packed NVFP4 (uint8 k and v, or ``Nvfp4QuantizedTensor``s)."""
    k, k_scale, k_global = _unpack_quantized("k", k, k_scale, k_global)
    v, v_scale, v_global = _unpack_quantized("v", v, v_scale, v_global)
    check_tensor("k", k)
    check_tensor("v", v)
    named = (("k_scale_128x4", k_scale), ("v_scale_128x4", v_scale), ("k_global_scale", k_global),
             ("v_global_scale", v_global))
    if k.dtype != torch.uint8 and v.dtype != torch.uint8:
        for n, x in named:
            if x is not None:
                raise ValueError(f"{n} is only accepted with packed NVFP4 K/V (uint8 k and v), got k/v of dtype "
                                 f"{k.dtype} / {v.dtype}")
        return k, v, None
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
    for n, x in named[:2]:
        if x is None:
            raise ValueError(f"k and v are uint8 (packed NVFP4, docs/API.md §5.13): {n} is required")
    return k, v, (k_scale, v_scale, k_global, v_global)


def _check_nvfp4_scale(name, scale, rows):
    check_tensor(name, scale, dtypes=(torch.uint8,))
    if scale.dim() != 2 or scale.shape[1] < NVFP4_SCALE_COLS:
        raise ValueError(f"{name} must be 2-D with at least {NVFP4_SCALE_COLS} columns, got shape "
                         f"{tuple(scale.shape)}")
    need = round_up(rows, 128) * NVFP4_SCALE_COLS
    if scale.numel() < need:
        raise ValueError(f"{name} has {scale.numel()} elements; the 128x4 layout of {rows} rows x "
                         f"{NVFP4_SCALE_COLS} columns needs at least {need}")


def _check_nvfp4_global(name, gs):
    if gs is None:
        return
    check_tensor(name, gs, dtypes=(torch.float32,))
    if gs.numel() < 1:
        raise ValueError(f"{name} must have at least one element")


def _validate_nvfp4(q, k, v, fp4, q2k_indices, page_table, seqused_k, seqlen_q, max_seqlen_k, blk_kv):
    """docs/API.md §5.1 checks with the packed NVFP4 K/V rules of §5.13 (paged layout, head dim 128)."""
    k_scale, v_scale, k_global, v_global = fp4
    check_tensor("q", q, ndim=3)
    check_tensor("q", q, dtypes=_NVFP4_Q_DTYPES)
    check_head_dim("q", q.shape[2], (HEAD_DIM,))
    _validate_paged_kv(k, v)
    if k.shape[3] != NVFP4_PACKED_DIM:
        raise ValueError(f"packed NVFP4 k/v: last dim must be {NVFP4_PACKED_DIM} bytes (head dim {HEAD_DIM}), "
                         f"got {k.shape[3]}")
    _validate_page_size(k, blk_kv)
    rows = k.shape[0] * k.shape[1] * k.shape[2]
    _check_nvfp4_scale("k_scale_128x4", k_scale, rows)
    _check_nvfp4_scale("v_scale_128x4", v_scale, rows)
    _check_nvfp4_global("k_global_scale", k_global)
    _check_nvfp4_global("v_global_scale", v_global)
    _validate_rows(q, k.shape[1], q2k_indices, page_table, seqused_k, seqlen_q, max_seqlen_k)
    check_devices([("q", q), ("k", k), ("v", v), ("k_scale_128x4", k_scale), ("v_scale_128x4", v_scale),
                   ("k_global_scale", k_global), ("v_global_scale", v_global), ("q2k_indices", q2k_indices),
                   ("page_table", page_table), ("seqused_k", seqused_k)])


def _nvfp4_kernel_args(fp4):
    """Scales as flat row-major byte buffers (a view when contiguous; other strides: a copy per call)."""
    k_scale, v_scale, k_global, v_global = fp4
    return k_scale.reshape(-1), v_scale.reshape(-1), k_global, v_global


def _dense_hint(page_table, max_seqlen_k):
    return min(page_table.shape[1], -(-max_seqlen_k // BLK_KV))


# ------------------------------------------------------------------------------------------------
# docs/API.md §5.1 sparse_decode_atten_func
# ------------------------------------------------------------------------------------------------


def sparse_decode_atten_func(q, k, v, q2k_indices=None, *, page_table, seqused_k, seqlen_q, max_seqlen_k, blk_kv=128,
                             causal=True, softmax_scale=None, return_softmax_lse=False, schedule=None, O_partial=None,
                             LSE_partial=None, k_scale_128x4=None, v_scale_128x4=None, k_global_scale=None,
                             v_global_scale=None):
    """Sparse (or dense, ``q2k_indices=None``) decode over a paged HND KV cache.

    q [B*seqlen_q, Hq, 128]; k, v [num_pages, Hkv, 128, 128] (any strides, read in place);
    q2k_indices int32 [Hkv, B*seqlen_q, topK] (1 <= topK <= 64) or None; page_table int32 [B, max_pages];
    seqused_k int32 [B]. Returns out [B*seqlen_q, Hq, 128] (q's dtype, bf16 for fp8 q) and, if
    ``return_softmax_lse``, fp32 lse [B*seqlen_q, Hq]. ``schedule``, ``O_partial``, ``LSE_partial``
    are accepted and ignored. No host synchronisation.

    NVFP4 K/V (package extension, conventions of docs/API.md §5.13): ``k``, ``v`` uint8 packed E2M1
    ``[num_pages, Hkv, 128, 64]`` (any strides) with ``k_scale_128x4`` / ``v_scale_128x4`` uint8 2-D
    128x4-swizzled E4M3 scales (read as logical row-major flat buffers with C = 8, at least
    ``round_up(num_pages*Hkv*128, 128) x 8`` elements; scale row of (page, head h, slot s) is
    ``(page*Hkv + h)*128 + s``) and optional ``k_global_scale`` / ``v_global_scale`` fp32 tensors
    (element 0, read on the device; None = 1.0). ``k`` / ``v`` may instead be ``Nvfp4QuantizedTensor``s
    (e.g. from ``quantize_kv_bf16_to_nvfp4_128x4(k_cache, v_cache)``), which carry their scales (passing
    scales as well is a ValueError). The result is attention over ``K = e2m1(k)*E4M3(k_scale)*k_global``
    (same for V), LSE included; dequantisation is fused into the kernel (bf16 K/V are never
    materialised). Scales with non-uint8 k/v, or uint8 k/v without scales: ValueError naming the
    argument; other errors as docs/API.md §5.13's table.
    """
    if (k_scale_128x4 is None and v_scale_128x4 is None and k_global_scale is None and v_global_scale is None
            and eager() and not tuning.active()):
        try:
            key = ("official", tensor_key(q), tensor_key(k), tensor_key(v), tensor_key(q2k_indices),
                   tensor_key(page_table), tensor_key(seqused_k),
                   _host_key(seqlen_q, max_seqlen_k, blk_kv, causal, softmax_scale, return_softmax_lse))
            ent = _SIG.get(key)
        except (AttributeError, TypeError):  # not tensors / unhashable: the checks below name the argument
            key = ent = None
        if ent is None and key is not None and type(k) is torch.Tensor and k.dtype != torch.uint8:
            _validate_official(q, k, v, q2k_indices, page_table, seqused_k, seqlen_q, max_seqlen_k, blk_kv)
            ent = _SIG.put(key, (_plan_for(q, k, q2k_indices, page_table, LAYOUT_HND, BLK_KV, int(seqlen_q),
                                           _dense_hint(page_table, max_seqlen_k)),
                                 default_scale(softmax_scale, HEAD_DIM), {}))
        if ent is not None:
            out, lse = _run_eager(ent[0], ent[2], LAYOUT_HND, q, k, v, q2k_indices, page_table, seqused_k, None, None,
                                  bool(causal), ent[1], bool(return_softmax_lse))
            return (out, lse) if return_softmax_lse else out
    k, v, fp4 = _resolve_kv(k, v, k_scale_128x4, v_scale_128x4, k_global_scale, v_global_scale)
    if fp4 is not None:
        _validate_nvfp4(q, k, v, fp4, q2k_indices, page_table, seqused_k, seqlen_q, max_seqlen_k, blk_kv)
        scale = default_scale(softmax_scale, HEAD_DIM)
        out, lse = _sparse_decode_fwd(q, k, v, q2k_indices, page_table, seqused_k, None, None, LAYOUT_HND, BLK_KV,
                                      int(seqlen_q), bool(causal), scale, _dense_hint(page_table, max_seqlen_k),
                                      bool(return_softmax_lse), *_nvfp4_kernel_args(fp4))
        return (out, lse) if return_softmax_lse else out
    _validate_official(q, k, v, q2k_indices, page_table, seqused_k, seqlen_q, max_seqlen_k, blk_kv)
    scale = default_scale(softmax_scale, HEAD_DIM)
    out, lse = _sparse_decode_fwd(q, k, v, q2k_indices, page_table, seqused_k, None, None, LAYOUT_HND, BLK_KV,
                                  int(seqlen_q), bool(causal), scale, _dense_hint(page_table, max_seqlen_k),
                                  bool(return_softmax_lse))
    if return_softmax_lse:
        return out, lse
    return out


# ------------------------------------------------------------------------------------------------
# docs/API.md §5.2 SparseDecodePagedAttentionWrapper
# ------------------------------------------------------------------------------------------------


class SparseDecodePagedAttentionWrapper:
    """Plan once per decode step (outside graph capture), run per layer (capturable, one launch).

    ``plan`` validates, stores references to ``page_table``, ``seqused_k`` and ``q2k_indices`` (their
    current contents are read by every ``run``) and allocates the split workspaces. ``run(q, k, v)``
    computes exactly ``sparse_decode_atten_func`` with the planned state; ``out=`` / ``lse=`` are
    written in place and returned. A planned wrapper must not run concurrently on two streams.
    """

    def __init__(self, *, blk_kv=128, causal=True):
        self.blk_kv = blk_kv
        self.causal = bool(causal)
        self._planned = False

    def plan(self, *, page_table, seqused_k, seqlen_q, max_seqlen_k, q2k_indices=None, num_qo_heads=None,
             num_kv_heads=None, head_dim=128, enable_cuda_graph=False, max_grid_size=None, fixed_split_size=None,
             disable_split_kv=False):
        b = _validate_paged_meta(page_table, seqused_k, seqlen_q, max_seqlen_k)
        check_devices([("page_table", page_table), ("seqused_k", seqused_k), ("q2k_indices", q2k_indices)])
        for name, val in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if val is None:
                raise ValueError(f"{name} must be given to plan()")
            check_positive_int(name, val)
        check_head_dim("head_dim", head_dim, (HEAD_DIM,))
        _validate_blk_kv(self.blk_kv)
        g = check_gqa(num_qo_heads, num_kv_heads)
        _validate_q2k(q2k_indices, num_kv_heads, b * seqlen_q)
        if max_grid_size is not None:
            check_positive_int("max_grid_size", max_grid_size)
        if fixed_split_size is not None:
            check_positive_int("fixed_split_size", fixed_split_size)

        self.batch = b
        self.num_qo_heads = int(num_qo_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.page_table = page_table
        self.seqused_k = seqused_k
        self.q2k_indices = q2k_indices
        self.seqlen_q = int(seqlen_q)
        self.max_seqlen_k = int(max_seqlen_k)
        self.is_sparse = q2k_indices is not None
        self.enable_cuda_graph = bool(enable_cuda_graph)
        # split hints -> tiles per split (0 = automatic policy); never change results beyond reassociation.
        # The K/V format (native or packed NVFP4, which may use its own tile config) is only known in run():
        # both plans are made here and the workspaces cover both.
        self._max_grid = int(max_grid_size) if max_grid_size is not None else 0
        self._hint_blocks = _dense_hint(page_table, self.max_seqlen_k)
        topk = 0 if q2k_indices is None else q2k_indices.shape[2]
        self._split_override = {}
        self._plans = {}  # K/V format (NVFP4 or not) -> launch plan, for run()'s fast path
        sizes = []
        for fp4 in (False, True):
            kw = dict(B=b, Hkv=self.num_kv_heads, G=g, SQ=self.seqlen_q, D=self.head_dim, BS=BLK_KV, topk=topk,
                      hint_blocks=self._hint_blocks, nvfp4=fp4)
            if disable_split_kv:
                ov = 1 << 30
            elif fixed_split_size is not None:  # fixed_split_size counts KV blocks: convert to BLOCK_N tiles
                ov = int(fixed_split_size) * (BLK_KV // make_plan(page_table.device, **kw).BLOCK_N)
            else:
                ov = 0
            self._split_override[fp4] = ov
            p = make_plan(page_table.device, split_override=ov, max_grid=self._max_grid, **kw)
            self._plans[fp4] = p
            if not fp4:
                self.split_kv = p.num_splits > 1
                self.num_splits = p.num_splits
            sizes.append(workspace_sizes(p))
        no, nml, nc = (max(x) for x in zip(*sizes))
        dev = page_table.device
        self.O_partial = torch.empty(max(no, 1), dtype=torch.float32, device=dev)
        self._ml_partial = torch.empty(max(nml, 1), dtype=torch.float32, device=dev)
        self._counter = torch.zeros(max(nc, 1), dtype=torch.int32, device=dev)
        self._lse_dummy = torch.empty(0, dtype=torch.float32, device=dev)
        self._run_sigs = SignatureCache(64)  # run() signatures validated against this plan
        self._tuning = tuning.current()  # the overrides the plans were made under (run()'s fast path needs them)
        self._planned = True
        return self

    def run(self, q, k, v, *, k_scale_128x4=None, v_scale_128x4=None, k_global_scale=None, v_global_scale=None,
            softmax_scale=None, return_softmax_lse=False, out=None, lse=None):
        """q [B*seqlen_q, Hq, 128]; k, v [num_pages, Hkv, 128, 128]. Returns out (and lse).

        NVFP4 K/V as in ``sparse_decode_atten_func``: uint8 ``k, v [num_pages, Hkv, 128, 64]`` with
        ``k_scale_128x4`` / ``v_scale_128x4`` (and optional fp32 ``k_global_scale`` /
        ``v_global_scale``), or ``Nvfp4QuantizedTensor``s. Still one launch, CUDA-graph capturable.
        """
        if not self._planned:
            raise RuntimeError("decode wrapper must be planned before run")
        key = None
        if (k_scale_128x4 is None and v_scale_128x4 is None and k_global_scale is None and v_global_scale is None
                and eager() and tuning.current() is self._tuning):
            try:
                key = (tensor_key(q), tensor_key(k), tensor_key(v), tensor_key(out), tensor_key(lse),
                       _host_key(softmax_scale, return_softmax_lse))
                ent = self._run_sigs.get(key)
            except (AttributeError, TypeError):
                key = ent = None
            if ent is not None:
                p, scale, slot = ent
                if out is None:
                    out = torch.empty(q.shape, dtype=p[1], device=q.device)
                lse_buf = self._lse_dummy
                if return_softmax_lse:
                    if lse is None:
                        lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device)
                    lse_buf = lse
                launch(p[0], layout=LAYOUT_HND, q=q, k=k, v=v, idx=self.q2k_indices, table=self.page_table,
                       lens=self.seqused_k, slot_ids=None, sink=None, out=out, lse=lse_buf, o_part=self.O_partial,
                       ml_part=self._ml_partial, counter=self._counter, causal=self.causal, scale=scale,
                       write_lse=bool(return_softmax_lse), slot=slot)
                return (out, lse) if return_softmax_lse else out
        k, v, fp4 = _resolve_kv(k, v, k_scale_128x4, v_scale_128x4, k_global_scale, v_global_scale)
        check_tensor("q", q, ndim=3)
        check_tensor("k", k, ndim=4)
        check_tensor("v", v, ndim=4)
        want_q = (self.batch * self.seqlen_q, self.num_qo_heads, self.head_dim)
        if tuple(q.shape) != want_q:
            raise ValueError(f"q must have shape {list(want_q)} (planned), got {tuple(q.shape)}")
        if k.shape[1] != self.num_kv_heads:
            raise ValueError(f"k.shape[1] ({k.shape[1]}) must equal the planned num_kv_heads={self.num_kv_heads}")
        if fp4 is None:
            _validate_official(q, k, v, self.q2k_indices, self.page_table, self.seqused_k, self.seqlen_q,
                               self.max_seqlen_k, self.blk_kv)
            out_dtype = attention_out_dtype(q, k, v)
        else:
            _validate_nvfp4(q, k, v, fp4, self.q2k_indices, self.page_table, self.seqused_k, self.seqlen_q,
                            self.max_seqlen_k, self.blk_kv)
            out_dtype = _out_dtype(q.dtype)
        if out is None:
            out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
        else:
            check_tensor("out", out, dtypes=(out_dtype,))
            check_shape("out", out, tuple(q.shape))
            check_devices([("q", q), ("out", out)])
        if return_softmax_lse:
            if lse is None:
                lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device)
            else:
                check_tensor("lse", lse, dtypes=(torch.float32,))
                check_shape("lse", lse, (q.shape[0], q.shape[1]))
                check_devices([("q", q), ("lse", lse)])
            lse_buf = lse
        else:
            lse_buf = self._lse_dummy
        scale = default_scale(softmax_scale, self.head_dim)
        if fp4 is None and key is not None:  # validated: later runs with this signature skip the checks
            self._run_sigs.put(key, ((self._plans[False], out_dtype), scale, {}))
        fp4_args = () if fp4 is None else _nvfp4_kernel_args(fp4)
        _sparse_decode_fwd_out(q, k, v, self.q2k_indices, self.page_table, self.seqused_k, out, lse_buf,
                               self.O_partial, self._ml_partial, self._counter, self.seqlen_q, self.causal, scale,
                               self._hint_blocks, bool(return_softmax_lse), self._split_override[fp4 is not None],
                               self._max_grid, *fp4_args)
        if return_softmax_lse:
            return out, lse
        return out


# ------------------------------------------------------------------------------------------------
# docs/API.md §6.2 flash_decode_with_gqa_share_sparse
# ------------------------------------------------------------------------------------------------


def _validate_direct(q, sink, k_cache, v_cache, req_to_token, seq_lens, slot_ids, block_size, topk_idx):
    check_tensor("q", q, ndim=3, dtypes=(torch.bfloat16, torch.float16))
    check_tensor("k_cache", k_cache, ndim=3)
    check_tensor("v_cache", v_cache, ndim=3)
    attention_out_dtype(q, k_cache, v_cache, allow_fp8_q=False)
    if tuple(k_cache.shape) != tuple(v_cache.shape):
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    check_head_dim("q", d, DIRECT_HEAD_DIMS)
    if k_cache.shape[2] != d:
        raise ValueError(f"k_cache head dim ({k_cache.shape[2]}) must equal q's ({d})")
    if hkv <= 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k_cache heads ({hkv})")
    check_gqa(hq, hkv, allowed=range(1, DIRECT_MAX_GQA + 1))
    if sink is not None:
        check_tensor("sink", sink, ndim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
        check_shape("sink", sink, (hq, d))
    check_tensor("req_to_token", req_to_token, ndim=2, dtypes=_INT)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=_INT)
    check_tensor("slot_ids", slot_ids, ndim=1, dtypes=_INT)
    check_shape("seq_lens", seq_lens, (b,))
    check_shape("slot_ids", slot_ids, (b,))
    check_tensor("topk_idx", topk_idx, ndim=3, dtypes=_INT)
    if topk_idx.shape[0] != hkv or topk_idx.shape[1] != b or topk_idx.shape[2] < 1:
        raise ValueError(f"topk_idx must have shape [Hkv={hkv}, B={b}, topk>=1], got {tuple(topk_idx.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(f"block_size must be an int power of two in [16, 512], got {block_size!r}")
    if block_size < 16 or block_size > 512 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 512], got {block_size}")
    check_devices([("q", q), ("sink", sink), ("k_cache", k_cache), ("v_cache", v_cache),
                   ("req_to_token", req_to_token), ("seq_lens", seq_lens), ("slot_ids", slot_ids),
                   ("topk_idx", topk_idx)])


def flash_decode_with_gqa_share_sparse(q, sink, k_cache, v_cache, req_to_token, seq_lens, slot_ids, block_size,
                                       topk_idx, sm_scale=None, use_tma=True) -> torch.Tensor:
    """Sparse decode over a token-major cache with ``req_to_token`` indirection (peer layout).

    q [B, Hq, D] bf16/fp16 (D in {64, 128, 256}); sink [Hq, D] or None (denominator only);
    k_cache, v_cache [max_slots, Hkv, D] (q's dtype, or fp8 e4m3 with bf16 q); req_to_token int
    [max_reqs, max_kv_len]; seq_lens, slot_ids int [B]; topk_idx int [Hkv, B, topk].
    Returns o [B, Hq, D] in q's dtype; rows without a valid block are 0. ``use_tma`` is ignored.
    NVFP4 (uint8 / ``Nvfp4QuantizedTensor``) caches are not supported here (MsaUnsupportedError): use
    ``sparse_decode_atten_func`` or ``SparseDecodePagedAttentionWrapper`` (paged HND) for NVFP4 K/V.
    """
    key = ent = None
    try:
        if eager() and not tuning.active():
            key = ("direct", tensor_key(q), tensor_key(sink), tensor_key(k_cache), tensor_key(v_cache),
                   tensor_key(req_to_token), tensor_key(seq_lens), tensor_key(slot_ids), tensor_key(topk_idx),
                   _host_key(block_size, sm_scale))
            ent = _SIG.get(key)
    except (AttributeError, TypeError):
        key = ent = None
    if ent is not None:
        return _run_eager(ent[0], ent[2], LAYOUT_TOKEN, q, k_cache, v_cache, topk_idx, req_to_token, seq_lens, slot_ids,
                          sink, True, ent[1], False)[0]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if isinstance(t, Nvfp4QuantizedTensor) or (isinstance(t, torch.Tensor) and t.dtype == torch.uint8):
            raise MsaUnsupportedError(
                f"flash_decode_with_gqa_share_sparse: NVFP4 (uint8 packed) {name} is not supported; NVFP4 K/V is "
                "supported by sparse_decode_atten_func and SparseDecodePagedAttentionWrapper (paged HND cache)")
    _validate_direct(q, sink, k_cache, v_cache, req_to_token, seq_lens, slot_ids, block_size, topk_idx)
    scale = default_scale(sm_scale, q.shape[2])
    if key is not None:
        p = None if k_cache.shape[0] == 0 or q.shape[0] == 0 else _plan_for(
            q, k_cache, topk_idx, req_to_token, LAYOUT_TOKEN, int(block_size), 1, 0)
        slot = _SIG.put(key, (p, scale, {}))[2]  # key is only set in eager mode
        return _run_eager(p, slot, LAYOUT_TOKEN, q, k_cache, v_cache, topk_idx, req_to_token, seq_lens, slot_ids,
                          sink, True, scale, False)[0]
    out, _ = _sparse_decode_fwd(q, k_cache, v_cache, topk_idx, req_to_token, seq_lens, slot_ids, sink, LAYOUT_TOKEN,
                                int(block_size), 1, True, scale, 0, False)
    return out
