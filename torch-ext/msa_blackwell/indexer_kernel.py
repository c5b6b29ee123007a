"""Decode-indexer block-score kernel (docs/API.md §6.1.1) and its host-side launch: the per-architecture
``DECODE_SCORE_CONFIGS`` table, the cached launch plans and ``aot_configs``."""

import dataclasses
from typing import Mapping

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import TableEntry, cdiv, device_info
from ._launch import TritonLauncher, use_pdl


@triton.jit
def _decode_block_scores_kernel(q_ptr, k_ptr, r2t_ptr, seq_ptr, slot_ptr, out_ptr,
                                sqb, sqh, sqd, skt, skh, skd, srr, src, s_seq, s_slot,
                                width, n_rows, max_slots, G, Hkv, B, NB, n_chunks, tiles_per_prog, sm_scale,
                                D: tl.constexpr, BS: tl.constexpr, TN: tl.constexpr, GP: tl.constexpr,
                                LSE: tl.constexpr, USE_GDC: tl.constexpr = False):
    """scores[h, b, j] = max (or logsumexp) of sm_scale*<q[b,h], k[slot(b,x), h//G]> over block j (fp32).

    One program per (request b, KV head g, chunk c of ``tiles_per_prog`` tiles of TN tokens). The G Q heads of
    KV head g share each gathered K tile ``[TN, D]`` (loaded once): ``s [GP, TN] = q_g [GP, D] @ K^T`` (fp32
    accumulation; rows >= G are zero padding), masked ``x >= L_b`` -> -inf, NaN -> -inf, then reduced per block:
    a tile holds ``TN // BS`` whole blocks (BS <= TN) or is ``1 / (BS // TN)`` of one block (BS > TN; the
    partial max / (max, sum) is carried across the block's tiles; ``tiles_per_prog`` is a multiple of
    ``BS // TN`` so blocks never straddle programs). Blocks ``>= NB`` are never written; blocks past L_b get
    -inf without any K / req_to_token load.
    """
    NBT: tl.constexpr = TN // BS if BS <= TN else 1  # blocks per tile
    TPB: tl.constexpr = BS // TN if BS > TN else 1  # tiles per block
    BT: tl.constexpr = BS if BS <= TN else TN  # tokens of one block inside a tile
    if USE_GDC:  # programmatic dependent launch: no memory access before the previous kernel has completed
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the top-k launch may be scheduled now (it waits the same way)
    pid = tl.program_id(0)
    c = pid % n_chunks
    bg = pid // n_chunks
    b = bg // Hkv
    g = bg % Hkv
    L = tl.load(seq_ptr + b.to(tl.int64) * s_seq).to(tl.int64)
    L = tl.minimum(tl.maximum(L, 0), width)
    row = tl.load(slot_ptr + b.to(tl.int64) * s_slot).to(tl.int64)
    row_ok = (row >= 0) & (row < n_rows)  # contract: slot_ids in [0, max_reqs); otherwise empty, nothing read
    L = tl.where(row_ok, L, 0)
    row = tl.where(row_ok, row, 0)
    ii = tl.arange(0, GP)
    h_ok = ii < G
    h = g * G + ii
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h[:, None].to(tl.int64) * sqh + dd[None, :] * sqd,
                mask=h_ok[:, None], other=0.0)
    tt = tl.arange(0, TN)
    jb = tl.arange(0, NBT)
    out_rows = out_ptr + (h.to(tl.int64) * B + b) * NB  # [GP]
    t0 = c * tiles_per_prog  # first tile of this chunk (global tile index within the request)
    # tiles holding at least one token < L, rounded up to whole blocks, within this chunk
    n_act = tl.minimum(tl.maximum((L - t0.to(tl.int64) * TN + TN - 1) // TN, 0), tiles_per_prog).to(tl.int32)
    n_act = (n_act + TPB - 1) // TPB * TPB
    m = tl.full([GP, NBT], float("-inf"), tl.float32)
    acc = tl.zeros([GP, NBT], tl.float32)
    for t in range(0, n_act):
        x = (t0 + t).to(tl.int64) * TN + tt
        ok = x < L
        tok = tl.load(r2t_ptr + row * srr + x * src, mask=ok, other=0).to(tl.int64)
        tok = ((tok % max_slots) + max_slots) % max_slots
        kk = tl.load(k_ptr + tok[:, None] * skt + g * skh + dd[None, :] * skd, mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kk.to(q.dtype)), input_precision="ieee") * sm_scale  # [GP, TN] fp32
        s = tl.where(ok[None, :], s, float("-inf"))
        s = tl.where(s != s, float("-inf"), s)
        if NBT == 1:
            pm = tl.expand_dims(tl.max(s, axis=1), 1)  # [GP, 1]
        else:
            s3 = tl.reshape(s, (GP, NBT, BT))
            pm = tl.max(s3, axis=2)  # [GP, NBT]
        if LSE:
            pm_safe = tl.where(pm == float("-inf"), 0.0, pm)
            if NBT == 1:
                ps = tl.expand_dims(tl.sum(tl.exp(s - pm_safe), axis=1), 1)
            else:
                ps = tl.sum(tl.exp(s3 - tl.expand_dims(pm_safe, 2)), axis=2)
            m_new = tl.maximum(m, pm)
            mn_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - mn_safe) + ps * tl.exp(pm - mn_safe)
            m = m_new
        else:
            m = tl.maximum(m, pm)
        last = (t % TPB) == TPB - 1
        if LSE:
            res = tl.where(m == float("-inf"), float("-inf"), m + tl.log(tl.where(m == float("-inf"), 1.0, acc)))
        else:
            res = m
        j = (t0 + t) * NBT // TPB + jb  # block ids of this tile
        tl.store(out_rows[:, None] + j[None, :], res, mask=h_ok[:, None] & (j[None, :] < NB) & last)
        m = tl.where(last, float("-inf"), m)
        acc = tl.where(last, 0.0, acc)
    neg = tl.full([GP, NBT], float("-inf"), tl.float32)
    for t in range(n_act, tiles_per_prog, TPB):
        j = (t0 + t) * NBT // TPB + jb
        tl.store(out_rows[:, None] + j[None, :], neg, mask=h_ok[:, None] & (j[None, :] < NB))


