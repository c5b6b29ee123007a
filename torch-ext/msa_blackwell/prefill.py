"""``sparse_atten_func``: block-sparse varlen prefill over a KV-major CSR (API.md section 5.5).

Shapes: ``q [total_q, Hq, 128]``; dense ``k, v [total_k, Hkv, 128]`` or paged HND
``k, v [num_pages, Hkv, 128, 128]`` with ``page_table int32 [B, max_pages]`` (+ ``seqused_k int32 [B]``);
CSR ``k2q_row_ptr int32 [Hkv, T+1]``, ``k2q_q_indices int32 [Hkv, >= total_q*topK]``.
Returns ``O [total_q, Hq, 128]`` (+ fp32 ``LSE [total_q, Hq]``, + ``LSE_T``).

Design (query-outer, one Triton kernel family; no host sync, graph-capturable):

1. **CSR inversion** (``csr.invert_csr_slots``, two small Triton kernels): row -> (request, block)
   map recomputed from ``cu_seqlens_k`` (level-major), then every row segment is walked and its block id
   is inserted into the per-(KV head, token) slot set ``slots [Hkv, total_q, CAP]``
   (``CAP = next_pow2(2*topK)``) with a lock-free CAS open-addressing set. This realises the set
   semantics of 5.5 (repeated (row, q) pairs once, entries outside ``[0, Lq_b)`` ignored, row pointers
   clamped) independently of the CSR's order. The slot *set* is deterministic (only positions depend
   on atomics order), and the attention kernel only uses the set. The same launch writes ``info [3, B+1]``:
   per request its query-row window and owned rows (``csr._request_window``, docs/POLICIES.md): for a
   non-decreasing ``cu_seqlens_q`` window ``b`` is ``[cu_q[b], cu_q[b+1])`` clamped into ``[0, total_q]``,
   except that window 0 starts at row 0 and a last window ``B`` (no request) runs to ``total_q``.
2. **Attention** (``_prefill_fwd_kernel``): one program per (tile of ``BMT`` consecutive query rows of
   one window, KV head ``g``); the ``G`` query heads of the group are folded into the MMA M dimension
   (``M = BMT*G`` rows, 64..128 on GPU), so one K/V block load feeds all heads of the group. Tiles never
   straddle windows: window ``b = [W_b, W_b+1)`` takes tiles ``[s_b, s_b + cdiv(W_b+1 - W_b, BMT))`` with
   ``s_b = (W_b + b*(BMT-1)) // BMT`` (disjoint, computed in-kernel by binary search; the grid is
   ``(total_q + B*(BMT-1)) // BMT + 1`` tiles, a host-shape bound, which also covers window ``B``). The
   windows partition ``[0, total_q)``, so every output row is written exactly once by the kernel, for any
   ``cu_seqlens_q``: rows the window's request does not own (before ``cu_q[0]``, after ``cu_q[B]``, or
   another request's under a decreasing ``cu_seqlens_q``) select no block and get O = 0, LSE = -inf, as
   empty rows do. O / LSE are therefore allocated uninitialised without risk, with no memset pass and no
   host sync; the cost is a few scalar loads per program and, for rows outside the requests, tiles that
   only store zeros. The program iterates over the
   **union** of the tile tokens' valid blocks in ascending order (ids already filtered by length,
   page bound and the block-level causal limit). The prologue builds that union once: the ``[BMT, CAP]`` id tile is sorted (``tl.sort``), the
   first of every run is kept (segmented scan) and compacted into a per-program scratch row
   (``ulist``, ``n_u`` entries written). The main loop is then a plain counted loop over
   ``(block, BNS-token sub-block)`` steps whose block id is a load from that row, so the software
   pipeliner can issue the K/V loads of the next step early (the former loop found each block with a
   cross-warp min-reduction over the id tile, carried from one iteration to the next). Every step loads
   its ``[BNS, 128]`` K/V sub-block (dense rows or one page, through arbitrary strides, so the permuted
   NHD->HND view is read in place; every load masked), computes ``S = Q K^T`` with ``tl.dot`` (fp32
   accumulate), masks per row by block membership, length, page validity and bottom-right causality,
   and runs an exp2-domain online softmax with fp32 statistics and fp32 ``O`` accumulator. In M3
   neighbouring tokens share almost all blocks, so the union of an 8..64 token tile is ~topK blocks and
   nearly every MMA row does useful work. Tile configs live in a per-compute-capability table
   (``_CFG_SM90``, ``_CFG_SM100`` (the sm_12x tiles: sm_90's spill there), ``_CFG_SM12``); ``MSA_PREFILL_CFG`` overrides them for tuning.

   Measured sweep (H100 80GB HBM3, 2026-11-26, Triton 3.6, M3 shape G = 16, S = 32768, graph replay;
   "bmt,bns,warps,stages,list"): 8,64,8,2,0 (former default, in-loop min) 7979 us / 259 TFLOP/s;
   8,64,8,2,1 8668 us; 8,128,8,2,1 7896 us; 8,64,8,3,1 7898 us; **8,128,8,3,1 7471 us / 277 TFLOP/s**;
   4,128,4,2,1 11042 us; 16,64,8,2,1 9565 us. At S = 131072: 33802 us (former) -> 31228 us / 271
   TFLOP/s. So sm_90 uses whole 128-token K/V steps with 3 stages for M = 128 (M = 64 tiles keep
   128/4 warps/2 stages, unmeasured); M = 64 (4 tokens) halves the K/V reuse and M = 256 spills. With
   64-token sub-blocks the list loop alone was slower than the former loop; its gain shows with 3-stage
   128-token steps (the former loop at 8,128,8,3 was not measured).

   Why query-outer rather than KV-outer over the CSR: a KV-outer kernel must merge per-row partial
   results of one query (topK partials per (token, head)) through memory or atomics; query-outer keeps
   the softmax in registers, needs no partials at all (``partial_dtype`` is moot: all statistics are
   fp32), and is deterministic.

Precision: bf16/fp16 Q/K/V feed ``tl.dot`` directly; fp8 K/V (and fp8 Q) are widened exactly to bf16
in registers (so bf16 Q + fp8 K/V equals the bf16 call on ``k.to(bf16)``). P is rounded to the
compute dtype (bf16/fp16) before PV. LSE is natural-log fp32; empty rows give O = 0 and LSE = -inf.

NVFP4 K/V (``sparse_atten_nvfp4_kv_func``, API.md 5.13): the same kernel with the constexpr ``KV_FMT=1``
(the native path, ``KV_FMT=0``, is generated exactly as before). K/V are packed E2M1 bytes (dense
``[total_k, Hkv, 64]`` / paged ``[num_pages, Hkv, 128, 64]``, any strides) with 128x4-swizzled E4M3 scale
buffers ``KS``/``VS``; where the element path loads a ``[BNS, 128]`` K or V sub-block, ``nvfp4_tile_f16`` reads the
packed bytes and the scales of those rows (scale row ``t*Hkv + h`` dense, ``(page*Hkv + h)*128 + s`` paged)
and returns fp16 ``e2m1*scale/128`` (exact; E2M1 nibbles placed bit-wise into fp16 and one f16x2 scale multiply,
inline PTX on GPUs (``FP4_DEC``, ``MSA_PREFILL_FP4_DEC=0`` = portable Triton decoder), so the MMAs run in fp16: Q
is rescaled per row by a power of two into fp16 (bf16/fp8 Q), the per-row factor, the 128 and k_global multiply
the logits, P is fp16, O gets 128*v_global), so no dequantised K/V ever exists in
memory. The global scales are read from device pointers: ``k_global`` multiplies ``qk_scale``/``tau_scale``
(``HAS_KG``), ``v_global`` the normalised output (``HAS_VG``); absent = 1.0. Tiles: ``_CFG_NVFP4_SM*``
(the arch's tiles with smaller K/V sub-blocks, since the dequantised sub-block lives in registers).
"""

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._registry import add_op_namespace_prefix
from ._validate import (FP8, attention_out_dtype, check_devices, check_gqa, check_head_dim, check_tensor,
                        default_scale, interpreter_active)
