"""FP4 indexer block scores (API.md §5.14, §11.4).

``fp4_indexer_block_scores`` computes, for every query token ``t`` and Q head ``h``, the max over
each 128-token KV block ``j`` of the raw dot products ``<deq(q[t, h]), deq(k[x, h // G])>``
(FP4 E2M1 values times per-group scales; no softmax scale), masked by length, page count and an
optional bottom-right causal limit. Output fp32 ``[Hq, NB, total_q]``, ``NB = ceil(max_seqlen_k/128)``.

Kernel: one program per (request-local tile of ``BLOCK_M`` query tokens, Q head). The program
dequantises its Q tile once (fp32: e2m1 x scale is exact), then walks the request's KV blocks:
dequantise the 128-token page of its KV head, two tf32 ``tl.dot`` (even / odd elements) with fp32
accumulation, mask, row max. Blocks past the request's valid range are written as -inf without
reading any page.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._registry import add_op_namespace_prefix
from ._validate import check_devices, check_host_int, check_tensor, interpreter_active
from .nvfp4 import _e2m1_code_to_f32, _e4m3_code_to_f32

__all__ = ["fp4_indexer_block_scores"]

_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_FP4X2 = getattr(torch, "float4_e2m1fn_x2", None)
_PACKED_DTYPES = tuple(d for d in (torch.uint8, torch.int8, _FP4X2) if d is not None)
_FLOAT_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

FMT_NVFP4, FMT_MXFP4 = 0, 1
SK_E4M3, SK_E8M0, SK_FLOAT = 0, 1, 2


@triton.jit
def _decode_scale(raw, SCALE_KIND: tl.constexpr):
    if SCALE_KIND == 0:
        return _e4m3_code_to_f32(raw.to(tl.int32) & 0xFF)
    elif SCALE_KIND == 1:
        e = raw.to(tl.int32) & 0xFF
        bits = tl.where(e == 0, 0x00400000, e << 23)
        v = bits.to(tl.float32, bitcast=True)
        return tl.where(e == 255, float("nan"), v)
    else:
        return raw.to(tl.float32)


@triton.jit
def _fp4_indexer_kernel(
    q_ptr, k_ptr, qs_ptr, ks_ptr, cu_q_ptr, cu_k_ptr, cu_p_ptr, kvi_ptr, qo_ptr, out_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3,
    qss0, qss1, qss2, kss0, kss1, kss2, kss3,
    total_q, total_pages, n_kvi, Hkv, G, NB, n_mtiles, q_l_stride, q_rg,
    GS: tl.constexpr, SCALE_KIND: tl.constexpr, PREORDERED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_QO: tl.constexpr, BLOCK_M: tl.constexpr, USE_TF32: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = pid // n_mtiles
    mt = pid % n_mtiles
    q_start = tl.load(cu_q_ptr + b)
    Lq = tl.load(cu_q_ptr + b + 1) - q_start
    if mt * BLOCK_M < Lq:
        g = h // G
        Lk = tl.load(cu_k_ptr + b + 1) - tl.load(cu_k_ptr + b)
        p_start = tl.load(cu_p_ptr + b)
        n_pages = tl.load(cu_p_ptr + b + 1) - p_start
        nb = tl.minimum(tl.minimum((Lk + 127) // 128, n_pages), NB)
        nb = tl.maximum(nb, 0)
        if HAS_QO:
            off = tl.load(qo_ptr + b)
        else:
            off = Lk - Lq

        ii = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = ii < Lq
        t = q_start + ii
        row_ok = row_ok & (t < total_q)
        t64 = t.to(tl.int64)
        kb = tl.arange(0, 64)  # packed byte index: elements 2kb (lo) and 2kb+1 (hi)
        grp = (2 * kb) // GS   # scale group of both elements of byte kb
        qm = row_ok[:, None]
        qbytes = tl.load(q_ptr + t64[:, None] * sq0 + h * sq1 + kb[None, :] * sq2, mask=qm, other=0)
        qbytes = qbytes.to(tl.int32) & 0xFF
        if PREORDERED:
            tq = t64[:, None]
            qsoff = (h * q_l_stride + (tq // 128) * (512 * q_rg) + (grp[None, :] // 4) * 512
                     + (tq % 32) * 16 + ((tq % 128) // 32) * 4 + grp[None, :] % 4)
        else:
            qsoff = t64[:, None] * qss0 + h * qss1 + grp[None, :] * qss2
        qsc = _decode_scale(tl.load(qs_ptr + qsoff, mask=qm, other=0), SCALE_KIND)
        q_lo = _e2m1_code_to_f32(qbytes & 15) * qsc
        q_hi = _e2m1_code_to_f32(qbytes >> 4) * qsc

        i_last = tl.minimum(mt * BLOCK_M + BLOCK_M, Lq) - 1
        nb_c = nb
        if CAUSAL:
            nb_c = tl.minimum(nb, tl.maximum((i_last + off + 128) // 128, 0))
        ss = tl.arange(0, 128)
        out_row = out_ptr + h.to(tl.int64) * NB * total_q + t64
        for j in range(0, nb_c):
            pidx = p_start + j
            page = tl.load(kvi_ptr + pidx, mask=(pidx >= 0) & (pidx < n_kvi), other=-1).to(tl.int64)
            page_ok = (page >= 0) & (page < total_pages)
            page_c = tl.where(page_ok, page, 0)
            kbase = k_ptr + page_c * sk0 + g * sk1
            # a [128, 1] mask, not the scalar page_ok: Triton 3.9's interpreter rejects scalar masks of tiles
            pmask = tl.where(page_ok, ss[:, None] >= 0, False)
            kbytes = tl.load(kbase + ss[:, None] * sk2 + kb[None, :] * sk3, mask=pmask, other=0)
            kbytes = kbytes.to(tl.int32) & 0xFF
            if PREORDERED:
                l_k = page_c * Hkv + g
                ksoff = (l_k * (512 * (((128 // GS) + 3) // 4))
                         + (grp[None, :] // 4) * 512 + (ss[:, None] % 32) * 16 + (ss[:, None] // 32) * 4
                         + grp[None, :] % 4)
            else:
                ksoff = page_c * kss0 + g * kss1 + ss[:, None] * kss2 + grp[None, :] * kss3
            ksc = _decode_scale(tl.load(ks_ptr + ksoff, mask=pmask, other=0), SCALE_KIND)
            k_lo = _e2m1_code_to_f32(kbytes & 15) * ksc
            k_hi = _e2m1_code_to_f32(kbytes >> 4) * ksc
            if USE_TF32:
                s = tl.dot(q_lo, tl.trans(k_lo), input_precision="tf32")
                s = tl.dot(q_hi, tl.trans(k_hi), s, input_precision="tf32")
            else:
                s = tl.dot(q_lo, tl.trans(k_lo), input_precision="ieee")
                s = tl.dot(q_hi, tl.trans(k_hi), s, input_precision="ieee")
            x = j * 128 + ss
            vis = (x[None, :] < Lk) & page_ok
            if CAUSAL:
                vis = vis & (x[None, :] <= (ii[:, None] + off))
            s = tl.where(vis, s, float("-inf"))
            m = tl.max(s, axis=1)
            tl.store(out_row + j * total_q, m, mask=row_ok)
        neg = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for j in range(nb_c, NB):
            tl.store(out_row + j * total_q, neg, mask=row_ok)


@torch.library.custom_op(add_op_namespace_prefix("fp4_indexer_block_scores"), mutates_args=())
def _fp4_indexer_op(q: torch.Tensor, k: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, cu_page_offsets: torch.Tensor,
                    kv_indices: torch.Tensor, qo_offset: Optional[torch.Tensor], max_seqlen_q: int,
                    max_seqlen_k: int, fmt: int, scale_kind: int, preordered: bool, causal: bool) -> torch.Tensor:
    """q uint8 [total_q, Hq, 64], k uint8 [P, Hkv, 128, 64] -> fp32 scores [Hq, NB, total_q]."""
    total_q, Hq = int(q.shape[0]), int(q.shape[1])
    P, Hkv = int(k.shape[0]), int(k.shape[1])
    NB = (max_seqlen_k + 127) // 128
    B = int(cu_seqlens_q.shape[0]) - 1
    out = torch.empty(Hq, NB, total_q, dtype=torch.float32, device=q.device)
    if NB == 0 or total_q == 0 or Hq == 0:
        return out
    if B <= 0 or max_seqlen_q <= 0:
        return out.fill_(float("-inf"))
    G = Hq // Hkv
    GS = 16 if fmt == FMT_NVFP4 else 32
    Gs = 128 // GS
    if q.device.type == "cpu" and scale_kind == SK_FLOAT and q_scale.dtype == torch.bfloat16:
        q_scale, k_scale = q_scale.float(), k_scale.float()
    if q.device.type == "cpu" and scale_kind == SK_FLOAT and k_scale.dtype == torch.bfloat16:
        k_scale = k_scale.float()
    rg = (Gs + 3) // 4
    rmq = (total_q + 127) // 128
    if preordered:
        qss = (0, 0, 0)
        kss = (0, 0, 0, 0)
    else:
        qss = tuple(int(s) for s in q_scale.stride())
        kss = tuple(int(s) for s in k_scale.stride())
    BLOCK_M = 16 if interpreter_active() else _indexer_block_m(max_seqlen_q)
    n_mtiles = triton.cdiv(max_seqlen_q, BLOCK_M)
    grid = (B * n_mtiles, Hq)
    qo = qo_offset if qo_offset is not None else cu_seqlens_q
    _fp4_indexer_kernel[grid](
        q, k, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, kv_indices, qo, out,
        *q.stride(), *k.stride(), *qss, *kss,
        total_q, P, int(kv_indices.shape[0]), Hkv, G, NB, n_mtiles, 512 * rmq * rg, rg,
        GS=GS, SCALE_KIND=scale_kind, PREORDERED=preordered, CAUSAL=causal, HAS_QO=qo_offset is not None,
        BLOCK_M=BLOCK_M, USE_TF32=q.device.type == "cuda",
    )
    return out


@_fp4_indexer_op.register_fake
def _(q, k, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, kv_indices, qo_offset, max_seqlen_q,
      max_seqlen_k, fmt, scale_kind, preordered, causal):
    NB = (max_seqlen_k + 127) // 128
    return q.new_empty((q.shape[1], NB, q.shape[0]), dtype=torch.float32)


def _as_u8(t):
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _check_host_int(name, v):
    check_host_int(name, v)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


def fp4_indexer_block_scores(q_fp4, k_fp4, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, *,
                             max_seqlen_q, max_seqlen_k, kv_indices, fp4_format, causal=False, qo_offset=None,
                             scale_layout="preordered_mma") -> torch.Tensor:
    """FP4 block-max indexer scores (API.md §5.14).

    q_fp4 ``[total_q, Hq, 64]`` and k_fp4 ``[total_pages, Hkv, 128, 64]``: packed E2M1 (uint8/int8/
    float4_e2m1fn_x2). ``fp4_format``: "nvfp4" (16-groups, e4m3 scales; alias "e2m1") or "mxfp4"
    (32-groups, e8m0 scales). ``scale_layout``: "public" (``q_scale [total_q, Hq, G_s]``,
    ``k_scale [total_pages, Hkv, 128, G_s]``) or "preordered_mma" (storage
    ``(L, ceil(mn/128), ceil(G_s/4), 32, 4, 4)`` contiguous). ``cu_seqlens_q/k``, ``cu_page_offsets``:
    int32 ``[B+1]``; ``kv_indices``: int32 flattened page table. Returns fp32 ``[Hq, NB, total_q]``,
    ``NB = ceil(max_seqlen_k / 128)``; masked / missing blocks are -inf.
    """
    check_tensor("q_fp4", q_fp4, dtypes=_PACKED_DTYPES)
    check_tensor("k_fp4", k_fp4, dtypes=_PACKED_DTYPES)
    if q_fp4.dim() != 3 or q_fp4.shape[-1] != 64:
        raise ValueError(f"q_fp4 must be [total_q, Hq, 64], got {tuple(q_fp4.shape)}")
    if k_fp4.dim() != 4 or k_fp4.shape[-1] != 64 or k_fp4.shape[2] != 128:
        raise ValueError(f"k_fp4 must be [total_pages, Hkv, 128, 64], got {tuple(k_fp4.shape)}")
    total_q, Hq = int(q_fp4.shape[0]), int(q_fp4.shape[1])
    P, Hkv = int(k_fp4.shape[0]), int(k_fp4.shape[1])
    if Hkv <= 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    if not isinstance(fp4_format, str) or fp4_format.lower() not in ("nvfp4", "mxfp4", "e2m1"):
        raise ValueError(f"format must be one of ['mxfp4', 'nvfp4'] (or the alias 'e2m1'), got {fp4_format!r}")
    fmt = FMT_MXFP4 if fp4_format.lower() == "mxfp4" else FMT_NVFP4
    Gs = 4 if fmt == FMT_MXFP4 else 8
    f8 = _E8M0 if fmt == FMT_MXFP4 else torch.float8_e4m3fn
    if scale_layout not in ("public", "preordered_mma"):
        raise ValueError(f"scale_layout must be 'public' or 'preordered_mma', got {scale_layout!r}")
    check_tensor("q_scale", q_scale)
    check_tensor("k_scale", k_scale)
    if scale_layout == "public":
        if tuple(q_scale.shape) != (total_q, Hq, Gs):
            raise ValueError(f"q_scale must have shape {(total_q, Hq, Gs)}, got {tuple(q_scale.shape)}")
        if tuple(k_scale.shape) != (P, Hkv, 128, Gs):
            raise ValueError(f"k_scale must have shape {(P, Hkv, 128, Gs)}, got {tuple(k_scale.shape)}")
        allowed = tuple(d for d in (f8,) + _FLOAT_SCALE_DTYPES if d is not None)
        for name, s in (("q_scale", q_scale), ("k_scale", k_scale)):
            if s.dtype not in allowed:
                raise TypeError(f"{name} must have dtype {f8} (or decoded fp32/bf16/fp16), got {s.dtype}")
        if q_scale.dtype != k_scale.dtype:
            raise TypeError(f"q_scale and k_scale must have the same dtype, got {q_scale.dtype} and {k_scale.dtype}")
        if q_scale.dtype in _FLOAT_SCALE_DTYPES:
            scale_kind = SK_FLOAT
        else:
            scale_kind = SK_E8M0 if fmt == FMT_MXFP4 else SK_E4M3
            q_scale, k_scale = _as_u8(q_scale), _as_u8(k_scale)
        preordered = False
    else:
        rg = (Gs + 3) // 4
        for name, s, L, mn in (("q_scale", q_scale, Hq, total_q), ("k_scale", k_scale, P * Hkv, 128)):
            rm = (mn + 127) // 128
            want = (L, rm, rg, 32, 4, 4)
            if tuple(s.shape) != want:
                raise ValueError(f"{name} (preordered_mma) must have storage shape {want}, got {tuple(s.shape)}")
            want_st = (512 * rm * rg, 512 * rg, 512, 16, 4, 1)
            if s.numel() > 0 and any(int(a) != b for a, b, n in zip(s.stride(), want_st, s.shape) if n > 1):
                raise ValueError(f"{name} (preordered_mma) must have strides {want_st}, got {tuple(s.stride())}")
            if s.dtype not in (f8, torch.uint8):
                raise TypeError(f"{name} (preordered_mma) must have dtype {f8}, got {s.dtype}")
        scale_kind = SK_E8M0 if fmt == FMT_MXFP4 else SK_E4M3
        q_scale, k_scale = _as_u8(q_scale), _as_u8(k_scale)
        preordered = True
    cus = (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("cu_page_offsets", cu_page_offsets))
    for name, c in cus:
        check_tensor(name, c, dtypes=(torch.int32,))
        if c.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(c.shape)}")
    if not (cu_seqlens_q.shape == cu_seqlens_k.shape == cu_page_offsets.shape) or cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q, cu_seqlens_k and cu_page_offsets must have the same shape [B+1]")
    B = int(cu_seqlens_q.shape[0]) - 1
    if not isinstance(kv_indices, torch.Tensor) or kv_indices.dtype != torch.int32 or kv_indices.dim() != 1:
        raise ValueError("kv_indices must be an int32 1-D tensor (the flattened page table)")
    if qo_offset is not None:
        if not causal:
            raise ValueError("qo_offset is only valid when causal=True")
        if not isinstance(qo_offset, torch.Tensor) or qo_offset.dtype != torch.int32 or tuple(qo_offset.shape) != (B,):
            raise ValueError(f"qo_offset must be an int32 tensor of shape [{B}]")
    _check_host_int("max_seqlen_q", max_seqlen_q)
    _check_host_int("max_seqlen_k", max_seqlen_k)
    check_devices([("q_fp4", q_fp4), ("k_fp4", k_fp4), ("q_scale", q_scale), ("k_scale", k_scale),
                   ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                   ("cu_page_offsets", cu_page_offsets), ("kv_indices", kv_indices), ("qo_offset", qo_offset)])
    return _fp4_indexer_op(_as_u8(q_fp4), _as_u8(k_fp4), q_scale, k_scale, cu_seqlens_q, cu_seqlens_k,
                           cu_page_offsets, kv_indices, qo_offset, int(max_seqlen_q), int(max_seqlen_k), fmt,
                           scale_kind, preordered, bool(causal))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions (scripts/aot_check.py; see _aot.py)
# ----------------------------------------------------------------------------------------------

def _indexer_block_m(max_seqlen_q: int) -> int:
    return 16 if max_seqlen_q <= 16 else (32 if max_seqlen_q <= 32 else 64)


def aot_configs(arch: int, full: bool = False):
    """FP4 indexer launch configurations (Triton defaults: 4 warps, 3 stages).

    ``_fp4_indexer_kernel``: BLOCK_M 16/32/64 (from max_seqlen_q), nvfp4 (GS 16, e4m3 scales) / mxfp4 (GS 32,
    e8m0) / decoded float scales, public / preordered layout, causal (+ qo_offset), tf32 dots.
    """
    from ._aot import AotConfig, dedupe, major_of

    out = []
    bms = sorted({_indexer_block_m(s) for s in (1, 16, 17, 32, 33, 4096)})
    variants = []  # (GS, scale kind, scale pointer type, preordered)
    for gs, sk in ((16, SK_E4M3), (32, SK_E8M0)):
        variants += [(gs, sk, "*u8", False), (gs, sk, "*u8", True)]
        variants += [(gs, SK_FLOAT, t, False) for t in ("*fp32", "*bf16", "*fp16")]
    cflags = [(False, False), (True, False), (True, True)]
    if not full:
        variants = [(16, SK_E4M3, "*u8", True), (32, SK_E8M0, "*u8", False), (16, SK_FLOAT, "*fp32", False)]
        cflags = [(True, True)]
    for bm in bms:
        for gs, sk, st, pre in (variants if (full or bm == 64) else variants[:1]):
            for causal, qo in cflags:
                args = dict(q_ptr="*u8", k_ptr="*u8", qs_ptr=st, ks_ptr=st, cu_q_ptr="*i32", cu_k_ptr="*i32",
                            cu_p_ptr="*i32", kvi_ptr="*i32", qo_ptr="*i32", out_ptr="*fp32",
                            sq0="i32:D", sq1="i32:D", sq2=1, sk0="i32:D", sk1="i32:D", sk2="i32:D", sk3=1,
                            qss0="i32:D" if not pre else "i32:D", qss1="i32" if not pre else "i32:D",
                            qss2=1 if not pre else "i32:D", kss0="i32:D", kss1="i32", kss2="i32", kss3=1 if not pre else "i32:D",
                            total_q="i32", total_pages="i32", n_kvi="i32", Hkv="i32", G="i32", NB="i32", n_mtiles="i32",
                            q_l_stride="i32:D", q_rg="i32",
                            GS=gs, SCALE_KIND=sk, PREORDERED=pre, CAUSAL=causal, HAS_QO=qo, BLOCK_M=bm, USE_TF32=True)
                out.append(AotConfig(_fp4_indexer_kernel, args, 4, 3,
                                     f"fp4idx M{bm} GS{gs} sk{sk}{st[1:]} pre{int(pre)} c{int(causal)}qo{int(qo)}"))
    return dedupe(out)