@dataclasses.dataclass(frozen=True)
class DecodeScoreConfig(TableEntry):
    """One entry of the block-score launch table (``DECODE_SCORE_CONFIGS``, keyed by compute-capability major).

    ``tn``: tokens per tile by head dim (the gathered K tile ``[tn, D]``); ``num_warps``, ``num_stages``: Triton
    launch options; ``progs_per_sm``: target programs per SM when splitting a request's tiles into chunks;
    ``max_tpp``: most tiles per program; ``pdl``: 1 = programmatic dependent launch (sm_90+; the native top-k
    that follows in ``flash_decode_with_topk_idx`` is always launched that way). ``tuning.override(
    decode_scores=...)`` changes fields of the entry a launch uses.
    """

    PER_HEAD_DIM = ("tn",)
    ZERO_OK = ("pdl",)

    tn: Mapping[int, int]
    num_warps: int = 4
    num_stages: int = 3
    progs_per_sm: int = 4
    max_tpp: int = 16
    pdl: int = 0


# The gathered K tile is cp.async-prefetched one tile ahead into one shared-memory buffer, the req_to_token
# slice two ahead: ~38 KB per program at D 128 / tn 128, so ~5 programs per SM on sm_90 and the memory
# parallelism comes from occupancy. sm_12x has ~99 KB of shared memory per block.
# sm_90 is measured (H100, below); the other entries are chosen by reasoning.
DECODE_SCORE_CONFIGS = {
    None: DecodeScoreConfig(tn={64: 32, 128: 32, 256: 32}, num_stages=1),  # interpreter / unknown
    # H100: pdl, B = 1 at 32K: flash_decode_with_topk_idx 16.1 -> 15.0 us (the top-k launch overlaps the score
    # kernel's tail), B = 32 at 128K unchanged (scripts/exp_pdl.py); D = 128: 64-token tiles and 4 stages, B = 32
    # at 128K: score kernel 438 -> 417 us (85.3 -> 89.5% of copy; 128-token tiles 441-445 us with 3 or 4 stages
    # at any warp / programs-per-SM choice, 500-594 us with 2; 8 warps 431-436 us) (scripts/exp_indexer.py).
    9: DecodeScoreConfig(tn={64: 128, 128: 64, 256: 64}, num_stages=4, pdl=1),
    10: DecodeScoreConfig(tn={64: 128, 128: 128, 256: 64}),
    12: DecodeScoreConfig(tn={64: 128, 128: 64, 256: 32}),
}
_SM_COUNT_CPU = 8  # interpreter: small, but enough to exercise the chunked grid