from .csr import KV_BLOCK, check_cu_seqlens, invert_csr_slots, slot_capacity
from .errors import MsaUnsupportedError
from .nvfp4_tile import FP4_DEC_ASM, FP4_DEC_PORTABLE, FP4_POW2, nvfp4_q_f16, nvfp4_tile, nvfp4_tile_f16

# NVFP4 tile path of the prefill kernel (constexpr FP4_DEC): FP4_DEC_TILE32 (default) = ``nvfp4_tile``, fp32
# decode to the compute dtype (bf16/fp16 MMAs; measured on the H100 with Triton 3.6). 0 / 1 = the fp16-tile
# variant (``nvfp4_tile_f16``, portable / inline-PTX decoder, MSA_PREFILL_FP4_DEC=0|1): compiles with
# Triton 3.8 but Triton 3.6 fails in TritonGPUOptimizeDotOperands on it, so it is opt-in only.
FP4_DEC_TILE32 = tl.constexpr(2)
FP4_DEC_DEFAULT = 2

__all__ = ["sparse_atten_func"]

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_sub_block(q, acc, m_i, l_i, m2, l2, sel, cur, cn, K, V, KS, VS, PT, b, g, nkv, d, ks, lk, lim_r, total_k,
                      num_pages, sk_0, sk_1, sk_2, sk_3, sv_0, sv_1, sv_2, sv_3, spt_b, spt_p, qk_scale, tau_ratio,
                      CAUSAL: tl.constexpr, PAGED: tl.constexpr, HAS_TAU: tl.constexpr, CDT: tl.constexpr,
                      KV_FMT: tl.constexpr, BNS: tl.constexpr, D: tl.constexpr, FP4_DEC: tl.constexpr):
    """One [BNS]-token sub-block (columns ``cn``) of block ``cur``: masked QK^T, online softmax, PV.

    KV_FMT 0: K/V are [.., D] element tensors (bf16/fp16/fp8, widened to CDT). KV_FMT 1: K/V are packed
    NVFP4 bytes [.., D/2] with 128x4-swizzled scales KS/VS, read by ``nvfp4_tile_f16`` as fp16 tiles
    ``e2m1*scale/FP4_POW2`` (exact; decoder ``FP4_DEC``); q is then fp16 (``nvfp4_q_f16``), ``qk_scale`` is
    a per-row ``[M, 1]`` factor that holds the q rescale, FP4_POW2 and k_global, P is fp16 for
    PV, and the caller multiplies O by FP4_POW2 * v_global.
    """
    x = cur * 128 + cn
    col_ok = x < lk
    if PAGED:
        page = tl.load(PT + b.to(tl.int64) * spt_b + cur.to(tl.int64) * spt_p)
        pg_ok = (page >= 0) & (page < num_pages)
        pg = tl.where(pg_ok, page, 0).to(tl.int64)
        col_ok = tl.where(pg_ok, col_ok, False)  # not `&`: Triton 3.9's interpreter rejects scalar & vector masks
        if KV_FMT == 1:
            kbo = pg * sk_0 + g * sk_1 + cn.to(tl.int64) * sk_2
            vbo = pg * sv_0 + g * sv_1 + cn.to(tl.int64) * sv_2
            srow = (pg * nkv + g) * 128 + cn.to(tl.int64)  # paged scale row (page*Hkv + h)*128 + s
        else:
            kp = K + pg * sk_0 + g * sk_1 + cn.to(tl.int64)[:, None] * sk_2 + d[None, :] * sk_3
            vp = V + pg * sv_0 + g * sv_1 + cn.to(tl.int64)[:, None] * sv_2 + d[None, :] * sv_3
    else:
        xg = (ks + x).to(tl.int64)
        col_ok = col_ok & (xg >= 0) & (xg < total_k)
        if KV_FMT == 1:
            kbo = xg * sk_0 + g * sk_1
            vbo = xg * sv_0 + g * sv_1
            srow = xg * nkv + g  # dense scale row t*Hkv + h
        else:
            kp = K + xg[:, None] * sk_0 + g * sk_1 + d[None, :] * sk_2
            vp = V + xg[:, None] * sv_0 + g * sv_1 + d[None, :] * sv_2
    if KV_FMT == 1:
        skd = sk_3 if PAGED else sk_2
        if FP4_DEC == FP4_DEC_TILE32:
            k = nvfp4_tile(K, KS, kbo, srow, col_ok, skd, BNS, D, CDT)
        else:
            k = nvfp4_tile_f16(K, KS, kbo, srow, col_ok, skd, BNS, D, FP4_DEC)
    else:
        k = tl.load(kp, mask=col_ok[:, None], other=0.0).to(CDT)
    s = tl.dot(q, tl.trans(k))
    ok = sel[:, None] & col_ok[None, :]
    if CAUSAL:
        ok = ok & (x[None, :] <= lim_r[:, None])
    s2 = tl.where(ok, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    if HAS_TAU:
        # temperature statistics from s2 (s * scale / tau = s2 * tau_ratio, tau_ratio = 1/tau > 0 keeps -inf),
        # before P: the raw S tile is dead here, so no second [M, BNS] fp32 tile is live in the loop
        s3 = s2 * tau_ratio
        m2n = tl.maximum(m2, tl.max(s3, 1))
        m2s = tl.where(m2n == float("-inf"), 0.0, m2n)
        l2 = l2 * tl.exp2(m2 - m2s) + tl.sum(tl.exp2(s3 - m2s[:, None]), 1)
        m2 = m2n
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_FMT == 1:
        svd = sv_3 if PAGED else sv_2
        if FP4_DEC == FP4_DEC_TILE32:
            vv = nvfp4_tile(V, VS, vbo, srow, col_ok, svd, BNS, D, CDT)
            acc = acc * alpha[:, None] + tl.dot(p.to(CDT), vv)
        else:
            vv = nvfp4_tile_f16(V, VS, vbo, srow, col_ok, svd, BNS, D, FP4_DEC)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), vv)
    else:
        vv = tl.load(vp, mask=col_ok[:, None], other=0.0).to(CDT)
        acc = acc * alpha[:, None] + tl.dot(p.to(CDT), vv)
    return m_new, l_i, acc, m2, l2


