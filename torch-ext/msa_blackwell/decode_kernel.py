"""One split-KV Triton decode kernel for both KV layouts, plus its host-side launch policy.

Layouts (constexpr ``LAYOUT``):

- ``LAYOUT_HND`` (official API): ``k, v [num_pages, Hkv, BS, D]`` (any strides), token ``x`` of
  request ``b`` is ``k[page_table[b, x // BS], g, x % BS]``.
- ``LAYOUT_TOKEN`` (direct helper): ``k_cache, v_cache [max_slots, Hkv, D]`` (any strides), token
  ``x`` is ``k_cache[req_to_token[slot_ids[b], x] mod max_slots, g]``.

Work decomposition. One program per ``(b, g, m_tile, split)``:

- M dimension of both ``tl.dot``s = the GQA group of KV head ``g`` times the query tokens of the
  request (row ``m = i * G + hh`` is token ``i``, Q head ``g * G + hh``), padded to ``BLOCK_M >= 16``
  and tiled by ``m_cap`` rows when ``G * seqlen_q`` is large.
- The KV work of one ``(b, g, m_tile)`` is a list of tiles of ``BLOCK_N`` tokens: every selected
  slot (token-row ``i``, slot ``s``) of the index rows of the tile's tokens, times the
  ``BS // BLOCK_N`` sub-tiles of a block (dense path: every block ``< ceil(Lk / BS)``). A split owns
  a contiguous range of that list, so at small batch one block is spread over several programs.
- Set semantics (API.md 3.2): a tile whose block id already occurred earlier in the tile list is
  skipped (duplicates count once), ids < 0 / out of range / beyond the page table are skipped and
  never dereferenced; a row ``m`` only sees tiles of blocks that occur in its own token's index row.
- Combine (``NUM_SPLITS > 1``): every split writes fp32 partials ``(acc, m, l)`` (log2 domain),
  then increments a per-``(b, g, m_tile)`` counter with ``acq_rel`` semantics; the program that
  sees ``NUM_SPLITS - 1`` (the last to finish) reads all partials in fixed split order (so the
  result does not depend on which program is last), writes O / LSE and resets the counter to 0,
  leaving the counter buffer zeroed for the next launch (self-cleaning).
"""

import copy
import functools

import torch
import triton
import triton.language as tl

LAYOUT_HND = 0
LAYOUT_TOKEN = 1

# ---------------------------------------------------------------------------------------------
# Tuning table, keyed by compute-capability major (None = CPU interpreter / unknown GPU).
# block_n / num_warps are per head dim. Split policy knobs:
#   ctas_per_sm      target number of programs per SM when choosing the split count
#   combine_budget   max bytes of partials (rows * D * 4 per split) the last program reads
#   min_tiles_split  a split gets at least this many BLOCK_N-tiles
#   max_splits       hard cap on the split count
#   big_tiles        if every split would still own >= this many tiles, the combine budget may be
#                    exceeded (long dense contexts), up to max_splits
#   chunk_max        tiles whose index work (ids, dedupe, page lookups) is vectorised per chunk; a
#                    sparse chunk also holds a [chunk, TOK_P2, TK_P2] compare <= chunk_elems
# ---------------------------------------------------------------------------------------------
_BASE = dict(
    block_n={64: 64, 128: 64, 256: 32},
    num_warps={64: 4, 128: 4, 256: 8},
    num_stages=3,
    m_cap={64: 64, 128: 64, 256: 32},
    ctas_per_sm=2,
    combine_budget=128 * 1024,
    min_tiles_split=1,
    max_splits=64,
    big_tiles=32,
    chunk_max=16,
    chunk_elems=4096,
)
DECODE_CONFIGS = {
    # Hopper: 228 KB smem per SM. One program per (b, g) once that fills the SMs once: at B = 64 (256 units)
    # S = 1 measured 97.6 us vs 112 us for S = 2 (H100 sweep); B = 1 / 8 unchanged.
    9: dict(_BASE, ctas_per_sm=1),
    10: dict(_BASE),  # datacenter Blackwell
    12: dict(_BASE, num_stages=2),  # consumer Blackwell: ~99 KB smem per block
    None: dict(_BASE, num_stages=1),  # interpreter / other
}