def decode_score_config(major) -> DecodeScoreConfig:
    """The table's ``DecodeScoreConfig`` for compute-capability major ``major`` (None = interpreter; an unknown
    major uses sm_12x's from 12 on, else sm_90's)."""
    if major is None:
        return DECODE_SCORE_CONFIGS[None]
    if major in DECODE_SCORE_CONFIGS:
        return DECODE_SCORE_CONFIGS[major]
    return DECODE_SCORE_CONFIGS[12 if major >= 12 else 9]


def decode_score_plan(cfg: DecodeScoreConfig, D: int, block_size: int, NB: int, n_rows: int, sms: int):
    """(TN, tiles_per_prog, n_chunks) for ``n_rows = B * Hkv`` (request, KV head) rows of NB blocks.

    Tiles of TN tokens; ``tiles_per_prog`` (a multiple of the tiles per block) is chosen so that about
    ``progs_per_sm * sms`` programs run, at most ``max_tpp`` tiles (rounded up to whole blocks) each.
    """
    TN = int(cfg.tn[D])
    tpb = block_size // TN if block_size > TN else 1
    n_tiles = cdiv(NB * block_size, TN)
    want = cdiv(n_rows * n_tiles, max(1, cfg.progs_per_sm * sms))
    tpp = max(1, min(want, cfg.max_tpp, n_tiles))
    tpp = cdiv(tpp, tpb) * tpb
    return TN, tpp, cdiv(n_tiles, tpp)


# Launch plans, keyed by everything they are derived from and everything Triton specialises on (device, dtypes,
# shapes, strides, NB, block size, lse, the tuning changes): (out shape, mode, grid, int args, constexprs,
# launcher key, num_warps, num_stages). Bounded: cleared when it reaches _PLAN_CACHE_MAX entries.
_PLAN_CACHE = {}
_PLAN_CACHE_MAX = 4096
_MODE_EMPTY, _MODE_NEG, _MODE_LAUNCH = 0, 1, 2


def _make_plan(key, changes, q, kc, req_to_token, seq_lens, slot_ids, NB, block_size, lse):
    B, Hq, D = q.shape
    out_shape = (Hq, B, NB)
    major, sms = device_info(q.device.type, q.device.index, _SM_COUNT_CPU)
    cfg = decode_score_config(major)
    if changes:
        cfg = cfg.updated(changes)
    if B == 0 or NB == 0 or Hq == 0:
        return out_shape, _MODE_EMPTY, None, None, None, None, 0, 0
    Hkv, max_slots = kc.shape[1], kc.shape[0]
    n_req_rows, width = req_to_token.shape
    if max_slots == 0 or n_req_rows == 0 or width == 0:
        return out_shape, _MODE_NEG, None, None, None, None, 0, 0  # no key can be read: all -inf
    TN, tpp, n_chunks = decode_score_plan(cfg, D, block_size, NB, B * Hkv, sms)
    G = Hq // Hkv
    GP = max(16, triton.next_power_of_2(G))
    grid = (n_chunks * B * Hkv,)
    args = (*q.stride(), *kc.stride(), *req_to_token.stride(), seq_lens.stride(0), slot_ids.stride(0), width,
            n_req_rows, max_slots, G, Hkv, B, NB, n_chunks, tpp)
    cx = (D, block_size, TN, GP, lse, use_pdl(cfg.pdl, major))  # constexprs D, BS, TN, GP, LSE, USE_GDC
    return out_shape, _MODE_LAUNCH, grid, args, cx, (key, cx, n_chunks, tpp), cfg.num_warps, cfg.num_stages