@triton.jit
def _min_id_or_bits(ia, ba, ib, bb):
    # (id, token bitmask) monoid: keep the smaller id and OR the masks of the entries carrying it
    # (commutative and associative, so the scan direction / operand order does not matter)
    m = tl.minimum(ia, ib)
    return m, tl.where(ia == m, ba, 0) | tl.where(ib == m, bb, 0)


@triton.jit
def _keep_run_start(a, b):
    # packed (value << 16) | position, sorted by value: keep the left element while the value is unchanged
    return tl.where((a >> 16) == (b >> 16), a, b)


@triton.jit
def _prefill_fwd_kernel(
    Q, K, V, O, LSE, LSET, SLOTS, INFO, CUQ, CUK, PT, SEQU, ULIST, KS, VS, KG, VG,
    sq_t, sq_h, sq_d,
    sk_0, sk_1, sk_2, sk_3,
    sv_0, sv_1, sv_2, sv_3,
    spt_b, spt_p,
    total_q, total_k, num_pages, max_pages, B, niter, Hq,
    qk_scale, tau_scale,
    CAUSAL: tl.constexpr, PAGED: tl.constexpr, HAS_SEQU: tl.constexpr, HAS_TAU: tl.constexpr,
    BMT: tl.constexpr, G: tl.constexpr, CAP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
    BNS: tl.constexpr, LIST: tl.constexpr,
    KV_FMT: tl.constexpr, HAS_KG: tl.constexpr, HAS_VG: tl.constexpr, FP4_DEC: tl.constexpr,
):
    M: tl.constexpr = BMT * G
    BIG: tl.constexpr = 1 << 30
    LN2: tl.constexpr = 0.6931471805599453
    CDT = O.dtype.element_ty
    pid = tl.program_id(0)
    g = tl.program_id(1)
    nkv = tl.num_programs(1)
    tau_ratio = tau_scale / qk_scale  # = 1/tau: temperature logits are s2 * tau_ratio (see _attend_sub_block)
    if HAS_KG:  # NVFP4 K global scale, folded into the logit scales (read on the device: no host sync)
        kgs = tl.load(KG)
        qk_scale = qk_scale * kgs

    # ---- tile -> (window b, first row) ---------------------------------------------------------
    # Window b = rows [W[b], W[b+1]) (W = INFO[0], non-decreasing, W[0] = 0, W[B+1] := total_q; csr.
    # _request_window): every row of [0, total_q) lies in exactly one window, request b's owned rows
    # [INFO[1, b], INFO[2, b]) in window b (window B owns none). Window b takes the tiles [s_b, s_b +
    # cdiv(W[b+1] - W[b], BMT)), s_b = (W[b] + b*(BMT-1)) // BMT (disjoint; the last one ends below
    # n_tiles). Every row of a window is stored by its tile; rows the request does not own (outside
    # cu_seqlens_q, or another request's under a decreasing cu_seqlens_q) select no block, so they get
    # O = 0 and LSE = -inf: no output row is left unwritten and none is written twice.
    lo = pid * 0
    hi = lo + B
    for _ in range(niter):
        act = lo < hi
        mid = (lo + hi + 1) // 2
        wm = tl.load(INFO + mid)
        ok = (wm + mid * (BMT - 1)) // BMT <= pid
        lo = tl.where(act & ok, mid, lo)
        hi = tl.where(act & (~ok), mid - 1, hi)
    b = lo
    w0 = tl.load(INFO + b)
    w1 = tl.load(INFO + b + 1, mask=b < B, other=total_q)
    own_lo = tl.load(INFO + (B + 1) + b)
    own_hi = tl.load(INFO + 2 * (B + 1) + b)
    r0 = w0 + (pid - (w0 + b * (BMT - 1)) // BMT) * BMT  # first row of the tile
    bc = tl.minimum(b, B - 1)  # window B (no request): any valid index, nothing is owned
    qs = tl.load(CUQ + bc)
    lq = tl.load(CUQ + bc + 1).to(tl.int64) - qs  # int64: differences of int32 values
    if PAGED:
        if HAS_SEQU:
            lk = tl.load(SEQU + bc).to(tl.int64)
        else:
            lk = (qs.to(tl.int64) * 0 + max_pages) * BN
        ks = qs * 0
    else:
        ks = tl.load(CUK + bc)
        lk = tl.load(CUK + bc + 1).to(tl.int64) - ks
    lk = tl.minimum(tl.maximum(lk, 0), BIG)  # positions x < 2^30 (int32 x = 128*block + c never wraps)
    # causal limit of the tile's token k (row r0 + k, local token r0 + k - qs): r0 - qs + lk - lq + k, taken in
    # int64 as a scalar and clamped so that adding k < BMT stays in int32; then clamped into [-1, BIG]
    # (positions x are in [0, BIG))
    lim0 = tl.minimum(tl.maximum((r0 - qs).to(tl.int64) + lk - lq, -BIG), BIG).to(tl.int32)
    lk = lk.to(tl.int32)
    nb = (lk + BN - 1) // BN
    if PAGED:
        nb = tl.minimum(nb, max_pages)

    if (r0 >= w0) & (r0 < w1):
        # the tile's tokens k in [k_lo, k_hi) are computed (rows the request owns), all k < w1 - r0 stored
        k_lo = tl.maximum(own_lo - r0, 0)
        k_hi = tl.minimum(tl.minimum(own_hi, w1) - r0, BMT)
        r = tl.arange(0, M)
        head = g * G + r % G
        t_r = r0 + r // G
        own_r = (r // G >= k_lo) & (r // G < k_hi)
        lim_r = tl.minimum(tl.maximum(lim0 + r // G, -1), BIG)
        d = tl.arange(0, D)
        cc = tl.arange(0, CAP)

        q = tl.load(Q + t_r.to(tl.int64)[:, None] * sq_t + head.to(tl.int64)[:, None] * sq_h
                    + d.to(tl.int64)[None, :] * sq_d, mask=own_r[:, None], other=0.0).to(CDT)
        qks = qk_scale
        if KV_FMT == 1:
            if FP4_DEC != FP4_DEC_TILE32:  # fp16 MMAs against e2m1*scale/FP4_POW2 tiles; per-row logit factors
                q, qdown = nvfp4_q_f16(q, Q.dtype.element_ty != tl.float16)
                qks = (qdown * FP4_POW2 * qk_scale)[:, None]

        # per-token block ids, filtered by length / page bound / block-level causality (every row of a
        # token - its G heads - shares the token's ids and causal limit)
        kt = tl.arange(0, BMT)
        tok_ok = (kt >= k_lo) & (kt < k_hi)
        stok = (g.to(tl.int64) * total_q + r0 + kt) * CAP
        ids_t = tl.load(SLOTS + stok[:, None] + cc[None, :], mask=tok_ok[:, None], other=-1)
        ok_t = (ids_t >= 0) & (ids_t < nb)
        if CAUSAL:
            lim_t = tl.minimum(tl.maximum(lim0 + kt, -1), BIG)
            ok_t = ok_t & (ids_t * BN <= lim_t[:, None])
        ids_t = tl.where(ok_t, ids_t, BIG)

        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D], tl.float32)
        m2 = tl.full([M], float("-inf"), tl.float32)
        l2 = tl.zeros([M], tl.float32)
        zero = tl.sum(tl.zeros([BMT], tl.int32), axis=0)
        if LIST:
            # ascending distinct block list of the tile, computed once: sort the [BMT*CAP] (id, position)
            # keys, keep the first of every run (segmented scan), and give every distinct block the
            # bitmask of the tile tokens that selected it (reverse segmented OR); both go to a per-program
            # int64 scratch row [ids | masks]. The main loop is then a plain indexed loop over
            # (block, sub-block) whose block id and row mask are two scalar loads, so the pipeliner can
            # prefetch K/V of the next step and no [M, CAP] id tile stays live in registers (it made
            # ptxas spill inside the loop).
            NT: tl.constexpr = BMT * CAP
            pp = tl.arange(0, NT)
            skey = tl.sort((tl.reshape(ids_t, [NT]).to(tl.int64) << 16) | pp.to(tl.int64))
            sv = (skey >> 16).to(tl.int32)
            tokl = (skey & 0xFFFF) // CAP  # tile-local token of each sorted entry (BMT <= 64)
            run = tl.associative_scan((sv.to(tl.int64) << 16) | pp.to(tl.int64), 0, _keep_run_start)
            first = ((run & 0xFFFF).to(tl.int32) == pp) & (sv < BIG)
            rank = tl.cumsum(first.to(tl.int32), axis=0) - 1
            n_u = tl.sum(first.to(tl.int32), axis=0)
            bits = tl.where(sv < BIG, tl.full([NT], 1, tl.int64) << tokl, 0)
            _ids_min, tmask = tl.associative_scan((sv, bits), 0, _min_id_or_bits, reverse=True)
            lbase = ULIST + (pid.to(tl.int64) * tl.num_programs(1) + g) * (2 * NT)
            rk = tl.where(first, rank, 0)
            tl.store(lbase + rk, sv.to(tl.int64), mask=first)
            tl.store(lbase + NT + rk, tmask, mask=first)
            tl.debug_barrier()
            tok_row = (r // G).to(tl.int64)
            NSUB: tl.constexpr = BN // BNS
            for it in range(0, n_u * NSUB):
                u = it // NSUB
                cur = tl.load(lbase + u).to(tl.int32)
                sel = ((tl.load(lbase + NT + u) >> tok_row) & 1) != 0
                hh = it % NSUB
                cn = hh * BNS + tl.arange(0, BNS)
                m_i, l_i, acc, m2, l2 = _attend_sub_block(
                    q, acc, m_i, l_i, m2, l2, sel, cur, cn, K, V, KS, VS, PT, bc, g, nkv, d, ks, lk, lim_r, total_k,
                    num_pages, sk_0, sk_1, sk_2, sk_3, sv_0, sv_1, sv_2, sv_3, spt_b, spt_p, qks, tau_ratio,
                    CAUSAL, PAGED, HAS_TAU, CDT, KV_FMT, BNS, D, FP4_DEC)
        else:
            # number of distinct blocks of the tile (so that the main loop is a `for`), then next-minimum
            srow = (g.to(tl.int64) * total_q + t_r) * CAP
            ids_r = tl.load(SLOTS + srow[:, None] + cc[None, :], mask=own_r[:, None], other=-1)
            ok_r = (ids_r >= 0) & (ids_r < nb)
            if CAUSAL:
                ok_r = ok_r & (ids_r * BN <= lim_r[:, None])
            ids_r = tl.where(ok_r, ids_r, BIG)
            n_u = zero
            cur = zero - 1
            nxt = tl.min(tl.where(ids_t > cur, ids_t, BIG))
            while nxt < BIG:
                n_u += 1
                cur = nxt
                nxt = tl.min(tl.where(ids_t > cur, ids_t, BIG))
            cur = zero - 1
            for _ in range(0, n_u):
                cur = tl.min(tl.where(ids_t > cur, ids_t, BIG))
                sel = tl.max(tl.where(ids_r == cur, 1, 0), axis=1) > 0
                for hh in tl.static_range(BN // BNS):
                    cn = hh * BNS + tl.arange(0, BNS)
                    m_i, l_i, acc, m2, l2 = _attend_sub_block(
                        q, acc, m_i, l_i, m2, l2, sel, cur, cn, K, V, KS, VS, PT, bc, g, nkv, d, ks, lk, lim_r,
                        total_k, num_pages, sk_0, sk_1, sk_2, sk_3, sv_0, sv_1, sv_2, sv_3, spt_b, spt_p, qks,
                        tau_ratio, CAUSAL, PAGED, HAS_TAU, CDT, KV_FMT, BNS, D, FP4_DEC)

        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        o = acc / l_safe[:, None]
        if KV_FMT == 1:  # NVFP4: the V global scale (and the f16 tiles' 1/FP4_POW2), applied once to the output
            if FP4_DEC == FP4_DEC_TILE32:
                if HAS_VG:
                    o = o * tl.load(VG)
            else:
                if HAS_VG:
                    o = o * (tl.load(VG) * FP4_POW2)
                else:
                    o = o * FP4_POW2
            o = tl.where(nonempty[:, None], o, 0.0)  # empty rows stay exactly 0 (even with an inf/NaN v_global)
        # the tile's rows again from scalars (nothing [M]-shaped but the softmax state lives across the loop)
        t_s = r0 + tl.arange(0, M) // G
        row_ok = t_s < w1  # stored rows: the tile's rows of its window (W[b+1] <= total_q)
        orow = t_s.to(tl.int64) * Hq + g * G + tl.arange(0, M) % G
        tl.store(O + orow[:, None] * D + d[None, :], o.to(CDT), mask=row_ok[:, None])
        lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
        tl.store(LSE + orow, lse, mask=row_ok)
        if HAS_TAU:
            l2s = tl.where(l2 > 0, l2, 1.0)
            lset = tl.where(nonempty, (m2 + tl.log2(l2s)) * LN2, float("-inf"))
            tl.store(LSET + orow, lset, mask=row_ok)


# Tile configs per (compute-capability major, G): (tokens per tile BMT, KV sub-block BNS, warps, stages, LIST).
# M = BMT*G MMA rows. sm_90 (H100): see the module docstring for the measured sweep. sm_12x (consumer
# Blackwell, ~99 KB shared memory per block): M = 64 rows, 64-token sub-blocks, 2 stages, i.e. about
# Q 16 KB + 2 x (K 16 KB + V 16 KB) = 80 KB of operand buffers, under the limit.
_TILE_TOKENS = {1: 64, 2: 32, 4: 32, 8: 16, 16: 8}
# sm_90: 64-token KV sub-blocks everywhere: with 128 the [M, 128] fp32 S tile plus O, Q and the softmax state
# exceed 255 registers and ptxas spills inside the MMA loop (scripts/aot_check.py localises it); G = 1
# (BMT 64, a [64 x CAP] id sort in the prologue) takes 8 warps for the same reason.
_CFG_SM90 = {G: ((bmt, 64, 8, 3, True) if bmt * G >= 128 else (bmt, 64, 8 if G == 1 else 4, 2, True))
             for G, bmt in _TILE_TOKENS.items()}
# sm_12x (consumer Blackwell, ~99 KB shared memory per block; mma.sync keeps O in registers): M = 64 rows,
# 64-token sub-blocks, 2 stages, 8 warps (4 warps spill inside the MMA loop). Unmeasured.
_CFG_SM12 = {G: (max(1, 64 // G), 64, 8, 2, True) for G in _TILE_TOKENS}
# sm_10x (datacenter Blackwell): sm_90's M = 128 tiles spill inside the MMA loop there (Triton 3.8, 4-30
# LDL/STL) and 3 stages exceed 227 KB, so it takes the sm_12x tiles (M = 64, 8 warps, 2 stages). Unmeasured.
# G = 1 / 2 with M = 64 still spill there (2-5 LDL/STL, the 64 x CAP id sort of the prologue): M = 32.
_CFG_SM100 = {**_CFG_SM12, 1: (32, 64, 8, 2, True), 2: (16, 64, 8, 2, True)}


def _nvfp4_table(table, bns: int, min_warps: int):
    """NVFP4 K/V (``KV_FMT=1``) tiles: the arch's table (same BMT, stages, LIST) with at most ``bns``-token
    sub-blocks and at least ``min_warps`` warps: the K/V sub-block is dequantised in registers (``[BNS, 128]``
    fp32 before the cast), so the element path's sub-block size spills. Local-memory (spill) instructions
    inside the MMA main loop (scripts/aot_check.py, Triton 3.8 ptxas), paged + seqused_k + tau + causal,
    CAP 32 / 128:

    * sm_90, M = 128 (G 4/8/16): BNS 128: 81 (G16/CAP32), BNS 64: 0-4. M = 64 (G 1/2, 4 warps): BNS 64: 15-48,
      8 warps: 5 (G1).
    * sm_100 (M = 128, 2 stages): BNS 64: 175-261, BNS 32: 0 (G16/CAP32). (The bf16 path: 465 at BNS 128.)
    * sm_12x (M = 64, 4 warps): BNS 64: 35-100, BNS 32: 12 (G16/CAP32), 24-66 (CAP 128). (The bf16 path: 23.)
    With these tables: sm_90 0-5, sm_100 0 (G16/CAP32, G2), 10 (G1), ~70 (G4/G8 at CAP 128). Timing unmeasured.
    """
    return {G: (c[0], min(c[1], bns), max(c[2], min_warps), c[3], c[4]) for G, c in table.items()}


_CFG_NVFP4_SM90 = _nvfp4_table(_CFG_SM90, 64, 8)
_CFG_NVFP4_SM100 = _nvfp4_table(_CFG_SM100, 32, 8)
_CFG_NVFP4_SM12 = _nvfp4_table(_CFG_SM12, 32, 8)


def _launch_config(G: int, device: torch.device, nvfp4: bool = False):
    """(tokens per tile BMT, KV sub-block BNS, num_warps, num_stages, LIST). M = BMT*G MMA rows.

    ``MSA_PREFILL_CFG="bmt,bns,warps,stages[,list]"`` overrides it (tuning only; BMT*G >= 16, BNS | 128;
    ``list`` 1 = precomputed block list loop, 0 = in-loop next-minimum). ``nvfp4``: the packed NVFP4 K/V
    variant (``KV_FMT=1``): ``config_table(major, nvfp4=True)``, overridden by ``MSA_PREFILL_NVFP4_CFG`` (same
    format) instead.
    """
    env = os.environ.get("MSA_PREFILL_NVFP4_CFG" if nvfp4 else "MSA_PREFILL_CFG")
    if env:
        f = [int(x) for x in env.split(",")]
        if (len(f) <= 4 or f[4]) and f[0] > 64:
            raise ValueError("MSA_PREFILL_CFG: the block-list loop keeps a 64-bit token mask per block: BMT <= 64")
        return f[0], f[1], f[2], f[3], bool(f[4]) if len(f) > 4 else True
    if interpreter_active():
        return max(1, 16 // G), 128, 4, 1, True
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 9
    return config_table(major, nvfp4)[G]


def config_table(major: int, nvfp4: bool = False):
    """Per-G tile table used on compute-capability major ``major`` (9: ``_CFG_SM90``, 10: ``_CFG_SM100``, 12: ``_CFG_SM12``;
    ``nvfp4``: the NVFP4-K/V variants ``_CFG_NVFP4_SM*`` derived from them)."""
    if major >= 12:
        return _CFG_NVFP4_SM12 if nvfp4 else _CFG_SM12
    if major == 10:
        return _CFG_NVFP4_SM100 if nvfp4 else _CFG_SM100
    return _CFG_NVFP4_SM90 if nvfp4 else _CFG_SM90


# (q dtype, kv dtype) pairs; output dtype bf16 for fp8 q, else q's (the kernel's compute dtype = O's).
# kv dtype uint8 = packed NVFP4 (KV_FMT=1, scales + global-scale pointers).
_AOT_DTYPES = ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, FP8), (FP8, FP8),
               (torch.bfloat16, torch.uint8), (torch.float16, torch.uint8), (FP8, torch.uint8))


def aot_configs(arch: int, full: bool = False):
    """``AotConfig`` list (see ``_aot``) for ``_prefill_fwd_kernel`` on compute capability ``arch``.

    Tiles from ``config_table(major)`` (NVFP4 K/V: ``config_table(major, nvfp4=True)``), every G in
    ``_TILE_TOKENS``. ``full``: every slot capacity (topK 1..64 -> CAP 2..128) x dtype pair x (causal, paged,
    seqused_k, tau) flags (NVFP4: x global scales both present / both None). CI subset: CAP 128 (the largest: the
    prologue sorts BMT*CAP ids), plus CAP 32 (M3's topK 16) for G = 16; causal + paged + seqused_k + tau on;
    bf16 for every G plus fp8 Q/K/V for the M3 GQA ratio 16; NVFP4 K/V (KV_FMT=1, both global scales) with
    bf16 Q for every G (CAP 128; G = 16: CAP 32), plus fp16 Q and the dense layout (causal, bf16 Q) for
    G = 16 / CAP 32. fp8 Q with NVFP4 K/V is the bf16-Q kernel apart from Q's load (widened to bf16 in
    registers), and None global scales only drop two scalar loads: ``full`` only.
    """
    from ._aot import AotConfig, dedupe, major_of, torch_to_tl_name

    table = config_table(major_of(arch))
    nv_table = config_table(major_of(arch), nvfp4=True)
    caps_all = sorted({slot_capacity(t) for t in range(1, 65)})
    flag_sets = ([(c, pg, sq, tau) for c in (False, True) for pg in (False, True) for sq in ((False, True) if pg else (False,))
                  for tau in (False, True)] if full else [(True, True, True, True)])
    out = []
    for G in table:
        if full:
            dts = _AOT_DTYPES
        else:
            dts = _AOT_DTYPES[:1] + ((_AOT_DTYPES[3],) if G == 16 else ())
        for cap in (caps_all if full else ((32, 128) if G == 16 else (128,))):
            m3 = not full and G == 16 and cap == 32
            nv_ci = ((torch.bfloat16, torch.uint8),) if (G != 16 or m3) else ()
            for qd, kd in dts + ((nv_ci + ((torch.float16, torch.uint8),) if m3 else nv_ci) if not full else ()):
                od = torch.bfloat16 if qd == FP8 else qd
                nv = kd == torch.uint8
                bmt, bns, nw, ns, use_list = (nv_table if nv else table)[G]
                fl = flag_sets
                if m3 and qd == torch.bfloat16 and nv:
                    fl = flag_sets + [(True, False, False, False)]  # + dense NVFP4 K/V (M3 shape)
                for causal, paged, sequ, tau in fl:
                    for gs in (((False, False), (True, True)) if (nv and full) else ((nv, nv),)):
                        args = {n: "i32:D" for n in _prefill_fwd_kernel.arg_names}
                        args.update(Q="*" + torch_to_tl_name(qd), K="*" + torch_to_tl_name(kd),
                                    V="*" + torch_to_tl_name(kd), O="*" + torch_to_tl_name(od), LSE="*fp32",
                                    LSET="*fp32", SLOTS="*i32", INFO="*i32", CUQ="*i32", CUK="*i32", PT="*i32",
                                    SEQU="*i32",
                                    ULIST="*i64", KS="*u8" if nv else "*i32", VS="*u8" if nv else "*i32",
                                    KG="*fp32" if gs[0] else "*i32", VG="*fp32" if gs[1] else "*i32",
                                    sq_d=1, sk_3=1 if paged else "i32:D", sk_2="i32:D" if paged else 1,
                                    sv_3=1 if paged else "i32:D", sv_2="i32:D" if paged else 1, spt_p=1,
                                    total_q="i32", total_k="i32", num_pages="i32", max_pages="i32", B="i32",
                                    niter="i32", qk_scale="fp32", tau_scale="fp32",
                                    CAUSAL=causal, PAGED=paged, HAS_SEQU=sequ, HAS_TAU=tau, BMT=bmt, G=G, CAP=cap,
                                    D=128, BN=KV_BLOCK, BNS=bns, LIST=use_list, KV_FMT=int(nv), HAS_KG=gs[0],
                                    HAS_VG=gs[1], FP4_DEC=FP4_DEC_DEFAULT if nv else 0)
                        label = (f"G{G} BMT{bmt} M{bmt * G} BNS{bns} CAP{cap} list{int(use_list)} "
                                 f"q{torch_to_tl_name(qd)}/kv{'nvfp4' if nv else torch_to_tl_name(kd)} "
                                 f"c{int(causal)}p{int(paged)}u{int(sequ)}t{int(tau)}"
                                 + (f" gs{int(gs[0])}{int(gs[1])}" if nv else ""))
                        out.append(AotConfig(_prefill_fwd_kernel, args, nw, ns, label, hot=True))
    return dedupe(out)


def fp4_decoder(device: torch.device) -> int:
    """``FP4_DEC`` of an NVFP4-K/V launch on ``device``: the inline-PTX decoder on a GPU, the portable one
    under the interpreter. ``MSA_PREFILL_FP4_DEC=0|1`` overrides it on a GPU (A/B; read at each launch)."""
    env = os.environ.get("MSA_PREFILL_FP4_DEC", "")
    if env == "1" and device.type == "cuda":
        return FP4_DEC_ASM
    return FP4_DEC_PORTABLE if env == "0" else FP4_DEC_DEFAULT


def _prefill_launch(q, k, v, row_ptr, q_idx, cu_q, cu_k, page_table, seqused_k, topk, causal, scale, tau,
                    with_tau, out_dtype, nvfp4=None):
    """Allocate O / LSE / LSE_T, invert the CSR and launch ``_prefill_fwd_kernel``.

    ``nvfp4``: ``None`` for element K/V (``[.., 128]``), or ``(k_scale, v_scale, k_global, v_global)`` for
    packed NVFP4 K/V (``[.., 64]`` uint8; scales uint8 128x4-swizzled, contiguous; globals fp32 tensors
    (element 0) or ``None``): the kernel then runs with ``KV_FMT=1`` and never materialises K/V.
    """
    total_q, hq, d = q.shape
    paged = page_table is not None
    hkv = k.shape[1]
    G = hq // hkv
    batch = cu_q.shape[0] - 1
    out = torch.empty((total_q, hq, d), dtype=out_dtype, device=q.device)
    lse = torch.empty((total_q, hq), dtype=torch.float32, device=q.device)
    lse_t = torch.empty((total_q, hq) if with_tau else (0,), dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse, lse_t
    if batch == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        lse_t.fill_(float("-inf"))
        return out, lse, lse_t
    cu_q = cu_q.contiguous()
    cu_k = cu_k.contiguous()
    cap = slot_capacity(topk)
    # slots: per-(KV head, token) block sets; info: the query-row windows / owned rows of every request
    # (the kernel writes every output row, so O / LSE need no initialisation pass)
    slots, info = invert_csr_slots(row_ptr, q_idx, cu_q, cu_k, total_q, cap)
    bmt, bns, nw, ns, use_list = _launch_config(G, q.device, nvfp4 is not None)
    n_tiles = (total_q + batch * (bmt - 1)) // bmt + 1
    # per-program scratch for the ascending block list of the tile (only the first n_u entries are written)
    # (ids then token masks, int64: 2 * BMT*CAP entries per (tile, KV head); only the first n_u of each are written)
    ulist = torch.empty((n_tiles * hkv * 2 * bmt * cap) if use_list else 1, dtype=torch.int64, device=q.device)
    if paged:
        sk = k.stride()
        sv = v.stride()
        spt = page_table.stride()
        num_pages, max_pages = k.shape[0], page_table.shape[1]
        total_k = 0
    else:
        sk = k.stride() + (0,)
        sv = v.stride() + (0,)
        spt = (0, 0)
        num_pages, max_pages = 0, 0
        total_k = k.shape[0]
    dummy = cu_q
    if nvfp4 is None:
        kv_fmt, ksc, vsc, kgs, vgs = 0, dummy, dummy, dummy, dummy
    else:
        kv_fmt, (ksc, vsc, kgs, vgs) = 1, nvfp4
    _prefill_fwd_kernel[(n_tiles, hkv)](
        q, k, v, out, lse, lse_t if with_tau else lse, slots, info, cu_q, cu_k,
        page_table if paged else dummy, seqused_k if seqused_k is not None else dummy, ulist,
        ksc, vsc, kgs if kgs is not None else dummy, vgs if vgs is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2),
        sk[0], sk[1], sk[2], sk[3], sv[0], sv[1], sv[2], sv[3], spt[0], spt[1],
        total_q, total_k, num_pages, max_pages, batch, max(1, int(batch).bit_length() + 1), hq,
        scale * _LOG2E, scale * _LOG2E / tau,
        CAUSAL=bool(causal), PAGED=paged, HAS_SEQU=seqused_k is not None, HAS_TAU=bool(with_tau),
        BMT=bmt, G=G, CAP=cap, D=d, BN=KV_BLOCK, BNS=bns, LIST=use_list,
        KV_FMT=kv_fmt, HAS_KG=kv_fmt == 1 and kgs is not None, HAS_VG=kv_fmt == 1 and vgs is not None,
        FP4_DEC=fp4_decoder(q.device) if kv_fmt == 1 else 0,
        num_warps=nw, num_stages=ns,
    )
    return out, lse, lse_t


@torch.library.custom_op(add_op_namespace_prefix("sparse_prefill_fwd"), mutates_args=())
def _sparse_prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k2q_row_ptr: torch.Tensor,
                       k2q_q_indices: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                       page_table: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor], topk: int,
                       causal: bool, softmax_scale: float, tau: float,
                       with_tau: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_dtype = torch.bfloat16 if q.dtype == FP8 else q.dtype
    return _prefill_launch(q, k, v, k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k, page_table, seqused_k,
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
    """Block-sparse varlen attention over the KV-major CSR of ``build_k2q_csr`` (API.md 5.5).

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

    batch = check_prefill_csr(hkv, total_q, k2q_row_ptr, k2q_q_indices, topK, cu_seqlens_q, cu_seqlens_k)

    # ---- dense / paged KV -----------------------------------------------------------------------
    if not paged:
        if seqused_k is not None:
            raise ValueError("seqused_k is only supported together with page_table")
        if k.shape != v.shape or k.shape[1:] != (hkv, d):
            raise ValueError(f"dense k and v must both be [total_k, Hkv, {d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    elif k.shape != v.shape:
        raise ValueError(f"paged k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_prefill_paging(page_table, seqused_k, batch, blk_kv, int(k.shape[2]) if paged else None)

    # ---- scalars / advisory args ----------------------------------------------------------------
    tau = check_prefill_scalars(lse_temperature_scale, return_temperature_lse, return_softmax_lse, partial_dtype)
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
    return prefill_returns(out, lse, lse_t, return_softmax_lse, return_temperature_lse, with_tau)


def check_prefill_csr(hkv: int, total_q: int, k2q_row_ptr, k2q_q_indices, topK, cu_seqlens_q, cu_seqlens_k) -> int:
    """CSR / topK / cu_seqlens checks of API.md 5.5 (shared with ``sparse_atten_nvfp4_kv_func``). Returns B."""
    for name, t in (("k2q_row_ptr", k2q_row_ptr), ("k2q_q_indices", k2q_q_indices)):
        check_tensor(name, t, dtypes=(torch.int32,))
        if t.dim() != 2 or t.shape[0] != hkv:
            raise ValueError(f"{name} must be 2-D [Hkv={hkv}, *], got shape {tuple(t.shape)}")
    if isinstance(topK, bool) or not isinstance(topK, int):
        raise TypeError(f"topK must be an int, got {type(topK).__name__}")
    if not 1 <= topK <= 64:
        raise ValueError(f"topK must be in [1, 64], got {topK}")
    if k2q_q_indices.shape[1] < total_q * topK:
        raise ValueError(f"k2q_q_indices.shape[1] ({k2q_q_indices.shape[1]}) must be >= total_q*topK "
                         f"({total_q * topK})")
    if k2q_row_ptr.shape[1] < 1:
        raise ValueError("k2q_row_ptr must have at least one column [Hkv, T+1]")
    return check_cu_seqlens(cu_seqlens_q, cu_seqlens_k)


def check_prefill_paging(page_table, seqused_k, batch: int, blk_kv, page_dim: Optional[int]):
    """blk_kv / page_table / seqused_k checks of API.md 5.5. ``page_dim``: k.shape[2] when paged (else None)."""
    if isinstance(blk_kv, bool) or not isinstance(blk_kv, int):
        raise TypeError(f"blk_kv must be an int, got {type(blk_kv).__name__}")
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


def check_prefill_scalars(lse_temperature_scale, return_temperature_lse, return_softmax_lse, partial_dtype) -> float:
    """tau / LSE flags / partial_dtype checks of API.md 5.5. Returns tau as a float."""
    tau = float(lse_temperature_scale)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"lse_temperature_scale must be finite and > 0, got {lse_temperature_scale}")
    if return_temperature_lse and not return_softmax_lse:
        raise ValueError("return_temperature_lse=True requires return_softmax_lse=True")
    if not isinstance(partial_dtype, torch.dtype) or partial_dtype not in _PARTIAL_DTYPES:
        raise TypeError(f"partial_dtype must be one of float32, bfloat16, float16, float8_e4m3fn, got {partial_dtype}")
    return tau


def prefill_returns(out, lse, lse_t, return_softmax_lse, return_temperature_lse, with_tau):
    """O, (O, LSE) or (O, LSE, LSE_T); LSE_T is LSE itself when tau is 1 (identity fast path)."""
    if not return_softmax_lse:
        return out
    if not return_temperature_lse:
        return out, lse
    return out, lse, (lse_t if with_tau else lse)