_SM_COUNT_CPU = 8  # interpreter: small, but enough to exercise the split + combine path


@functools.lru_cache(maxsize=None)
def _device_info(device_type: str, index):
    """(capability major or None, SM count) for a device, read once per device."""
    if device_type != "cuda":
        return None, _SM_COUNT_CPU
    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    return props.major, props.multi_processor_count


def config_for_major(major):
    """The ``DECODE_CONFIGS`` entry used on a device of compute-capability major ``major`` (None = CPU)."""
    cfg = DECODE_CONFIGS.get(major)
    if cfg is None:
        cfg = DECODE_CONFIGS[9] if major is not None and major >= 9 else DECODE_CONFIGS[None]
    return cfg


def device_config(device: torch.device):
    major, sms = _device_info(device.type, device.index)
    return config_for_major(major), sms


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class LaunchPlan:
    """Every launch parameter, computed from shapes and host ints only (no device reads)."""

    __slots__ = ("B", "Hkv", "G", "SQ", "D", "BS", "topk", "dense", "BLOCK_M", "BLOCK_N", "MT", "TOK_P2",
                 "TK_P2", "tiles_hint", "tiles_per_split", "num_splits", "units", "num_warps", "num_stages",
                 "chunk", "grid")

    def __repr__(self):
        return "LaunchPlan(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


@functools.lru_cache(maxsize=512)
def make_plan(device, *, B, Hkv, G, SQ, D, BS, topk, hint_blocks, split_override=0, max_grid=0) -> LaunchPlan:
    """Choose tile sizes and the split count.

    topk: slots per index row (0 = dense path); hint_blocks: dense path's expected block count
    (``min(page_table.shape[1], ceil(max_seqlen_k / BS))``); split_override > 0 forces the number of
    tiles per split (wrapper hints); max_grid > 0 caps the grid. Cached on its arguments (call
    ``make_plan.cache_clear()`` after editing ``DECODE_CONFIGS``).
    """
    cfg, sms = device_config(device)
    return plan_from_config(cfg, sms, B=B, Hkv=Hkv, G=G, SQ=SQ, D=D, BS=BS, topk=topk, hint_blocks=hint_blocks,
                            split_override=split_override, max_grid=max_grid)


