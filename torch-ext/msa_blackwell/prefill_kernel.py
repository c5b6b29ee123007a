"""Prefill kernel (``sparse_atten_func`` / ``sparse_atten_nvfp4_kv_func``): Triton kernel, tile tables, launch.

Query-outer, one kernel family for element K/V (bf16 / fp16 / fp8, ``KV_FMT=0``) and packed NVFP4 K/V
(``KV_FMT=1``); no host synchronisation, graph-capturable, deterministic.

1. **CSR inversion** (``csr_kernel.invert_csr_slots``, two small launches): every CSR row segment is
   walked and its block id inserted into the per-(KV head, token) slot set ``slots [Hkv, total_q, CAP]``
   (``CAP = next_pow2(2*topK)``, lock-free CAS open addressing). This realises the set semantics of
   docs/API.md §5.5 (a repeated (row, q) pair counts once, entries outside ``[0, Lq_b)`` are ignored, row
   pointers are clamped) whatever the CSR's order; only the set is used, so the result is deterministic.
   The same launch writes ``info [3, B+1]``: every request's query-row window and owned rows (owner rule of
   docs/API.md §12.1).
2. **Attention** (``_prefill_fwd_kernel``): one program per (tile of ``BMT`` consecutive query rows of one
   window, KV head ``g``); the ``G`` query heads of the group are folded into the MMA M dimension
   (``M = BMT*G`` rows), so one K/V block load feeds every head of the group. Window ``b`` takes the tiles
   ``[s_b, s_b + cdiv(W_{b+1} - W_b, BMT))`` with ``s_b = (W_b + b*(BMT-1)) // BMT`` (found in-kernel by binary
   search; the grid is ``(total_q + B*(BMT-1)) // BMT + 1`` tiles). The windows partition ``[0, total_q)``, so
   every output row is written exactly once: rows no request owns select no block and get O = 0,
   LSE = -inf, as empty rows do (O / LSE need no initialisation pass).

   The prologue builds the ascending union of the tile tokens' valid blocks (ids filtered by length,
   page bound and the block-level causal limit): the ``[BMT, CAP]`` id tile is sorted, the first of every
   run kept and compacted, with a bit mask of the tokens that selected each block, into a per-program
   scratch row (``LIST=True``; ``LIST=False`` finds each next block with an in-loop min-reduction instead).
   The main loop is a counted loop over ``(block, BNS-token sub-block)`` steps (``_attend_sub_block``):
   masked ``S = Q K^T`` (fp32 accumulate) with per-row block membership, length, page validity and
   bottom-right causality, exp2-domain online softmax with fp32 statistics and an fp32 O accumulator, and
   the optional temperature statistics (``HAS_TAU``).

Precision: bf16 / fp16 Q/K/V feed ``tl.dot`` directly; fp8 K/V (and fp8 Q) are widened exactly to bf16 in
registers. P is rounded to the compute dtype before PV. LSE is natural-log fp32.

NVFP4 K/V (``KV_FMT=1``): where the element path loads a ``[BNS, 128]`` K or V sub-block, the kernel reads the
packed E2M1 bytes and the 128x4-swizzled E4M3 scales of those rows (scale row ``t*Hkv + h`` dense,
``(page*Hkv + h)*128 + s`` paged) through ``nvfp4_tile`` (``FP4_DEC = 2``, the default: ``e2m1 * scale`` in the
compute dtype, exact) or ``nvfp4_tile_f16`` (``FP4_DEC`` 0 / 1: fp16 tiles ``e2m1 * scale / 128``, Q rescaled per
row into fp16; compiles with Triton 3.8, not with 3.6). No dequantised K/V exists in memory. ``k_global``
multiplies the logit scales (``HAS_KG``), ``v_global`` the normalised output (``HAS_VG``); both are read from
device pointers. While its workspace fits, ``sparse_atten_nvfp4_kv_func`` stages the K/V instead (see
``NVFP4_STAGE_MAX_BYTES``): element tiles decoded once per call, the element kernel with ``HAS_KG`` / ``HAS_VG``.

Tile configs: ``PrefillConfig`` entries of the per-architecture tables ``CFG_SM90`` / ``CFG_SM100`` /
``CFG_SM12`` (NVFP4 K/V: ``CFG_NVFP4_SM*``), keyed by the GQA ratio ``G``; ``tuning.override`` replaces them
for benchmarks.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import KV_BLOCK, LOG2E, device_info
from ._validate import FP8, interpreter_active
from .csr_kernel import invert_csr_slots, slot_capacity
from .nvfp4_tile import FP4_DEC_ASM, FP4_DEC_PORTABLE, FP4_POW2, nvfp4_q_f16, nvfp4_tile, nvfp4_tile_f16

# NVFP4 tile decoder of the prefill kernel (constexpr FP4_DEC): FP4_DEC_TILE32 = ``nvfp4_tile`` (fp32 decode to
# the compute dtype, bf16 / fp16 MMAs), the default; FP4_DEC_PORTABLE / FP4_DEC_ASM = the fp16-tile variant
# (``nvfp4_tile_f16``, portable / inline-PTX decoder), selectable through ``tuning.override``.
FP4_DEC_TILE32 = tl.constexpr(2)
FP4_DEC_DEFAULT = 2

__all__ = ["PrefillConfig", "CFG_SM90", "CFG_SM100", "CFG_SM12", "CFG_NVFP4_SM90", "CFG_NVFP4_SM100",
           "CFG_NVFP4_SM12", "config_table", "launch_config", "fp4_decoder", "prefill_launch", "aot_configs",
           "NVFP4_STAGE_MAX_BYTES", "nvfp4_stage_limit", "nvfp4_stage_plan", "nvfp4_stage", "nvfp4_stage_table"]

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
    if HAS_KG:  # NVFP4 K global scale (fused or staged), folded into the logit scales (read on the device)
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
        elif HAS_VG:  # staged NVFP4 K/V (element tiles without the global scales): v_global once on the output
            o = tl.where(nonempty[:, None], o * tl.load(VG), 0.0)
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


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """One launch configuration of ``_prefill_fwd_kernel`` (``M = bmt * G`` MMA rows).

    bmt: query tokens per tile (power of two; <= 64 with ``block_list``, whose per-block token mask is 64-bit).
    bns: KV tokens per inner step (divides 128). num_warps / num_stages: Triton launch options.
    block_list: True = the prologue-built ascending block list (``LIST``), False = in-loop next-minimum search.
    """

    bmt: int
    bns: int
    num_warps: int
    num_stages: int
    block_list: bool = True

    @classmethod
    def coerce(cls, name: str, value) -> "PrefillConfig":
        """A ``PrefillConfig`` from itself, a tuple ``(bmt, bns, warps, stages[, block_list])`` or the same as a
        comma-separated string (``tuning.override``). ValueError for malformed values."""
        if isinstance(value, cls):
            cfg = value
        else:
            try:
                f = [int(x) for x in value.split(",")] if isinstance(value, str) else [int(x) for x in value]
            except (TypeError, ValueError):
                raise ValueError(f"{name}: expected 'bmt,bns,warps,stages[,list]', got {value!r}") from None
            if len(f) not in (4, 5):
                raise ValueError(f"{name}: expected 4 or 5 integers (bmt, bns, warps, stages[, list]), got {value!r}")
            cfg = cls(f[0], f[1], f[2], f[3], bool(f[4]) if len(f) > 4 else True)
        if min(cfg.bmt, cfg.bns, cfg.num_warps, cfg.num_stages) < 1 or KV_BLOCK % cfg.bns:
            raise ValueError(f"{name}: bmt, bns, num_warps, num_stages must be positive and bns must divide 128, "
                             f"got {cfg}")
        if cfg.block_list and cfg.bmt > 64:
            raise ValueError(f"{name}: the block-list loop keeps a 64-bit token mask per block: bmt <= 64, got {cfg}")
        return cfg


# Per-architecture tables: G -> PrefillConfig. Tokens per tile by G (M = BMT*G):
TILE_TOKENS = {1: 64, 2: 32, 4: 32, 8: 16, 16: 8}
# sm_90 (H100): M = 128 tiles, 64-token KV steps, 3 stages (with 128-token steps the [M, 128] fp32 S tile plus O,
# Q and the softmax state exceed 255 registers and ptxas spills inside the MMA loop; scripts/aot_check.py
# reports it). M = 64 tiles (G = 1 / 2 at these BMT) take 2 stages; G = 1 (BMT 64, a [64 x CAP] id sort in the
# prologue) takes 8 warps for the same reason.
CFG_SM90 = {G: (PrefillConfig(bmt, 64, 8, 3) if bmt * G >= 128 else PrefillConfig(bmt, 64, 8 if G == 1 else 4, 2))
            for G, bmt in TILE_TOKENS.items()}
# sm_12x (consumer Blackwell, ~99 KB shared memory per block; mma.sync keeps O in registers): M = 64 rows,
# 64-token steps, 2 stages (Q 16 KB + 2 x (K 16 KB + V 16 KB) = 80 KB of operand buffers), 8 warps (4 spill).
CFG_SM12 = {G: PrefillConfig(max(1, 64 // G), 64, 8, 2) for G in TILE_TOKENS}
# sm_10x (datacenter Blackwell): sm_90's M = 128 tiles spill inside the MMA loop and 3 stages exceed 227 KB, so
# it takes the sm_12x tiles; G = 1 / 2 at M = 64 still spill (the 64 x CAP id sort of the prologue): M = 32.
CFG_SM100 = {**CFG_SM12, 1: PrefillConfig(32, 64, 8, 2), 2: PrefillConfig(16, 64, 8, 2)}
# CPU interpreter: small tiles, whole 128-token steps, one stage.
CFG_INTERPRETER = {G: PrefillConfig(max(1, 16 // G), 128, 4, 1) for G in TILE_TOKENS}


def _nvfp4_table(table, bns: int, min_warps: int):
    """NVFP4 K/V (``KV_FMT=1``) tiles: ``table``'s entries with at most ``bns``-token steps and at least
    ``min_warps`` warps. The K/V step is dequantised in registers (``[BNS, 128]`` fp32 before the cast), so the
    element path's step size spills: local-memory instructions inside the MMA loop (scripts/aot_check.py,
    Triton 3.8 ptxas, paged + seqused_k + tau + causal, CAP 32 / 128) are, with these tables, 0-5 on sm_90,
    0-10 on sm_100 (about 70 for G 4 / 8 at CAP 128) and 12-66 on sm_12x."""
    return {G: dataclasses.replace(c, bns=min(c.bns, bns), num_warps=max(c.num_warps, min_warps))
            for G, c in table.items()}


CFG_NVFP4_SM90 = _nvfp4_table(CFG_SM90, 64, 8)
CFG_NVFP4_SM100 = _nvfp4_table(CFG_SM100, 32, 8)
CFG_NVFP4_SM12 = _nvfp4_table(CFG_SM12, 32, 8)


def config_table(major: int, nvfp4: bool = False):
    """The ``{G: PrefillConfig}`` table of compute-capability major ``major`` (9: ``CFG_SM90``, 10: ``CFG_SM100``,
    12: ``CFG_SM12``; other majors: ``CFG_SM90``); ``nvfp4``: the NVFP4-K/V table ``CFG_NVFP4_SM*``."""
    if major >= 12:
        return CFG_NVFP4_SM12 if nvfp4 else CFG_SM12
    if major == 10:
        return CFG_NVFP4_SM100 if nvfp4 else CFG_SM100
    return CFG_NVFP4_SM90 if nvfp4 else CFG_SM90


def launch_config(G: int, device: torch.device, nvfp4: bool = False) -> PrefillConfig:
    """The ``PrefillConfig`` of a launch: ``tuning.override(prefill=...)`` (``prefill_nvfp4`` for NVFP4 K/V) if
    set, else ``CFG_INTERPRETER`` under the interpreter, else the device's table (a CPU device outside the
    interpreter, which cannot launch, maps to sm_90's)."""
    ov = tuning.current()
    cfg = ov.prefill_nvfp4 if nvfp4 else ov.prefill
    if cfg is not None:
        return cfg
    if interpreter_active():
        return CFG_INTERPRETER[G]
    major = device_info(device.type, device.index)[0] if device.type == "cuda" else 9
    return config_table(major, nvfp4)[G]


