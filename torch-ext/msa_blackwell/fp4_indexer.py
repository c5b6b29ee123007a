"""FP4 indexer block scores (API.md §5.14, §11.4).

``fp4_indexer_block_scores`` computes, for every query token ``t`` and Q head ``h``, the max over
each 128-token KV block ``j`` of the raw dot products ``<deq(q[t, h]), deq(k[x, h // G])>``
(FP4 E2M1 values times per-group scales; no softmax scale), masked by length, page count and an
optional bottom-right causal limit. Output fp32 ``[Hq, NB, total_q]``, ``NB = ceil(max_seqlen_k/128)``.

Kernel (``_fp4_indexer_kernel``, tensor cores):

* **Work split.** One program per (KV-block chunk ``c``, request ``b``, KV head ``g``, group of ``BLOCK_H``
  of its ``G`` Q heads, tile of ``BLOCK_M`` query tokens). The ``BLOCK_H`` heads are folded into the MMA M
  dimension (``rows = BLOCK_H * BLOCK_M``, head-major), so each K page is decoded once for all the heads
  that share it. Outputs are per (query row, KV block), so KV blocks split across programs with no
  combine step: program ``c`` owns blocks ``[c * chunk, min((c + 1) * chunk, NB))`` and writes every one
  of them for its rows (scores, or -inf past the request's valid / causal range, without reading any
  page). ``chunk`` is chosen on the host so that the grid fills the GPU (``Fp4IndexerConfig.waves``).
* **Operands.** Q (once per program) and each K sub-tile of ``BLOCK_N`` slots are decoded to the MMA
  operand dtype: E2M1 x E4M3 (nvfp4) is exact in **fp16** (2 x 4 significant bits, magnitudes in
  [2^-10, 2688]); E2M1 x E8M0 (mxfp4) is exact in **bf16** (power-of-two scales, fp32 exponent range);
  decoded float scales (arbitrary values) keep the fp32 operands and tf32 dots of the previous kernel.
  Under the CPU interpreter bf16 is replaced by fp32 ("ieee") dots. Even / odd elements of a packed
  byte feed two ``tl.dot`` of K = 64 into one fp32 accumulator.
* **Masks.** Blocks entirely inside the valid and causal range of the whole tile take a mask-free loop;
  the boundary blocks a masked one. Missing pages (``j`` past the request's page count, page id -1 or
  out of range, ``kv_indices`` position out of range) are never read and give -inf.
* **Every output element is written.** Extra "fill" programs (after the main grid) write -inf for the
  output rows no request's tile owns: rows before ``cu_seqlens_q[0]`` or after ``cu_seqlens_q[B]``, and rows
  past the first ``max_seqlen_q`` tokens of a request (a caller error, answered -inf whatever the tile
  size). Ownership is found per row by a binary search over ``cu_seqlens_q``, confirmed by a scan of every
  request where the search finds no owner, so the output is allocated uninitialised with no memset pass and
  no host sync. (For a non-monotone ``cu_seqlens_q`` whose requests overlap, the overlapping rows are
  written by both requests.)
"""

from dataclasses import dataclass
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._registry import add_op_namespace_prefix
from ._validate import check_devices, check_host_int, check_tensor, interpreter_active
from .nvfp4 import _e4m3_code_to_f32

__all__ = ["fp4_indexer_block_scores"]

_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_FP4X2 = getattr(torch, "float4_e2m1fn_x2", None)
_PACKED_DTYPES = tuple(d for d in (torch.uint8, torch.int8, _FP4X2) if d is not None)
_FLOAT_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

FMT_NVFP4, FMT_MXFP4 = 0, 1
SK_E4M3, SK_E8M0, SK_FLOAT = 0, 1, 2
# MMA operand dtype of the decoded values (``OP`` constexpr)
OP_F16, OP_BF16, OP_TF32, OP_F32 = 0, 1, 2, 3
FILL_T = 64  # query rows per fill program
_BIG = tl.constexpr(1 << 30)


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fp4IndexerConfig:
    """One launch configuration of ``_fp4_indexer_kernel``.

    ``rows``: MMA M tile of a program (``BLOCK_H`` Q heads x ``BLOCK_M`` query tokens, see ``tile_for``) with
    fp16 operands (nvfp4); ``wide_rows``: the same for the other operand kinds (bf16 for mxfp4, fp32 / tf32
    for decoded float scales: their decode holds more registers); ``block_n``: KV slots per MMA sub-tile (64 or
    128; a 128-token page is ``128 // block_n`` sub-tiles); ``num_warps`` / ``num_stages``: Triton launch
    options; ``waves``: the KV-chunk split aims at ``waves x SM count`` programs; ``min_chunk``: fewest KV
    blocks per program (bounds the Q decode that each program repeats).
    """

    rows: int
    wide_rows: int
    block_n: int
    num_warps: int
    num_stages: int
    waves: int = 4
    min_chunk: int = 2