def block_scores(q: torch.Tensor, k_cache: torch.Tensor, req_to_token: torch.Tensor, seq_lens: torch.Tensor,
                 slot_ids: torch.Tensor, NB: int, block_size: int, sm_scale: float, lse: bool) -> torch.Tensor:
    """Launch of the block-score kernel on validated arguments: q [B, Hq, D], k_cache [max_slots, Hkv, D] ->
    fp32 block scores [Hq, B, NB].

    Grid: one program per (request, KV head, chunk of tiles); host ints only (CUDA-graph safe). The launch plan
    is cached (``_PLAN_CACHE``), so a repeated call costs a dict look-up, the output allocation and the launch.
    """
    if not q.is_cuda:  # CPU (Triton interpreter): widen the dtypes it cannot compute in
        if q.dtype == torch.bfloat16:
            q = q.float()
        if k_cache.dtype in (torch.bfloat16, torch.float8_e4m3fn):
            k_cache = k_cache.float()
    changes = tuning.current().decode_scores
    key = (q.device, q.dtype, q.shape, q.stride(), k_cache.dtype, k_cache.shape, k_cache.stride(),
           req_to_token.dtype, req_to_token.shape, req_to_token.stride(), seq_lens.dtype, seq_lens.stride(),
           slot_ids.dtype, slot_ids.stride(), NB, block_size, lse, changes)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _make_plan(key, changes, q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, lse)
        if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    out_shape, mode, grid, args, cx, lkey, num_warps, num_stages = plan
    out = torch.empty(out_shape, dtype=torch.float32, device=q.device)
    if mode == _MODE_LAUNCH:
        # direct launch of the compiled kernel once this signature has run (lkey fixes every dtype, shape, stride,
        # host int and constexpr of the launch)
        _SCORE_LAUNCHER(grid, (q, k_cache, req_to_token, seq_lens, slot_ids, out) + args + (float(sm_scale),) + cx,
                        key=lkey, num_warps=num_warps, num_stages=num_stages, n_ptr=6, launch_pdl=cx[-1])
    elif mode == _MODE_NEG:
        out.fill_(float("-inf"))
    return out


_SCORE_LAUNCHER = TritonLauncher(_decode_block_scores_kernel)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions (scripts/aot_check.py; see _aot.py)
# ----------------------------------------------------------------------------------------------
def aot_configs(arch: int, full: bool = False):
    """Block-score launch configurations: ``DECODE_SCORE_CONFIGS[major]`` (tile TN per head dim, warps, stages),
    D 64/128/256, block size 16..512 (whole blocks per tile or several tiles per block), GP 16..64 (Q heads per
    KV head, padded), max / lse, q bf16/fp16, K q's dtype or fp8.
    """
    from ._aot import AotConfig, dedupe, major_of

    out = []
    dts = [("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp8e4nv")]
    cfg = decode_score_config(major_of(arch))
    gps = (16, 32, 64) if full else (16, 64)
    for D in (64, 128, 256):
        TN = cfg.tn[D]
        for BS in ((16, 32, 64, 128, 256, 512) if full else (16, 128, 512)):
            for qd, kd in (dts if (full or D == 128) else dts[:1]):
                for lse in ((False, True) if full else ((False, True) if (D == 128 and BS == 128) else (True,))):
                    for GP in (gps if (full or (D == 128 and BS == 128)) else gps[:1]):
                        args = dict(q_ptr="*" + qd, k_ptr="*" + kd, r2t_ptr="*i32", seq_ptr="*i32", slot_ptr="*i32",
                                    out_ptr="*fp32", sqb="i32:D", sqh="i32:D", sqd=1, skt="i32:D", skh="i32:D",
                                    skd=1, srr="i32:D", src=1, s_seq=1, s_slot=1, width="i32", n_rows="i32",
                                    max_slots="i32", G="i32", Hkv=1, B="i32", NB="i32", n_chunks="i32",
                                    tiles_per_prog="i32", sm_scale="fp32", D=D, BS=BS, TN=TN, GP=GP, LSE=lse,
                                    USE_GDC=bool(cfg.pdl))
                        out.append(AotConfig(_decode_block_scores_kernel, args, cfg.num_warps, cfg.num_stages,
                                             f"blkscore D{D} BS{BS} TN{TN} GP{GP} q{qd}/k{kd} lse{int(lse)}",
                                             hot=True))
    return dedupe(out)