def fp4_decoder(device: torch.device) -> int:
    """``FP4_DEC`` of an NVFP4-K/V launch: ``FP4_DEC_DEFAULT`` (fp32 tiles), or the fp16-tile variant chosen with
    ``tuning.override(prefill_fp4_decoder=0|1)`` (1, the inline-PTX decoder, only on a GPU)."""
    dec = tuning.current().prefill_fp4_decoder
    if dec == FP4_DEC_ASM and device.type == "cuda":
        return FP4_DEC_ASM
    return FP4_DEC_PORTABLE if dec == FP4_DEC_PORTABLE else FP4_DEC_DEFAULT


# ---- NVFP4 K/V staging ----------------------------------------------------------------------------------------
# ``sparse_atten_nvfp4_kv_func`` decodes every K/V block the call can read ONCE into a workspace of element tiles
# (``e2m1 * E4M3 scale`` in the compute dtype, exact; no global scale) and runs the element kernel on it with
# ``k_global`` folded into the logit scale and ``v_global`` applied to the output (``HAS_KG`` / ``HAS_VG``): the
# fused kernel (``KV_FMT=1``) decodes a block once per query tile that selects it, which makes it compute bound on
# the decode (H100, 32K causal top-16: 2.1x the bf16 time; staging + bf16 kernel 1.01x). The workspace holds
# ``2 * rows * Hkv * 128`` elements of the compute dtype, rows = total_k (dense) or the smaller of the pool's and
# the page table's pages x 128 (paged); above the byte limit of the device's major (or ``tuning.override(
# prefill_nvfp4_stage_bytes=...)``, 0 = never) the fused kernel runs and no K/V copy is made.
NVFP4_STAGE_MAX_BYTES = {9: 1 << 30, 10: 1 << 30, 12: 1 << 29, None: 1 << 26}
STAGE_ROWS = 64  # K/V rows per staging program