# compute-capability major -> ((largest max_seqlen_q or None = any, config), ...): first match wins.
# sm_90 (wgmma): 256 rows, 128-slot sub-tiles, 4 waves for every chunk length (H100 sweep,
# benchmarks/bench_fp4_indexer.py --sweep, nvfp4, causal: T = 256 at 32K 47 us, T = 512 at 1M 1.74 ms,
# T = 4096 at 128K 1.73 ms = 42% of the bf16 matmul rate; the earlier entries, 128 rows / 128 slots for short
# chunks and 256 rows / 64 slots for long ones, took 58 us / 2.10 ms / 2.04 ms). sm_100 (tcgen05): 128 rows,
# 64-slot sub-tiles (256 rows spill in the non-causal loop, so do 128-slot sub-tiles with bf16 operands), 64 rows
# for bf16 / fp32 operands. sm_12x (mma.sync keeps both operands in registers): 32 rows, 4 warps (64 rows spill
# with public-layout scales, 128 rows always). Every entry is spill-free in the MMA loops on its targets per
# scripts/aot_check.py; the sm_100 / sm_12x choices are unmeasured first choices, to be re-tuned with
# ``benchmarks/bench_fp4_indexer.py --sweep``.
# None: the CPU interpreter (small tiles, several head groups and KV chunks, so tests reach every path).
FP4_INDEXER_CONFIGS = {
    9: ((None, Fp4IndexerConfig(rows=256, wide_rows=128, block_n=128, num_warps=8, num_stages=2)),),
    10: ((None, Fp4IndexerConfig(rows=128, wide_rows=64, block_n=64, num_warps=8, num_stages=2)),),
    12: ((None, Fp4IndexerConfig(rows=32, wide_rows=32, block_n=64, num_warps=4, num_stages=2)),),
    None: ((None, Fp4IndexerConfig(rows=32, wide_rows=32, block_n=64, num_warps=4, num_stages=1, waves=2,
                                   min_chunk=1)),),
}
_SM_COUNT_CPU = 8


def config_table(major):
    """The ``FP4_INDEXER_CONFIGS`` entry used on compute-capability major ``major`` (None: interpreter)."""
    if major is None:
        return FP4_INDEXER_CONFIGS[None]
    if major in FP4_INDEXER_CONFIGS:
        return FP4_INDEXER_CONFIGS[major]
    return FP4_INDEXER_CONFIGS[10 if major == 11 else 12]