def plan_from_config(cfg, sms, *, B, Hkv, G, SQ, D, BS, topk, hint_blocks, split_override=0,
                     max_grid=0) -> LaunchPlan:
    """``make_plan`` for an explicit ``DECODE_CONFIGS`` entry and SM count (also used by ``aot_configs``)."""
    p = LaunchPlan()
    p.B, p.Hkv, p.G, p.SQ, p.D, p.BS, p.topk = B, Hkv, G, SQ, D, BS, topk
    p.dense = topk == 0
    rows = G * SQ
    p.BLOCK_M = min(max(16, _next_pow2(rows)), cfg["m_cap"][D])
    p.BLOCK_N = min(cfg["block_n"][D], BS)
    p.MT = -(-rows // p.BLOCK_M)
    tpb = BS // p.BLOCK_N
    tok_max = min(SQ, -(-p.BLOCK_M // G) + 1)
    p.TOK_P2 = _next_pow2(tok_max)
    p.TK_P2 = _next_pow2(max(topk, 1))
    if p.dense:
        p.tiles_hint = max(1, hint_blocks) * tpb
    else:
        p.tiles_hint = tok_max * topk * tpb
    p.units = B * Hkv * p.MT
    if split_override > 0:
        splits = -(-p.tiles_hint // split_override)
    else:
        target = cfg["ctas_per_sm"] * sms
        splits = 1 if p.units >= target else -(-target // max(p.units, 1))
        cap_budget = max(1, cfg["combine_budget"] // (min(rows, p.BLOCK_M) * D * 4))
        cap = cap_budget
        if p.tiles_hint // max(cap_budget, 1) >= cfg["big_tiles"]:
            cap = max(cap_budget, min(cfg["max_splits"], p.tiles_hint // cfg["big_tiles"]))
        splits = min(splits, cap, cfg["max_splits"], max(1, p.tiles_hint // cfg["min_tiles_split"]))
    splits = max(1, min(splits, p.tiles_hint))
    if max_grid > 0 and p.units > 0:
        splits = max(1, min(splits, max_grid // p.units))
    p.tiles_per_split = -(-p.tiles_hint // splits)
    p.num_splits = -(-p.tiles_hint // p.tiles_per_split)
    p.num_warps = cfg["num_warps"][D]
    p.num_stages = cfg["num_stages"]
    chunk = min(_next_pow2(p.tiles_per_split), cfg["chunk_max"])
    if not p.dense:
        lim = max(1, cfg["chunk_elems"] // (p.TOK_P2 * p.TK_P2))
        chunk = min(chunk, 1 << (lim.bit_length() - 1))
    p.chunk = max(2, chunk)
    p.grid = (p.units * p.num_splits,)
    return p


def workspace_sizes(p: LaunchPlan):
    """(o_part numel, ml_part numel, counter numel); zeros when no split."""
    if p.num_splits == 1:
        return 0, 0, 0
    n = p.units * p.num_splits
    return n * p.BLOCK_M * p.D, n * 2 * p.BLOCK_M, p.units


@triton.jit
def _finalize(acc, m_i, l_i, q, SINK, heads, ss_h, ss_d, offs_d, row_ok, scale_log2, HAS_SINK: tl.constexpr):
    """(acc, m, l) in log2 units -> (O fp32, LSE natural log). Empty rows: O = 0, LSE = -inf."""
    empty = l_i <= 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if HAS_SINK:
        snk = tl.load(SINK + heads[:, None].to(tl.int64) * ss_h + offs_d[None, :] * ss_d,
                      mask=row_ok[:, None], other=0.0).to(tl.float32)
        s_sink = tl.sum(q.to(tl.float32) * snk, 1) * scale_log2
        m_safe = tl.where(empty, 0.0, m_i)
        mx = tl.maximum(m_safe, s_sink)
        a = tl.exp2(m_safe - mx)
        denom = l_safe * a + tl.exp2(s_sink - mx)
        o = acc * (a / denom)[:, None]
    else:
        o = acc / l_safe[:, None]
    o = tl.where(empty[:, None], 0.0, o)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    return o, lse


@triton.jit
def msa_decode_kernel(
    Q, K, V, IDX, TABLE, LENS, SLOTS, SINK, OUT, LSE, OPART, MLPART, COUNTER,
    sq_t, sq_h, sq_d,
    sk_0, sk_1, sk_2, sk_d,
    sv_0, sv_1, sv_2, sv_d,
    si_h, si_t, si_s,
    st_0, st_1,
    s_len, s_slot,
    ss_h, ss_d,
    so_t, so_h, so_d,
    sl_t, sl_h,
    Hkv, G, SQ, TOPK, TBL_W, TBL_ROWS, NUM_ROWS_KV, MT, TILES_PER_SPLIT, TILES_HINT,
    scale_log2,
    LAYOUT: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOK_P2: tl.constexpr, TK_P2: tl.constexpr,
    NUM_SPLITS: tl.constexpr, NS_P2: tl.constexpr, CH: tl.constexpr,
    DENSE: tl.constexpr, CAUSAL: tl.constexpr, HAS_SINK: tl.constexpr, WRITE_LSE: tl.constexpr,
    CDT: tl.constexpr,
):
    TPB: tl.constexpr = BS // BLOCK_N
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    unit = pid // NUM_SPLITS
    mt = unit % MT
    bg = unit // MT
    g = bg % Hkv
    b = bg // Hkv

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_glob = mt * BLOCK_M + offs_m
    row_ok = m_glob < G * SQ
    i_tok = m_glob // G
    heads = g * G + (m_glob % G)
    t_row = (b * SQ + i_tok).to(tl.int64)

    # ---- lengths ---------------------------------------------------------------------------
    if LAYOUT == 0:
        Lk = tl.maximum(tl.load(LENS + b * s_len).to(tl.int64), 0)
        nb = tl.minimum((Lk + BS - 1) // BS, TBL_W)
        req_row = 0
    else:
        req_row = tl.load(SLOTS + b * s_slot).to(tl.int64)
        row_valid = (req_row >= 0) & (req_row < TBL_ROWS)
        Lk = tl.minimum(tl.maximum(tl.load(LENS + b * s_len).to(tl.int64), 0), TBL_W)
        Lk = tl.where(row_valid, Lk, 0)
        req_row = tl.where(row_valid, req_row, 0)
        nb = (Lk + BS - 1) // BS
    if CAUSAL:
        lim = Lk - SQ + i_tok  # token i sees x <= Lk - SQ + i
    else:
        lim = Lk - 1 + i_tok * 0

    # ---- Q tile [BLOCK_M, D] ------------------------------------------------------------------
    q = tl.load(Q + t_row[:, None] * sq_t + heads[:, None].to(tl.int64) * sq_h + offs_d[None, :] * sq_d,
                mask=row_ok[:, None], other=0.0).to(CDT)

    # ---- this tile's tokens and their index rows -------------------------------------------
    i0 = (mt * BLOCK_M) // G
    i1 = tl.minimum(SQ, ((mt + 1) * BLOCK_M + G - 1) // G)
    ntok = i1 - i0
    tok = tl.arange(0, TOK_P2)
    slot_ar = tl.arange(0, TK_P2)
    if DENSE:
        total = nb * TPB
    else:
        idx_base = IDX + g.to(tl.int64) * si_h + (b * SQ + i0).to(tl.int64) * si_t
        idxm = tl.load(idx_base + tok[:, None].to(tl.int64) * si_t + slot_ar[None, :] * si_s,
                       mask=(tok[:, None] < ntok) & (slot_ar[None, :] < TOPK), other=-1).to(tl.int64)
        flatpos = tok[:, None] * TOPK + slot_ar[None, :]
        total = ntok * TOPK * TPB
    tok_of_row = i_tok - i0

    t0 = split * TILES_PER_SPLIT
    t1 = t0 + TILES_PER_SPLIT
    if DENSE:
        # the last split also covers blocks beyond the sizing hint (seqused_k > max_seqlen_k)
        t1 = tl.where(split == NUM_SPLITS - 1, tl.maximum(t1, total), t1)
    t1 = tl.minimum(t1, total)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # The split's tiles are processed in chunks of CH. All index work of a chunk (block ids,
    # duplicate / validity checks, page-table lookups) is done up front as [CH] vectors, so inside
    # the tile loop the K/V addresses only depend on registers (a masked select) and the software
    # pipeliner can prefetch K/V ``num_stages - 1`` tiles ahead.
    ar = tl.arange(0, CH)
    b64 = b.to(tl.int64)
    for c0 in range(t0, t1, CH):
        pos = c0 + ar
        pv = pos < t1
        pblk = pos // TPB
        if DENSE:
            jv = pblk.to(tl.int64)
            okv = pv & (jv < nb)
        else:
            il = pblk // TOPK
            slv = pblk % TOPK
            jv = tl.load(idx_base + il.to(tl.int64) * si_t + slv * si_s, mask=pv, other=-1).to(tl.int64)
            hit3 = idxm[None, :, :] == jv[:, None, None]  # [CH, TOK_P2, TK_P2]
            dup = tl.max(tl.max(tl.where(hit3 & (flatpos[None, :, :] < pblk[:, None, None]), 1, 0), 2), 1)
            okv = pv & (jv >= 0) & (jv < nb) & (dup == 0)
            if TOK_P2 > 1:
                tokhit = tl.max(tl.where(hit3, 1, 0), 2)  # [CH, TOK_P2]: token's index row holds the id
        jv = tl.where(okv, jv, 0)
        if LAYOUT == 0:
            pg = tl.load(TABLE + b64 * st_0 + jv * st_1, mask=okv, other=0).to(tl.int64)
            pok = (pg >= 0) & (pg < NUM_ROWS_KV)
            okv = okv & pok
            pgsel = tl.where(okv, pg, 0).to(tl.int32)
        jsel = tl.where(okv, jv, -1).to(tl.int32)  # -1: skipped tile
        n_it = tl.minimum(t1 - c0, CH)
        for it in range(0, n_it):
            sel = ar == it
            j = tl.sum(tl.where(sel, jsel, 0)).to(tl.int64)
            tile_ok = j >= 0
            j_safe = tl.maximum(j, 0)
            c = (c0 + it) % TPB
            xo = c * BLOCK_N + offs_n
            x = j_safe * BS + xo
            kv_ok = tile_ok & (x < Lk)
            if DENSE:
                row_mem = row_ok
            else:
                if TOK_P2 > 1:
                    th = tl.max(tl.where(sel[:, None], tokhit, 0), 0)  # [TOK_P2]
                    row_mem = tl.max(tl.where(tok[None, :] == tok_of_row[:, None], th[None, :], 0), 1) > 0
                    row_mem = row_mem & row_ok
                else:
                    row_mem = row_ok
            if LAYOUT == 0:
                page = tl.sum(tl.where(sel, pgsel, 0)).to(tl.int64)
                k_row = page * sk_0 + g * sk_1 + xo.to(tl.int64) * sk_2
                v_row = page * sv_0 + g * sv_1 + xo.to(tl.int64) * sv_2
            else:
                sl_id = tl.load(TABLE + req_row * st_0 + x * st_1, mask=kv_ok, other=0).to(tl.int64)
                sl_id = ((sl_id % NUM_ROWS_KV) + NUM_ROWS_KV) % NUM_ROWS_KV
                k_row = sl_id * sk_0 + g * sk_1
                v_row = sl_id * sv_0 + g * sv_1
            k = tl.load(K + k_row[:, None] + offs_d[None, :] * sk_d, mask=kv_ok[:, None], other=0.0).to(CDT)
            v = tl.load(V + v_row[:, None] + offs_d[None, :] * sv_d, mask=kv_ok[:, None], other=0.0).to(CDT)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            vis = row_mem[:, None] & kv_ok[None, :] & (x[None, :] <= lim[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            pr = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(pr, 1)
            acc = acc * alpha[:, None] + tl.dot(pr.to(CDT), v)
            m_i = m_new

    out_ptrs = OUT + t_row[:, None] * so_t + heads[:, None].to(tl.int64) * so_h + offs_d[None, :] * so_d
    lse_ptrs = LSE + t_row * sl_t + heads.to(tl.int64) * sl_h
    if NUM_SPLITS == 1:
        o, lse = _finalize(acc, m_i, l_i, q, SINK, heads, ss_h, ss_d, offs_d, row_ok, scale_log2, HAS_SINK)
        tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_LSE:
            tl.store(lse_ptrs, lse, mask=row_ok)
    else:
        part = unit.to(tl.int64) * NUM_SPLITS + split
        tl.store(OPART + (part * BLOCK_M + offs_m[:, None]) * D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(MLPART + part * (2 * BLOCK_M) + offs_m, m_i, mask=row_ok)
        tl.store(MLPART + part * (2 * BLOCK_M) + BLOCK_M + offs_m, l_i, mask=row_ok)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        done = tl.atomic_add(COUNTER + unit, 1, sem="acq_rel")
        if done == NUM_SPLITS - 1:
            # last program for this (b, g, m_tile): combine in fixed split order (deterministic)
            sp = tl.arange(0, NS_P2)
            base = unit.to(tl.int64) * NUM_SPLITS
            ml_ptr = MLPART + (base + sp[:, None]) * (2 * BLOCK_M) + offs_m[None, :]
            ml_mask = (sp[:, None] < NUM_SPLITS) & row_ok[None, :]
            ms = tl.load(ml_ptr, mask=ml_mask, other=float("-inf"), cache_modifier=".cg")
            ls = tl.load(ml_ptr + BLOCK_M, mask=ml_mask, other=0.0, cache_modifier=".cg")
            m_all = tl.max(ms, 0)
            m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
            l_all = tl.sum(tl.exp2(ms - m_use[None, :]) * ls, 0)
            # fixed split order, one [BLOCK_M, D] partial per step (independent loads, no 3-D tile)
            acc = tl.zeros([BLOCK_M, D], tl.float32)
            o_base = OPART + base * (BLOCK_M * D)
            ml_base = MLPART + base * (2 * BLOCK_M)
            o_off = offs_m[:, None] * D + offs_d[None, :]
            for s_i in tl.static_range(NUM_SPLITS):
                mc = tl.load(ml_base + s_i * (2 * BLOCK_M) + offs_m, mask=row_ok, other=float("-inf"),
                             cache_modifier=".cg")
                oc = tl.load(o_base + s_i * (BLOCK_M * D) + o_off, mask=row_ok[:, None], other=0.0,
                             cache_modifier=".cg")
                acc += oc * tl.exp2(mc - m_use)[:, None]
            o, lse = _finalize(acc, m_all, l_all, q, SINK, heads, ss_h, ss_d, offs_d, row_ok, scale_log2, HAS_SINK)
            tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None])
            if WRITE_LSE:
                tl.store(lse_ptrs, lse, mask=row_ok)
            tl.atomic_xchg(COUNTER + unit, 0)  # self-cleaning: ready for the next launch / graph replay


_CDT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float8_e4m3fn: tl.float16}
LOG2E = 1.4426950408889634


def launch(p: LaunchPlan, *, layout, q, k, v, idx, table, lens, slot_ids, sink, out, lse, o_part, ml_part, counter,
           causal, scale, write_lse):
    """Launch ``msa_decode_kernel``.

    HND:   q [B*SQ, Hq, D]; k, v [P, Hkv, BS, D]; table = page_table [B, W]; lens = seqused_k [B].
    TOKEN: q [B, Hq, D];    k, v [S, Hkv, D];      table = req_to_token [R, W]; lens = seq_lens [B];
           slot_ids [B].
    idx [Hkv, B*SQ, topk] or None (dense); sink [Hq, D] or None; out like q (output dtype);
    lse fp32 [B*SQ, Hq] (written iff write_lse); o_part / ml_part fp32 and counter int32 (zeroed)
    of at least ``workspace_sizes(p)`` elements when ``p.num_splits > 1``.
    """
    if p.grid[0] == 0:
        return
    if layout == LAYOUT_HND:
        sk = (k.stride(0), k.stride(1), k.stride(2), k.stride(3))
        sv = (v.stride(0), v.stride(1), v.stride(2), v.stride(3))
        rows_kv = k.shape[0]
    else:
        sk = (k.stride(0), k.stride(1), 0, k.stride(2))
        sv = (v.stride(0), v.stride(1), 0, v.stride(2))
        rows_kv = k.shape[0]
    dense = idx is None
    idx_t = table if dense else idx
    si = (0, 0, 0) if dense else (idx.stride(0), idx.stride(1), idx.stride(2))
    slots_t = lens if slot_ids is None else slot_ids
    s_slot = 0 if slot_ids is None else slot_ids.stride(0)
    sink_t = q if sink is None else sink
    ss = (0, 0) if sink is None else (sink.stride(0), sink.stride(1))
    lse_t = lse if write_lse else out
    sl = (lse.stride(0), lse.stride(1)) if write_lse else (0, 0)
    if p.num_splits == 1:
        o_part = ml_part = out
        counter = lens
    msa_decode_kernel[p.grid](
        q, k, v, idx_t, table, lens, slots_t, sink_t, out, lse_t, o_part, ml_part, counter,
        q.stride(0), q.stride(1), q.stride(2),
        *sk, *sv, *si,
        table.stride(0), table.stride(1),
        lens.stride(0), s_slot,
        *ss,
        out.stride(0), out.stride(1), out.stride(2),
        *sl,
        p.Hkv, p.G, p.SQ, max(p.topk, 1), table.shape[1], table.shape[0], rows_kv, p.MT,
        p.tiles_per_split, p.tiles_hint,
        float(scale) * LOG2E,
        LAYOUT=layout, BS=p.BS, D=p.D, BLOCK_M=p.BLOCK_M, BLOCK_N=p.BLOCK_N, TOK_P2=p.TOK_P2, TK_P2=p.TK_P2,
        NUM_SPLITS=p.num_splits, NS_P2=_next_pow2(p.num_splits), CH=p.chunk,
        DENSE=dense, CAUSAL=bool(causal), HAS_SINK=sink is not None, WRITE_LSE=bool(write_lse),
        CDT=_CDT[q.dtype],
        num_warps=p.num_warps, num_stages=p.num_stages,
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions (scripts/aot_check.py): every launch configuration the plan
# above can produce on a device of compute capability ``arch``, derived from ``plan_from_config``.
# ---------------------------------------------------------------------------------------------
# (q dtype, kv dtype): output dtype bf16 for fp8 q, else q's; CDT as ``_CDT``
_AOT_DTYPES = ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float8_e4m3fn),
               (torch.float8_e4m3fn, torch.float8_e4m3fn))


def _aot_plans(arch: int):
    """Distinct plans over the supported shape space (both layouts): D 64/128/256, GQA 1..16, seqlen_q 1..4,
    block sizes 16..512 (HND official API: page 128), top-k 0 (dense) / 1..64, batch 1..256."""
    from ._aot import ARCHS, major_of

    cfg = config_for_major(major_of(arch))
    sms = ARCHS[arch]["sms"]
    plans = {}
    for layout in (LAYOUT_HND, LAYOUT_TOKEN):
        for D in (64, 128, 256):
            if layout == LAYOUT_HND and D != 128:
                continue
            for BS in ((128,) if layout == LAYOUT_HND else (16, 32, 64, 128, 256, 512)):
                for G in (1, 2, 4, 8, 16):
                    for SQ in ((1, 2, 4) if layout == LAYOUT_HND else (1,)):
                        for topk in (0, 1, 2, 4, 8, 16, 32, 64):
                            for B, Hkv in ((1, 1), (1, 8), (8, 4), (64, 4), (256, 8)):
                                for hint in ((1, 32, 1024) if topk == 0 else (0,)):
                                    p = plan_from_config(cfg, sms, B=B, Hkv=Hkv, G=G, SQ=SQ, D=D, BS=BS, topk=topk,
                                                         hint_blocks=hint)
                                    key = (layout, p.D, p.BS, p.BLOCK_M, p.BLOCK_N, p.TOK_P2, p.TK_P2, p.num_splits,
                                           p.chunk, p.dense, p.num_warps, p.num_stages)
                                    plans[key] = p
    return plans


def aot_configs(arch: int, full: bool = False):
    """``AotConfig`` list for ``msa_decode_kernel`` on compute capability ``arch`` (see ``_aot``).

    ``full``: every distinct plan x dtype pair x (causal, sink, lse) flags. CI subset: per tile class
    (layout, D, BS, BLOCK_M, BLOCK_N, dense, warps, stages) the plan with the largest index chunk
    (``CH * TOK_P2 * TK_P2``) and the largest split count (unrolled combine), all flags on, every dtype pair
    for the HND BLOCK_M = 64 classes (the largest tiles) and bf16 otherwise.
    """
    from ._aot import AotConfig, dedupe, torch_to_tl_name

    plans = _aot_plans(arch)
    if full:
        sel = list(plans.items())
    else:
        # one plan per tile class (layout, D, BLOCK_M, dense, warps, stages) at the class's largest BLOCK_N:
        # the largest index chunk, with NUM_SPLITS raised to the class's largest split count (the combine
        # loop is unrolled NUM_SPLITS times); smaller BLOCK_N / chunks / split counts are strictly smaller.
        best, most = {}, {}
        for key, p in plans.items():
            cls = (key[0], p.D, p.BLOCK_M, p.dense, p.num_warps, p.num_stages)
            score = (p.BLOCK_N, p.chunk * p.TOK_P2 * p.TK_P2)
            if cls not in best or score > best[cls][0]:
                best[cls] = (score, key, p)
            most[cls] = max(most.get(cls, 1), p.num_splits)
        sel = []
        for cls, (_, key, p) in best.items():
            q = copy.copy(p)
            q.num_splits = most[cls]
            sel.append((key, q))
    out = []
    for key, p in sel:
        layout = key[0]
        if full:
            dtypes = _AOT_DTYPES
        else:  # fp16 compiles like bf16; fp8 K/V adds the widening converts
            dtypes = ((_AOT_DTYPES[0], _AOT_DTYPES[2], _AOT_DTYPES[3]) if layout == LAYOUT_HND and p.BLOCK_M == 64
                      else _AOT_DTYPES[:1])
        if layout == LAYOUT_TOKEN:  # direct helper: bf16/fp16 q only
            dtypes = [d for d in dtypes if d[0] != torch.float8_e4m3fn]
        flags = [(True, True, True), (False, False, False)] if full else [(True, True, True)]
        for qd, kd in dtypes:
            od = torch.bfloat16 if qd == torch.float8_e4m3fn else qd
            cdt = _CDT[qd]
            for causal, sink, wlse in flags:
                args = {}
                for n in msa_decode_kernel.arg_names:
                    args[n] = "i32:D"
                args.update(Q="*" + torch_to_tl_name(qd), K="*" + torch_to_tl_name(kd),
                            V="*" + torch_to_tl_name(kd), IDX="*i32", TABLE="*i32", LENS="*i32", SLOTS="*i32",
                            SINK="*fp32", OUT="*" + torch_to_tl_name(od), LSE="*fp32", OPART="*fp32",
                            MLPART="*fp32", COUNTER="*i32", sq_d=1, sk_d=1, sv_d=1, si_s=1, st_1=1, ss_d=1, so_d=1,
                            sl_h=1, s_len=1, s_slot=1, scale_log2="fp32",
                            Hkv="i32", G="i32", SQ="i32", TOPK="i32", TBL_W="i32", TBL_ROWS="i32",
                            NUM_ROWS_KV="i32", MT="i32", TILES_PER_SPLIT="i32", TILES_HINT="i32")
                args.update(LAYOUT=layout, BS=p.BS, D=p.D, BLOCK_M=p.BLOCK_M, BLOCK_N=p.BLOCK_N, TOK_P2=p.TOK_P2,
                            TK_P2=p.TK_P2, NUM_SPLITS=p.num_splits, NS_P2=_next_pow2(p.num_splits), CH=p.chunk,
                            DENSE=p.dense, CAUSAL=causal, HAS_SINK=sink, WRITE_LSE=wlse, CDT=cdt)
                label = (f"{'HND' if layout == LAYOUT_HND else 'TOK'} D{p.D} BS{p.BS} M{p.BLOCK_M} N{p.BLOCK_N} "
                         f"{'dense' if p.dense else f'tok{p.TOK_P2}xtk{p.TK_P2}'} S{p.num_splits} CH{p.chunk} "
                         f"q{torch_to_tl_name(qd)}/kv{torch_to_tl_name(kd)}"
                         + (f" c{int(causal)}s{int(sink)}l{int(wlse)}" if full else ""))
                out.append(AotConfig(msa_decode_kernel, args, p.num_warps, p.num_stages, label, hot=True))
    return dedupe(out)