@triton.jit
def _nvfp4_stage_kernel(P, S, OUT, PT, sp_0, sp_1, sp_2, sp_3, spt_b, spt_p, n_src, W, Hkv,
                        PAGED: tl.constexpr, GATHER: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
    """Element tiles ``e2m1 * scale`` (OUT's dtype) of packed NVFP4 rows; ``ROWS`` rows x ``D`` per program.

    Dense (grid ``(cdiv(total_k, ROWS), Hkv)``): row t of head h (bytes ``t*sp_0 + h*sp_1 + j*sp_2``, scale row
    ``t*Hkv + h``) -> ``OUT[t, h]``. Paged (grid ``(pages, Hkv, 128 / ROWS)``): staged page j is pool page j, or
    with ``GATHER`` the page-table entry ``j`` (``PT[j // W, j % W]``); slot s of head h (bytes ``page*sp_0 +
    h*sp_1 + s*sp_2 + j*sp_3``, scale row ``(page*Hkv + h)*128 + s``) -> ``OUT[j, h, s]``. Page-table entries
    outside ``[0, n_src)`` are not read and their staged page is not written (the staged table marks it -1)."""
    j = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    if PAGED:
        s = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        if GATHER:
            src = tl.load(PT + (j // W).to(tl.int64) * spt_b + (j % W).to(tl.int64) * spt_p)
        else:
            src = j
        ok = tl.where((src >= 0) & (src < n_src), s < 128, False)  # (Triton 3.9's interpreter: no scalar & vector)
        pg = tl.where(ok, src, 0).to(tl.int64)
        byte_off = pg * sp_0 + h * sp_1 + s.to(tl.int64) * sp_2
        srow = (pg * Hkv + h) * 128 + s
        x = nvfp4_tile(P, S, byte_off, srow, ok, sp_3, ROWS, D, OUT.dtype.element_ty)
        orow = (j.to(tl.int64) * Hkv + h) * 128 + s
    else:
        t = j.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        ok = t < n_src
        byte_off = t * sp_0 + h * sp_1
        srow = t * Hkv + h
        x = nvfp4_tile(P, S, byte_off, srow, ok, sp_2, ROWS, D, OUT.dtype.element_ty)
        orow = t * Hkv + h
    tl.store(OUT + orow[:, None] * D + d[None, :], x, mask=ok[:, None])


def nvfp4_stage_limit(device: torch.device) -> int:
    """Largest staging workspace (bytes) of an NVFP4-K/V prefill on ``device`` (0: always the fused kernel)."""
    lim = tuning.current().prefill_nvfp4_stage_bytes
    if lim is not None:
        return lim
    if interpreter_active() or device.type != "cuda":
        return NVFP4_STAGE_MAX_BYTES[None]
    major = device_info(device.type, device.index)[0]
    return NVFP4_STAGE_MAX_BYTES.get(major, NVFP4_STAGE_MAX_BYTES[9])


def nvfp4_stage_plan(k, page_table, dtype):
    """``(pages, gather)`` of a paged staging (``pages`` staged pages, ``gather``: through the page table) or
    ``(rows, False)`` dense, and the workspace bytes of K and V together."""
    hkv, esz = k.shape[1], torch.empty((), dtype=dtype).element_size()
    if page_table is None:
        n = k.shape[0]
        return n, False, 2 * n * hkv * 128 * esz
    pool, slots = k.shape[0], page_table.shape[0] * page_table.shape[1]
    gather = slots < pool
    n = slots if gather else pool
    return n, gather, 2 * n * hkv * 128 * 128 * esz


def nvfp4_stage(k, scale, page_table, dtype, n, gather):
    """Staged element K (or V) of ``nvfp4_stage_plan``: dense ``[total_k, Hkv, 128]`` or paged
    ``[n, Hkv, 128, 128]`` of ``dtype`` (rows of invalid page-table entries unwritten)."""
    hkv = k.shape[1]
    paged = page_table is not None
    out = torch.empty((n, hkv, 128, 128) if paged else (n, hkv, 128), dtype=dtype, device=k.device)
    if n == 0 or hkv == 0:
        return out
    sp = k.stride() if paged else k.stride() + (0,)
    pt = page_table if gather else k
    spt = page_table.stride() if gather else (0, 0)
    w = page_table.shape[1] if gather else 1
    grid = (n, hkv, 128 // STAGE_ROWS) if paged else (triton.cdiv(n, STAGE_ROWS), hkv)
    _nvfp4_stage_kernel[grid](k, scale, out, pt, sp[0], sp[1], sp[2], sp[3], spt[0], spt[1], k.shape[0], w, hkv,
                              PAGED=paged, GATHER=gather, D=128, ROWS=STAGE_ROWS, num_warps=4)
    return out


def nvfp4_stage_table(page_table, pool: int):
    """The page table of a gathered staging: entry (b, w) -> staged page ``b*W + w``, or -1 where the original
    entry is not a page of the pool (the kernel then skips the block, as it does for the original)."""
    b, w = page_table.shape
    ids = torch.arange(b * w, dtype=torch.int32, device=page_table.device).view(b, w)
    return torch.where((page_table >= 0) & (page_table < pool), ids, -1)


# (q dtype, kv dtype) pairs; output dtype bf16 for fp8 q, else q's (the kernel's compute dtype = O's).
# kv dtype uint8 = packed NVFP4 (KV_FMT=1, scales + global-scale pointers).
_AOT_DTYPES = ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, FP8), (FP8, FP8),
               (torch.bfloat16, torch.uint8), (torch.float16, torch.uint8), (FP8, torch.uint8))


def aot_configs(arch: int, full: bool = False):
    """``AotConfig`` list (see ``_aot``) for ``_prefill_fwd_kernel`` on compute capability ``arch``.

    Tiles from ``config_table(major)`` (NVFP4 K/V: ``config_table(major, nvfp4=True)``), every G in
    ``TILE_TOKENS``. ``full``: every slot capacity (topK 1..64 -> CAP 2..128) x dtype pair x (causal, paged,
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
                c = (nv_table if nv else table)[G]
                bmt, bns, nw, ns, use_list = c.bmt, c.bns, c.num_warps, c.num_stages, c.block_list
                fl = flag_sets
                if m3 and qd == torch.bfloat16 and nv:
                    fl = flag_sets + [(True, False, False, False)]  # + dense NVFP4 K/V (M3 shape)
                # global scales: NVFP4 K/V; element K/V with both = staged NVFP4 K/V (M3 shape in the CI subset)
                gss = ((False, False), (True, True)) if (nv and full) else ((nv, nv),)
                if not nv and qd != FP8 and kd == od and (full or m3):
                    gss = ((False, False), (True, True))
                for causal, paged, sequ, tau in fl:
                    for gs in gss:
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
                                 + (f" gs{int(gs[0])}{int(gs[1])}" if (nv or gs[0]) else ""))
                        out.append(AotConfig(_prefill_fwd_kernel, args, nw, ns, label, hot=True))
    # NVFP4 staging (sparse_atten_nvfp4_kv_func's default path): dense, paged pool, paged gathered; bf16 / fp16 tiles
    for od in (torch.bfloat16, torch.float16):
        for paged, gather in ((False, False), (True, False), (True, True)):
            args = {n: "i32" for n in _nvfp4_stage_kernel.arg_names}
            args.update(P="*u8", S="*u8", OUT="*" + torch_to_tl_name(od), PT="*i32" if gather else "*u8",
                        sp_3=1 if paged else "i32", sp_2="i32:D" if paged else 1, spt_p=1 if gather else "i32",
                        PAGED=paged, GATHER=gather, D=128, ROWS=STAGE_ROWS)
            out.append(AotConfig(_nvfp4_stage_kernel, args, 4, 3,
                                 f"stage {torch_to_tl_name(od)} {'paged' if paged else 'dense'}"
                                 + (" gather" if gather else "")))
    return dedupe(out)



def prefill_launch(q, k, v, row_ptr, q_idx, cu_q, cu_k, page_table, seqused_k, topk, causal, scale, tau,
                    with_tau, out_dtype, nvfp4=None, kv_global=(None, None)):
    """Allocate O / LSE / LSE_T, invert the CSR and launch ``_prefill_fwd_kernel``.

    ``nvfp4``: ``None`` for element K/V (``[.., 128]``), or ``(k_scale, v_scale, k_global, v_global)`` for
    packed NVFP4 K/V (``[.., 64]`` uint8; scales uint8 128x4-swizzled, contiguous; globals fp32 tensors
    (element 0) or ``None``): the kernel then runs with ``KV_FMT=1`` and never materialises K/V.
    ``kv_global``: element K/V only: ``(k_global, v_global)`` fp32 tensors or None, for staged NVFP4 K/V
    (``nvfp4_stage``): k_global folds into the logit scales, v_global multiplies the output.
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
    cfg = launch_config(G, q.device, nvfp4 is not None)
    bmt, bns, nw, ns, use_list = cfg.bmt, cfg.bns, cfg.num_warps, cfg.num_stages, cfg.block_list
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
        kv_fmt, ksc, vsc, (kgs, vgs) = 0, dummy, dummy, kv_global
    else:
        kv_fmt, (ksc, vsc, kgs, vgs) = 1, nvfp4
    _prefill_fwd_kernel[(n_tiles, hkv)](
        q, k, v, out, lse, lse_t if with_tau else lse, slots, info, cu_q, cu_k,
        page_table if paged else dummy, seqused_k if seqused_k is not None else dummy, ulist,
        ksc, vsc, kgs if kgs is not None else dummy, vgs if vgs is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2),
        sk[0], sk[1], sk[2], sk[3], sv[0], sv[1], sv[2], sv[3], spt[0], spt[1],
        total_q, total_k, num_pages, max_pages, batch, max(1, int(batch).bit_length() + 1), hq,
        scale * LOG2E, scale * LOG2E / tau,
        CAUSAL=bool(causal), PAGED=paged, HAS_SEQU=seqused_k is not None, HAS_TAU=bool(with_tau),
        BMT=bmt, G=G, CAP=cap, D=d, BN=KV_BLOCK, BNS=bns, LIST=use_list,
        KV_FMT=kv_fmt, HAS_KG=kgs is not None, HAS_VG=vgs is not None,
        FP4_DEC=fp4_decoder(q.device) if kv_fmt == 1 else 0,
        num_warps=nw, num_stages=ns,
    )
    return out, lse, lse_t