def config_for(major, max_seqlen_q: int) -> Fp4IndexerConfig:
    for qmax, cfg in config_table(major):
        if qmax is None or max_seqlen_q <= qmax:
            return cfg
    return config_table(major)[-1][1]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tile_for(cfg: Fp4IndexerConfig, G: int, max_seqlen_q: int, wide: bool = False):
    """(BLOCK_M, BLOCK_H) for ``G`` Q heads per KV head: as many heads as fit the rows (``cfg.wide_rows`` for
    non-fp16 operands) with at least 16 tokens, then tokens, halved while the chunk has at most half of them
    (never below 16)."""
    rows = cfg.wide_rows if wide else cfg.rows
    bh = min(_next_pow2(G), max(1, rows // 16))
    bm = max(16, rows // bh)
    while bm > 16 and bm // 2 >= max_seqlen_q:
        bm //= 2
    return bm, bh


@functools.lru_cache(maxsize=4096)
def plan_chunks(cfg: Fp4IndexerConfig, tiles: int, NB: int, sms: int):
    """(chunk, n_chunks): KV blocks per program and programs per tile. At least ``cfg.waves x sms`` programs
    (when the blocks allow); among up to 8x that many, the split with the least modelled time
    ``ceil(programs / sms) x (chunk + 1)`` (whole waves of equal chunks; + 1 block for the Q decode each
    program repeats), fewer programs on ties. Cached per shape (host cost once)."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    NB, tiles = max(1, NB), max(1, tiles)
    n_min = max(1, min(NB, cdiv(cfg.waves * sms, tiles)))
    if n_min == 1:
        return NB, 1
    n_max = min(NB, 8 * n_min)
    c_lo, c_hi = max(1, cfg.min_chunk, cdiv(NB, n_max)), max(1, cfg.min_chunk, cdiv(NB, n_min))
    if c_hi - c_lo < n_max - n_min:
        chunks = range(c_lo, c_hi + 1)
    else:
        chunks = sorted({max(1, cfg.min_chunk, cdiv(NB, n)) for n in range(n_min, n_max + 1)})
    best = None
    for c in chunks:
        c = min(c, NB)
        n = cdiv(NB, c)
        key = (cdiv(tiles * n, sms) * (c + 1), n)
        if best is None or key < best[0]:
            best = (key, c, n)
    return best[1], best[2]


@functools.lru_cache(maxsize=None)
def _device_info(device_type: str, index):
    """(capability major or None, SM count), read once per device (host query, no sync)."""
    if device_type != "cuda" or interpreter_active():
        return None, _SM_COUNT_CPU
    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    return props.major, props.multi_processor_count


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

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
def _dequant_pair(byte, sc, OP: tl.constexpr):
    """Packed bytes (int32 0..255) and their fp32 group scales (broadcastable) -> (element 2i, element 2i+1)
    in the MMA operand dtype: fp16 products for OP_F16 (exact), otherwise fp32 products (exact for E8M0 and
    E4M3 scales), cast to bf16 for OP_BF16 (exact for power-of-two scales)."""
    # E2M1 nibble -> fp16 bits: sign -> bit 15, exponent (2 bits) -> bits 11:10, mantissa -> bit 9; the fp16 value
    # is e2m1 * 2^-14 exactly (the subnormal codes 0 and 0.5 included), times 2^14 (exact) = e2m1 in fp16
    c14 = tl.full([1], 16384.0, tl.float16)
    lo = (((byte & 7) << 9) | ((byte & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True) * c14
    hi = (((byte & 0x70) << 5) | ((byte & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True) * c14
    if OP == 0:
        s16 = sc.to(tl.float16)  # E4M3 values are exact in fp16, and so is e2m1 x E4M3 (<= 2688, 6 bits)
        lo = lo * s16
        hi = hi * s16
    else:
        lo = lo.to(tl.float32) * sc
        hi = hi.to(tl.float32) * sc
        if OP == 1:
            lo = lo.to(tl.bfloat16)
            hi = hi.to(tl.bfloat16)
    return lo, hi


@triton.jit
def _subtile_rowmax(q_lo, q_hi, k_ptr, ks_ptr, page_c, page_ok, g, Hkv, j, n0, i_rows, Lk, off,
                    sk0, sk1, sk2, sk3, kss0, kss1, kss2, kss3,
                    GS: tl.constexpr, SCALE_KIND: tl.constexpr, PREORDERED: tl.constexpr, CAUSAL: tl.constexpr,
                    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, OP: tl.constexpr):
    """Row max over slots ``[n0, n0 + BLOCK_N)`` of one page: decode the K sub-tile, two MMAs, mask, max."""
    HB: tl.constexpr = GS // 2  # packed bytes per scale group
    NG: tl.constexpr = 64 // HB  # scale groups per row
    s = n0 + tl.arange(0, BLOCK_N)
    gi = tl.arange(0, NG)
    wi = tl.arange(0, HB)
    kbase = k_ptr + page_c * sk0 + g * sk1
    # masks shaped like the tile (not the scalar page_ok: Triton 3.9's interpreter rejects scalar tile masks)
    pm2 = tl.where(page_ok, s[:, None] >= 0, False) & (gi[None, :] >= 0)
    pm3 = pm2[:, :, None] & (wi[None, None, :] >= 0)
    kbytes = tl.load(kbase + s[:, None, None] * sk2 + (gi[:, None] * HB + wi[None, :])[None, :, :] * sk3,
                     mask=pm3, other=0).to(tl.int32) & 0xFF
    if PREORDERED:
        l_k = page_c * Hkv + g
        ksoff = (l_k * (512 * ((NG + 3) // 4)) + (gi[None, :] // 4) * 512 + (s[:, None] % 32) * 16
                 + (s[:, None] // 32) * 4 + gi[None, :] % 4)
    else:
        ksoff = page_c * kss0 + g * kss1 + s[:, None] * kss2 + gi[None, :] * kss3
    ksc = _decode_scale(tl.load(ks_ptr + ksoff, mask=pm2, other=0), SCALE_KIND)
    k_lo, k_hi = _dequant_pair(kbytes, ksc[:, :, None], OP)
    k_lo = tl.reshape(k_lo, [BLOCK_N, 64])
    k_hi = tl.reshape(k_hi, [BLOCK_N, 64])
    if OP == 2:
        acc = tl.dot(q_lo, tl.trans(k_lo), input_precision="tf32")
        acc = tl.dot(q_hi, tl.trans(k_hi), acc, input_precision="tf32")
    elif OP == 3:
        acc = tl.dot(q_lo, tl.trans(k_lo), input_precision="ieee")
        acc = tl.dot(q_hi, tl.trans(k_hi), acc, input_precision="ieee")
    else:
        acc = tl.dot(q_lo, tl.trans(k_lo))
        acc = tl.dot(q_hi, tl.trans(k_hi), acc)
    if MASKED:
        x = j * 128 + s
        vis = x[None, :] < Lk
        if CAUSAL:
            vis = vis & (x[None, :] <= (i_rows[:, None] + off))
        acc = tl.where(vis, acc, float("-inf"))
    return tl.max(acc, axis=1)


@triton.jit
def _block_rowmax(q_lo, q_hi, k_ptr, ks_ptr, kvi_ptr, p_start, j, n_kvi, total_pages, g, Hkv, i_rows, Lk, off,
                  sk0, sk1, sk2, sk3, kss0, kss1, kss2, kss3,
                  GS: tl.constexpr, SCALE_KIND: tl.constexpr, PREORDERED: tl.constexpr, CAUSAL: tl.constexpr,
                  MASKED: tl.constexpr, BLOCK_N: tl.constexpr, OP: tl.constexpr):
    """Row max of the scores of the tile's rows against logical KV block ``j`` (-inf: missing page)."""
    pidx = p_start + j
    page = tl.load(kvi_ptr + pidx, mask=(pidx >= 0) & (pidx < n_kvi), other=-1).to(tl.int64)
    page_ok = (page >= 0) & (page < total_pages)
    page_c = tl.where(page_ok, page, 0)
    m = _subtile_rowmax(q_lo, q_hi, k_ptr, ks_ptr, page_c, page_ok, g, Hkv, j, 0, i_rows, Lk, off,
                        sk0, sk1, sk2, sk3, kss0, kss1, kss2, kss3,
                        GS, SCALE_KIND, PREORDERED, CAUSAL, MASKED, BLOCK_N, OP)
    for n0 in tl.static_range(BLOCK_N, 128, BLOCK_N):
        m2 = _subtile_rowmax(q_lo, q_hi, k_ptr, ks_ptr, page_c, page_ok, g, Hkv, j, n0, i_rows, Lk, off,
                             sk0, sk1, sk2, sk3, kss0, kss1, kss2, kss3,
                             GS, SCALE_KIND, PREORDERED, CAUSAL, MASKED, BLOCK_N, OP)
        m = tl.maximum(m, m2)
    return tl.where(page_ok, m, float("-inf"))


@triton.jit
def _fp4_indexer_kernel(
    q_ptr, k_ptr, qs_ptr, ks_ptr, cu_q_ptr, cu_k_ptr, cu_p_ptr, kvi_ptr, qo_ptr, out_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3,
    qss0, qss1, qss2, kss0, kss1, kss2, kss3,
    total_q, total_pages, n_kvi, B, Hkv, G, NB, max_q, n_mtiles, n_hgroups, chunk, n_main, n_search,
    q_l_stride, q_rg,
    GS: tl.constexpr, SCALE_KIND: tl.constexpr, PREORDERED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_QO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    OP: tl.constexpr, FILL_T: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_H * BLOCK_M
    HB: tl.constexpr = GS // 2
    NG: tl.constexpr = 64 // HB
    pid = tl.program_id(0)
    total_q64 = total_q.to(tl.int64)
    if pid < n_main:
        # pid = (((c * B + b) * Hkv + g) * n_hgroups + hg) * n_mtiles + mt: the programs that share a K chunk
        # (all query tiles and head groups of one KV head) are adjacent, so they run together and share L2.
        mt = pid % n_mtiles
        r = pid // n_mtiles
        hg = r % n_hgroups
        r = r // n_hgroups
        g = r % Hkv
        r = r // Hkv
        b = r % B
        c = r // B
        q_start = tl.load(cu_q_ptr + b)
        Lq = tl.load(cu_q_ptr + b + 1) - q_start
        if mt * BLOCK_M < Lq:
            Lk = tl.load(cu_k_ptr + b + 1) - tl.load(cu_k_ptr + b)
            p_start = tl.load(cu_p_ptr + b)
            n_pages = tl.load(cu_p_ptr + b + 1) - p_start
            nb = tl.maximum(tl.minimum(tl.minimum((Lk + 127) // 128, n_pages), NB), 0)
            n_full = tl.maximum(tl.minimum(nb, Lk // 128), 0)  # blocks with all 128 slots < Lk
            if HAS_QO:
                off = tl.load(qo_ptr + b)
            else:
                off = Lk - Lq
            off = tl.minimum(tl.maximum(off, -_BIG), _BIG)
            i_first = mt * BLOCK_M
            i_last = tl.minimum(i_first + BLOCK_M, Lq) - 1
            nb_c = nb
            if CAUSAL:
                nb_c = tl.minimum(nb, tl.maximum((i_last + off + 128) // 128, 0))
                n_full = tl.minimum(n_full, tl.maximum((i_first + off + 1) // 128, 0))
            n_full = tl.minimum(n_full, nb_c)

            # rows: head-major (row = hh * BLOCK_M + token), so each head's stores are contiguous in t
            rr = tl.arange(0, ROWS)
            hl = hg * BLOCK_H + rr // BLOCK_M
            h = g * G + hl
            i_rows = i_first + rr % BLOCK_M
            t = q_start + i_rows
            row_ok = (i_rows < Lq) & (i_rows < max_q) & (hl < G) & (t >= 0) & (t < total_q)
            t64 = t.to(tl.int64)
            h64 = h.to(tl.int64)
            gi = tl.arange(0, NG)
            wi = tl.arange(0, HB)
            qm2 = row_ok[:, None] & (gi[None, :] >= 0)
            qm3 = qm2[:, :, None] & (wi[None, None, :] >= 0)
            qbytes = tl.load(q_ptr + t64[:, None, None] * sq0 + h64[:, None, None] * sq1
                             + (gi[:, None] * HB + wi[None, :])[None, :, :] * sq2, mask=qm3, other=0)
            qbytes = qbytes.to(tl.int32) & 0xFF
            if PREORDERED:
                tq = t64[:, None]
                qsoff = (h64[:, None] * q_l_stride + (tq // 128) * (512 * q_rg) + (gi[None, :] // 4) * 512
                         + (tq % 32) * 16 + ((tq % 128) // 32) * 4 + gi[None, :] % 4)
            else:
                qsoff = t64[:, None] * qss0 + h64[:, None] * qss1 + gi[None, :] * qss2
            qsc = _decode_scale(tl.load(qs_ptr + qsoff, mask=qm2, other=0), SCALE_KIND)
            q_lo, q_hi = _dequant_pair(qbytes, qsc[:, :, None], OP)
            q_lo = tl.reshape(q_lo, [ROWS, 64])
            q_hi = tl.reshape(q_hi, [ROWS, 64])

            out_row = out_ptr + h64 * NB * total_q64 + t64
            j_lo = c * chunk
            j_hi = tl.minimum(j_lo + chunk, NB)
            # blocks fully visible to every row of the tile: no mask
            for j in range(j_lo, tl.minimum(j_hi, n_full)):
                m = _block_rowmax(q_lo, q_hi, k_ptr, ks_ptr, kvi_ptr, p_start, j, n_kvi, total_pages, g, Hkv,
                                  i_rows, Lk, off, sk0, sk1, sk2, sk3, kss0, kss1, kss2, kss3,
                                  GS, SCALE_KIND, PREORDERED, CAUSAL, False, BLOCK_N, OP)
                tl.store(out_row + j * total_q64, m, mask=row_ok)
            # boundary blocks (length / causal limit inside the block for some row)
            for j in range(tl.maximum(j_lo, n_full), tl.minimum(j_hi, nb_c)):
                m = _block_rowmax(q_lo, q_hi, k_ptr, ks_ptr, kvi_ptr, p_start, j, n_kvi, total_pages, g, Hkv,
                                  i_rows, Lk, off, sk0, sk1, sk2, sk3, kss0, kss1, kss2, kss3,
                                  GS, SCALE_KIND, PREORDERED, CAUSAL, True, BLOCK_N, OP)
                tl.store(out_row + j * total_q64, m, mask=row_ok)
            neg = tl.full([ROWS], float("-inf"), tl.float32)
            for j in range(tl.maximum(j_lo, nb_c), j_hi):
                tl.store(out_row + j * total_q64, neg, mask=row_ok)
    else:
        # fill program: -inf for the rows of [t0, t0 + FILL_T) that no main program writes. Row t is owned by
        # request b = max{b : cu_q[b] <= t} (binary search) when cu_q[b] <= t < cu_q[b + 1] and its local index
        # is below max_seqlen_q; that request's tiles then write it (for any cu_seqlens_q).
        t = (pid - n_main) * FILL_T + tl.arange(0, FILL_T)
        lo = t * 0
        hi = lo + B
        for _ in range(n_search):
            act = lo < hi
            mid = (lo + hi + 1) // 2
            ok = tl.load(cu_q_ptr + mid) <= t
            lo = tl.where(act & ok, mid, lo)
            hi = tl.where(act & (~ok), mid - 1, hi)
        cb = tl.load(cu_q_ptr + lo)
        cb1 = tl.load(cu_q_ptr + lo + 1, mask=lo < B, other=0)
        owned = (lo < B) & (cb <= t) & (t < cb1) & ((t - cb) < max_q)
        if tl.max(((t < total_q) & (~owned)).to(tl.int32), axis=0) > 0:
            # some row not owned by the searched request (rows outside the requests, or a non-monotone
            # cu_seqlens_q): check every request before writing -inf, so no owned row is overwritten
            for bb in range(0, B):
                c0 = tl.load(cu_q_ptr + bb)
                c1 = tl.load(cu_q_ptr + bb + 1)
                owned = owned | ((c0 <= t) & (t < c1) & ((t - c0) < max_q))
            orphan = (t < total_q) & (~owned)
            neg = tl.full([FILL_T], float("-inf"), tl.float32)
            t64 = t.to(tl.int64)
            for hq in range(0, Hkv * G):
                for j in range(0, NB):
                    tl.store(out_ptr + (hq * NB + j).to(tl.int64) * total_q64 + t64, neg, mask=orphan)


def _operand_kind(scale_kind: int, on_cpu: bool) -> int:
    if scale_kind == SK_E4M3:
        return OP_F16
    if on_cpu:
        return OP_F32  # the interpreter's bf16 arithmetic is not exact; tf32 is not emulated
    return OP_BF16 if scale_kind == SK_E8M0 else OP_TF32


def _launch(q, k, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, kv_indices, qo_offset,
            max_seqlen_q: int, NB: int, fmt: int, scale_kind: int, preordered: bool, causal: bool, out,
            cfg: Optional[Fp4IndexerConfig] = None, chunk: Optional[int] = None):
    """Launch ``_fp4_indexer_kernel`` into ``out [Hq, NB, total_q]`` (every element written). ``cfg`` / ``chunk``
    override the table and the chunk plan (tests and the benchmark's sweep); returns the launch description."""
    total_q, Hq = int(q.shape[0]), int(q.shape[1])
    P, Hkv = int(k.shape[0]), int(k.shape[1])
    B = int(cu_seqlens_q.shape[0]) - 1
    G = Hq // Hkv
    GS = 16 if fmt == FMT_NVFP4 else 32
    Gs = 128 // GS
    on_cpu = q.device.type != "cuda"
    major, sms = _device_info(q.device.type, q.device.index)
    if cfg is None:
        cfg = config_for(major, max_seqlen_q)
    if on_cpu and scale_kind == SK_FLOAT and q_scale.dtype == torch.bfloat16:
        q_scale = q_scale.float()
    if on_cpu and scale_kind == SK_FLOAT and k_scale.dtype == torch.bfloat16:
        k_scale = k_scale.float()
    rg = (Gs + 3) // 4
    rmq = (total_q + 127) // 128
    if preordered:
        qss = (0, 0, 0)
        kss = (0, 0, 0, 0)
    else:
        qss = tuple(int(s) for s in q_scale.stride())
        kss = tuple(int(s) for s in k_scale.stride())
    op = _operand_kind(scale_kind, on_cpu)
    block_m, block_h = tile_for(cfg, G, max_seqlen_q, wide=op != OP_F16)
    n_mtiles = triton.cdiv(max_seqlen_q, block_m) if B > 0 else 0
    n_hgroups = triton.cdiv(G, block_h)
    tiles = B * n_mtiles * Hkv * n_hgroups
    plan_chunk, n_chunks = plan_chunks(cfg, tiles, NB, sms)
    if chunk is not None:
        plan_chunk, n_chunks = int(chunk), triton.cdiv(NB, int(chunk))
    n_main = tiles * n_chunks
    n_fill = triton.cdiv(total_q, FILL_T)
    if n_main + n_fill >= 2**31:
        raise ValueError("fp4_indexer_block_scores: problem too large for one launch")
    qo = qo_offset if qo_offset is not None else cu_seqlens_q
    _fp4_indexer_kernel[(n_main + n_fill,)](
        q, k, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, kv_indices, qo, out,
        *q.stride(), *k.stride(), *qss, *kss,
        total_q, P, int(kv_indices.shape[0]), B, Hkv, G, NB, max_seqlen_q, max(n_mtiles, 1), n_hgroups, plan_chunk,
        n_main,
        max(B, 1).bit_length(), 512 * rmq * rg, rg,
        GS=GS, SCALE_KIND=scale_kind, PREORDERED=preordered, CAUSAL=causal, HAS_QO=qo_offset is not None,
        BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_N=cfg.block_n, OP=op, FILL_T=FILL_T,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dict(cfg=cfg, block_m=block_m, block_h=block_h, chunk=plan_chunk, n_chunks=n_chunks, n_main=n_main,
                n_fill=n_fill)


@torch.library.custom_op(add_op_namespace_prefix("fp4_indexer_block_scores"), mutates_args=())
def _fp4_indexer_op(q: torch.Tensor, k: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, cu_page_offsets: torch.Tensor,
                    kv_indices: torch.Tensor, qo_offset: Optional[torch.Tensor], max_seqlen_q: int,
                    max_seqlen_k: int, fmt: int, scale_kind: int, preordered: bool, causal: bool) -> torch.Tensor:
    """q uint8 [total_q, Hq, 64], k uint8 [P, Hkv, 128, 64] -> fp32 scores [Hq, NB, total_q]."""
    total_q, Hq = int(q.shape[0]), int(q.shape[1])
    NB = (max_seqlen_k + 127) // 128
    B = int(cu_seqlens_q.shape[0]) - 1
    out = torch.empty(Hq, NB, total_q, dtype=torch.float32, device=q.device)
    if NB == 0 or total_q == 0 or Hq == 0:
        return out
    if B <= 0 or max_seqlen_q <= 0:
        return out.fill_(float("-inf"))
    _launch(q, k, q_scale, k_scale, cu_seqlens_q, cu_seqlens_k, cu_page_offsets, kv_indices, qo_offset,
            max_seqlen_q, NB, fmt, scale_kind, preordered, causal, out)
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

_AOT_G = (1, 2, 3, 4, 8, 16, 64)
_AOT_T = (1, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 4096)


def runtime_tiles(major, wide: bool = False):
    """Every (config, BLOCK_M, BLOCK_H) the launch can choose on compute-capability major ``major`` for fp16
    (``wide=False``) or bf16 / fp32 operands (``config_for`` x ``tile_for`` over head-group sizes and chunk
    lengths; larger G give the same tiles as 16)."""
    out = {}
    for G in _AOT_G:
        for T in _AOT_T:
            cfg = config_for(major, T)
            bm, bh = tile_for(cfg, G, T, wide)
            out.setdefault((cfg, bm, bh), (G, T))
    return out


def _aot_variants():
    """(label, GS, scale kind, scale pointer type, preordered, operand kind) of the GPU launch paths."""
    out = []
    for gs, sk in ((16, SK_E4M3), (32, SK_E8M0)):
        op = _operand_kind(sk, False)
        fmt = "nv" if gs == 16 else "mx"
        out += [(f"{fmt} pub", gs, sk, "*u8", False, op), (f"{fmt} pre", gs, sk, "*u8", True, op)]
        out += [(f"{fmt} f{t[-2:]}", gs, SK_FLOAT, t, False, _operand_kind(SK_FLOAT, False))
                for t in ("*fp32", "*bf16", "*fp16")]
    return out


def aot_configs(arch: int, full: bool = False):
    """FP4 indexer launch configurations from ``FP4_INDEXER_CONFIGS`` (via ``runtime_tiles``).

    ``_fp4_indexer_kernel`` (hot: no spills allowed in the MMA loops): every tile the runtime can choose x
    nvfp4 (GS 16, e4m3 scales, fp16 MMA) / mxfp4 (GS 32, e8m0, bf16 MMA) / decoded float scales (tf32 MMA),
    public / preordered layout, causal (+ qo_offset). CI subset: every tile with the preordered causal +
    qo_offset launch of its operand class; the M3 tiles (G = 4 Q heads per KV head) of every table entry with
    every format path (one float-scale dtype) and the non-causal / no-qo_offset launches.
    """
    from ._aot import AotConfig, dedupe, major_of

    major = major_of(arch)
    cflags = [(False, False), (True, False), (True, True)]
    out = []
    for wide in (False, True):
        variants = [v for v in _aot_variants() if (v[5] != OP_F16) == wide]
        main_variant = [v for v in variants if v[4]][0]  # preordered: nvfp4 (fp16) / mxfp4 (bf16)
        m3 = {(cfg,) + tile_for(cfg, 4, qmax or 4096, wide) for qmax, cfg in config_table(major)}
        for (cfg, bm, bh) in runtime_tiles(major, wide):
            if full:
                combos = [(v, cf) for v in variants for cf in cflags]
            elif (cfg, bm, bh) in m3:
                combos = [(v, (True, True)) for v in variants if v[3] in ("*u8", "*fp32")]
                combos += [(main_variant, cf) for cf in cflags[:2]]
            else:
                combos = [(main_variant, (True, True))]
            for (vlabel, gs, sk, st, pre, op), (causal, qo) in combos:
                args = dict(q_ptr="*u8", k_ptr="*u8", qs_ptr=st, ks_ptr=st, cu_q_ptr="*i32", cu_k_ptr="*i32",
                            cu_p_ptr="*i32", kvi_ptr="*i32", qo_ptr="*i32", out_ptr="*fp32",
                            sq0="i32:D", sq1="i32:D", sq2=1, sk0="i32:D", sk1="i32:D", sk2="i32:D", sk3=1,
                            qss0="i32:D", qss1="i32:D" if pre else "i32", qss2="i32:D" if pre else 1,
                            kss0="i32:D", kss1="i32:D" if pre else "i32", kss2="i32:D" if pre else "i32",
                            kss3="i32:D" if pre else 1, total_q="i32", total_pages="i32", n_kvi="i32", B="i32",
                            Hkv="i32", G="i32", NB="i32", max_q="i32", n_mtiles="i32", n_hgroups="i32", chunk="i32",
                            n_main="i32", n_search="i32", q_l_stride="i32:D", q_rg="i32",
                            GS=gs, SCALE_KIND=sk, PREORDERED=pre, CAUSAL=causal, HAS_QO=qo, BLOCK_M=bm, BLOCK_H=bh,
                            BLOCK_N=cfg.block_n, OP=op, FILL_T=FILL_T)
                out.append(AotConfig(_fp4_indexer_kernel, args, cfg.num_warps, cfg.num_stages,
                                     f"fp4idx M{bm}xH{bh} N{cfg.block_n} {vlabel} c{int(causal)}qo{int(qo)}",
                                     hot=True))
    return dedupe(out)
