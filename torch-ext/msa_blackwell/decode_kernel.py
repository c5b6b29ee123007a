"""One split-KV Triton decode kernel for both KV layouts (docs/API.md §5.1, §5.2, §6.2), plus its host-side
launch policy: the per-architecture ``DECODE_CONFIGS`` table, ``make_plan`` and ``aot_configs``.

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
- Set semantics (docs/API.md §3.2): a tile whose block id already occurred earlier in the tile list is
  skipped (duplicates count once), ids < 0 / out of range / beyond the page table are skipped and
  never dereferenced; a row ``m`` only sees tiles of blocks that occur in its own token's index row.
- Combine (``NUM_SPLITS > 1``): every split writes fp32 partials ``(acc, m, l)`` (log2 domain),
  then increments a per-``(b, g, m_tile)`` counter with ``acq_rel`` semantics; the program that
  sees ``NUM_SPLITS - 1`` (the last to finish) reads all partials in fixed split order (so the
  result does not depend on which program is last), writes O / LSE and resets the counter to 0,
  leaving the counter buffer zeroed for the next launch (self-cleaning).

K/V formats (constexpr ``KV_FMT``): 0 = bf16 / fp16 / fp8 K/V (every NVFP4 part of the kernel sits behind
``KV_FMT == 1``); 1 = packed NVFP4 (HND only, no sink):
``K, V`` uint8 ``[P, Hkv, BS, D/2]``, ``KSC, VSC`` the flat 128x4-swizzled E4M3 scale bytes (scale row
``(page * Hkv + g) * BS + slot``), ``KGS, VGS`` the fp32 global scales (element 0; ``HAS_KG`` /
``HAS_VG`` False = 1.0). Each K/V tile is decoded in registers into an even-element and an odd-element
fp16 tile (``_fp4_kv_tiles``, see the NVFP4 section below; ``FP4_DEC`` picks the PTX or the portable
decoder), QK^T = q_even . K_even^T + q_odd . K_odd^T, PV into even / odd output halves. ``k_global * FP4_POW2``
folds into the logit scale (``qk_row``; LSE consistent), ``v_global * FP4_POW2`` multiplies the final O once
(``_nvfp4_epilogue``; split partials stay unscaled, layout ``[even half | odd half]``).
"""

import copy
import dataclasses
import functools
from typing import Mapping

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import LOG2E, TableEntry, device_info
from ._launch import TritonLauncher, use_pdl
from .nvfp4_tile import (FP4_ASM_F16, FP4_DEC_ASM, FP4_DEC_PORTABLE, FP4_POW2, e2m1_nibbles_f16, e4m3_times_128_f16,
                         nvfp4_decode_bytes_f16, nvfp4_load_bytes, nvfp4_q_pow2, nvfp4_scale_bytes)

LAYOUT_HND = 0
LAYOUT_TOKEN = 1


@dataclasses.dataclass(frozen=True)
class DecodeConfig(TableEntry):
    """One entry of the decode launch table (``DECODE_CONFIGS``, keyed by compute-capability major).

    Per head dim D (dicts D -> int): ``block_n`` tokens per KV tile, ``num_warps``, ``m_cap`` the largest
    BLOCK_M (M tile rows). Split policy:

    - ``ctas_per_sm``: target number of programs per SM when choosing the split count;
    - ``combine_budget``: max bytes of partials (rows * D * 4 per split) the last program reads;
    - ``min_tiles_split``: a split gets at least this many BLOCK_N tiles; ``max_splits``: hard cap;
    - ``big_tiles``: if every split would still own >= this many tiles, the combine budget may be exceeded
      (long dense contexts), up to ``max_splits``;
    - ``chunk_max``: tiles whose index work (ids, dedupe, page lookups) is vectorised per chunk; a sparse
      chunk also holds a ``[chunk, TOK_P2, TK_P2]`` compare of at most ``chunk_elems`` elements;
    - ``pdl``: 1 = programmatic dependent launch (sm_90+): the kernel may be scheduled while the previous kernel
      of its stream finishes (it waits for it before touching memory) and lets the next kernel do the same;
    - ``slot_pre_units``: token layout: the slot ids of a chunk's tiles are loaded before its tile loop (K/V
      addresses then depend on registers only) when the grid has at most this many programs per SM; above
      it, per tile (fewer registers, latency hidden by occupancy). H100, 32K, top-16, M3 shape: preload
      14.3 / 26.1 / 103 us at B = 1 / 8 / 64 (per tile: 19.5 / 38.8 / 139), but 222 us at B = 128 (per
      tile: 195). ``slot_pre_units_8bit``: the same for fp8 K/V (H100, B = 128, fp8: per tile 342 us, preload
      183 us);

    ``tuning.override(decode=..., decode_nvfp4=...)`` changes fields of the entry a launch uses.
    """

    PER_HEAD_DIM = ("block_n", "num_warps", "m_cap")
    ZERO_OK = ("slot_pre_units", "slot_pre_units_8bit", "pdl")

    block_n: Mapping[int, int]
    num_warps: Mapping[int, int]
    m_cap: Mapping[int, int]
    num_stages: int = 3
    ctas_per_sm: int = 2
    combine_budget: int = 128 * 1024
    min_tiles_split: int = 1
    max_splits: int = 64
    big_tiles: int = 32
    chunk_max: int = 16
    chunk_elems: int = 4096
    slot_pre_units: int = 2
    slot_pre_units_8bit: int = 2
    pdl: int = 0


_BASE = DecodeConfig(block_n={64: 64, 128: 64, 256: 32}, num_warps={64: 4, 128: 4, 256: 8},
                     m_cap={64: 64, 128: 64, 256: 32})
DECODE_CONFIGS = {
    # Hopper: 228 KB smem per SM. One program per (b, g) once that fills the SMs once: at B = 64 (256 units)
    # S = 1 measured 97.6 us vs 112 us for S = 2 (H100 sweep); B = 1 / 8 unchanged.
    9: dataclasses.replace(_BASE, ctas_per_sm=1, slot_pre_units_8bit=1024),
    # Blackwell: M tiles of at most 32 rows at D = 128 (64-row tiles spill inside the MMA loop there: sm_100
    # 370-600 LDL/STL, sm_12x fp8 39; scripts/aot_check.py, Triton 3.8). Unmeasured.
    10: dataclasses.replace(_BASE, m_cap={64: 64, 128: 32, 256: 32}),  # datacenter Blackwell
    # consumer Blackwell: ~99 KB smem per block
    12: dataclasses.replace(_BASE, num_stages=2, m_cap={64: 64, 128: 32, 256: 32}),
    None: dataclasses.replace(_BASE, num_stages=1),  # interpreter / other
}

_SM_COUNT_CPU = 8  # interpreter: small, but enough to exercise the split + combine path

# Packed NVFP4 K/V launches use the ``DECODE_CONFIGS`` entry of their major with these field changes
# (``DecodeConfig.changes`` form; a missing major = the element-K/V entry). sm_90 is measured (below); the others
# are compile-time (SASS) choices; sweep with benchmarks/bench_decode.py (MSA_DECODE_SWEEP=nvfp4).
# - sm_100: 8 warps. The NVFP4 tile loop issues ~790 SASS instructions per 64-token tile and warp with 4 warps
#   (bf16: ~540) at 200 registers, i.e. 2 CTAs = 8 warps per SM; with 8 warps the kernel fits 128 registers, so
#   16 warps per SM hide the decode's latency (no spill in the main loop).
# - sm_100: BLOCK_M 64 (G * seqlen_q > 32) would use tcgen05 MMAs, whose software pipeliner cannot
#   predicate the decoder's (deliberately non-pure) inline asm, and sm_12x's BLOCK_M 64 spills inside the
#   main loop (2-stage schedule, 4 or 8 warps; scripts/aot_check.py): M tiles are capped at 32 rows there
#   (mma.sync path; G * seqlen_q = 64 then takes two M tiles).
NVFP4_CONFIG_OVERRIDES = {
    # sm_90 measured (H100 sweep, 32K, top-16, M3 shape): 4 warps + BLOCK_N 128 + 2 stages is the best at
    # B = 1 / 8 / 64 (16.2 / 25.9 / 92.5 us vs 16.8 / 38.4 / 128 us for 8 warps, BLOCK_N 64, 3 stages).
    # BLOCK_M 64 (G * seqlen_q > 32) spills inside the main loop at BLOCK_N 128 / 4 warps (aot_check): M tiles
    # are capped at 32 rows (G * seqlen_q = 64 takes two M tiles; the M3 decode shape G = 16 is unaffected).
    9: DecodeConfig.changes("NVFP4_CONFIG_OVERRIDES[9]", dict(block_n={128: 128}, num_stages=2, m_cap={128: 32})),
    10: DecodeConfig.changes("NVFP4_CONFIG_OVERRIDES[10]", dict(num_warps={128: 8}, m_cap={128: 32})),
    12: DecodeConfig.changes("NVFP4_CONFIG_OVERRIDES[12]", dict(m_cap={128: 32})),
}


# Triton-version-dependent changes (``DecodeConfig.changes`` form), keyed by (Triton (major, minor), compute-capability
# major, nvfp4): under a Triton >= that version, the newest entry of a (major, nvfp4) applies on top of the entry above
# (element K/V: DECODE_CONFIGS; NVFP4: with NVFP4_CONFIG_OVERRIDES). The tables above are the Triton 3.8 (measured)
# choices; these are compile-time (SASS) choices, unmeasured. Triton 3.9 on sm_90 (scripts/aot_check.py; LDL/STL
# inside the MMA loop, 3.8: none): element K/V sparse BLOCK_M 32 / 64 at 4 warps 1 / 8 (8 warps: none, every class);
# NVFP4 BLOCK_M 32 at BLOCK_N 128 dense 15, sparse pf0 3 (8 warps spills in the BLOCK_M 16 sparse class, 1 stage in
# the dense one): M tiles capped at 16 rows there (G * seqlen_q = 32 takes two M tiles; the M3 shape G = 16 keeps its
# measured tile; the other spill-free choice is block_n={128: 64} with m_cap={128: 32}).
TRITON_CONFIG_OVERRIDES = {
    ((3, 9), 9, False): DecodeConfig.changes("TRITON_CONFIG_OVERRIDES[3.9, 9]", dict(num_warps={128: 8})),
    ((3, 9), 9, True): DecodeConfig.changes("TRITON_CONFIG_OVERRIDES[3.9, 9, nvfp4]", dict(m_cap={128: 16})),
}
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])  # (major, minor) of the running Triton


def config_for_major(major, nvfp4: bool = False, triton_version=None) -> DecodeConfig:
    """The table's ``DecodeConfig`` for a device of compute-capability major ``major`` (None = CPU interpreter;
    an unknown major >= 9 uses sm_90's); ``nvfp4``: with the ``NVFP4_CONFIG_OVERRIDES`` changes of that major;
    then the ``TRITON_CONFIG_OVERRIDES`` changes for ``triton_version`` ((major, minor); default the running
    Triton's ``TRITON_VERSION``)."""
    key = major if major in DECODE_CONFIGS else (9 if major is not None and major >= 9 else None)
    cfg = DECODE_CONFIGS[key]
    if nvfp4 and key in NVFP4_CONFIG_OVERRIDES:
        cfg = cfg.updated(NVFP4_CONFIG_OVERRIDES[key])
    tv = TRITON_VERSION if triton_version is None else tuple(triton_version)
    vers = [v for (v, m, nv) in TRITON_CONFIG_OVERRIDES if m == key and nv == bool(nvfp4) and v <= tv]
    if vers:
        cfg = cfg.updated(TRITON_CONFIG_OVERRIDES[(max(vers), key, bool(nvfp4))])
    return cfg


def device_config(device: torch.device, nvfp4: bool = False, changes=None):
    """``(DecodeConfig, SM count)`` of a launch on ``device``, with ``changes`` (``DecodeConfig.changes`` form,
    the ``tuning.override`` value) applied."""
    major, sms = device_info(device.type, device.index, _SM_COUNT_CPU)
    cfg = config_for_major(major, nvfp4)
    return (cfg.updated(changes) if changes else cfg), sms


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class LaunchPlan:
    """Every launch parameter, computed from shapes and host ints only (no device reads)."""

    __slots__ = ("B", "Hkv", "G", "SQ", "D", "BS", "topk", "dense", "BLOCK_M", "BLOCK_N", "MT", "TOK_P2",
                 "TK_P2", "tiles_hint", "tiles_per_split", "num_splits", "NS_P2", "units", "num_warps", "num_stages",
                 "chunk", "slot_pre", "pdl", "grid")

    def __repr__(self):
        return "LaunchPlan(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


def make_plan(device, *, B, Hkv, G, SQ, D, BS, topk, hint_blocks, split_override=0, max_grid=0,
              nvfp4=False, kv_bytes=2) -> LaunchPlan:
    """Choose tile sizes and the split count.

    topk: slots per index row (0 = dense path); hint_blocks: dense path's expected block count
    (``min(page_table.shape[1], ceil(max_seqlen_k / BS))``); split_override > 0 forces the number of
    tiles per split (wrapper hints); max_grid > 0 caps the grid; nvfp4: packed NVFP4 K/V (config with
    ``NVFP4_CONFIG_OVERRIDES``); kv_bytes: bytes per K/V element (1 = fp8; token layout's slot preload
    policy). The config is the device's table entry with the active
    ``tuning.override(decode=...)`` (``decode_nvfp4=`` for NVFP4) changes; plans are cached per device,
    changes and arguments.
    """
    ov = tuning.current()
    return _cached_plan(device, ov.decode_nvfp4 if nvfp4 else ov.decode, B=B, Hkv=Hkv, G=G, SQ=SQ, D=D, BS=BS,
                        topk=topk, hint_blocks=hint_blocks, split_override=split_override, max_grid=max_grid,
                        nvfp4=nvfp4, kv_bytes=kv_bytes)


@functools.lru_cache(maxsize=512)
def _cached_plan(device, changes, **kw) -> LaunchPlan:
    nvfp4 = kw.pop("nvfp4")
    cfg, sms = device_config(device, nvfp4, changes)
    p = plan_from_config(cfg, sms, **kw)
    p.pdl = use_pdl(cfg.pdl, device_info(device.type, device.index, _SM_COUNT_CPU)[0])
    return p


def plan_from_config(cfg, sms, *, B, Hkv, G, SQ, D, BS, topk, hint_blocks, split_override=0,
                     max_grid=0, kv_bytes=2) -> LaunchPlan:
    """``make_plan`` for an explicit ``DecodeConfig`` and SM count (also used by ``aot_configs``)."""
    p = LaunchPlan()
    p.B, p.Hkv, p.G, p.SQ, p.D, p.BS, p.topk = B, Hkv, G, SQ, D, BS, topk
    p.dense = topk == 0
    rows = G * SQ
    p.BLOCK_M = min(max(16, _next_pow2(rows)), cfg.m_cap[D])
    p.BLOCK_N = min(cfg.block_n[D], BS)
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
        target = cfg.ctas_per_sm * sms
        splits = 1 if p.units >= target else -(-target // max(p.units, 1))
        cap_budget = max(1, cfg.combine_budget // (min(rows, p.BLOCK_M) * D * 4))
        cap = cap_budget
        if p.tiles_hint // max(cap_budget, 1) >= cfg.big_tiles:
            cap = max(cap_budget, min(cfg.max_splits, p.tiles_hint // cfg.big_tiles))
        splits = min(splits, cap, cfg.max_splits, max(1, p.tiles_hint // cfg.min_tiles_split))
    splits = max(1, min(splits, p.tiles_hint))
    if max_grid > 0 and p.units > 0:
        splits = max(1, min(splits, max_grid // p.units))
    p.tiles_per_split = -(-p.tiles_hint // splits)
    p.num_splits = -(-p.tiles_hint // p.tiles_per_split)
    p.NS_P2 = _next_pow2(p.num_splits)
    p.num_warps = cfg.num_warps[D]
    p.num_stages = cfg.num_stages
    chunk = min(_next_pow2(p.tiles_per_split), cfg.chunk_max)
    if not p.dense:
        lim = max(1, cfg.chunk_elems // (p.TOK_P2 * p.TK_P2))
        chunk = min(chunk, 1 << (lim.bit_length() - 1))
    p.chunk = max(2, chunk)
    p.grid = (p.units * p.num_splits,)
    p.slot_pre = int(p.grid[0] <= (cfg.slot_pre_units_8bit if kv_bytes == 1 else cfg.slot_pre_units) * sms)
    p.pdl = bool(cfg.pdl)
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


# ---------------------------------------------------------------------------------------------
# NVFP4 K/V tiles (KV_FMT = 1). A packed row holds D/2 bytes; byte k = element 2k (low nibble) and
# element 2k+1 (high nibble). The kernel never joins the two nibbles: it keeps the "even" tile (low
# nibbles: elements 0, 2, ..) and the "odd" tile (high nibbles) apart, contracts QK^T as
# q_even . even^T + q_odd . odd^T and accumulates PV into an even and an odd output half.
#
# Values: the fp16 tiles of nvfp4_tile.py (``e2m1 * E4M3scale / FP4_POW2``, exact in fp16; FP4_DEC picks the
# portable or the PTX nibble decoder), fp16 MMAs for every q dtype (bf16 / fp8 q scaled per row by a power of
# two, ``nvfp4_q_pow2``). FP4_POW2 and the global scales are applied outside the MMAs:
# ``scale_log2 * FP4_POW2 * k_global`` on the logits, ``FP4_POW2 * v_global`` once on the final output.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fp4_load(P, S, byte_off, srow, ok, sd, N: tl.constexpr, D: tl.constexpr, WORDS: tl.constexpr):
    """Raw packed bytes and scale bytes of ``N`` NVFP4 rows (see ``_fp4_kv_tiles``), not decoded.

    WORDS False: packed ``[N, D/16, 8]`` uint8 (``nvfp4_load_bytes``). WORDS True: packed ``[N, D/8]`` int32
    words (word w = bytes 4w..4w+3, little endian; needs ``sd == 1``, 4-byte aligned ``P`` and ``byte_off``:
    the launcher checks). Scales ``[N, D/16]`` uint8 either way. Rows with ``ok == False`` are not read (zeros).
    """
    if WORDS:
        wp = P.to(tl.pointer_type(tl.int32))
        byte = tl.load(wp + (byte_off // 4)[:, None] + tl.arange(0, D // 8)[None, :], mask=ok[:, None], other=0)
        return byte, nvfp4_scale_bytes(S, srow, ok, D // 16)
    else:
        return nvfp4_load_bytes(P, S, byte_off, srow, ok, sd, D)


@triton.jit
def _lo_hi_f16(w):
    """(low, high) 16-bit halves of int32 ``w`` as fp16 bit patterns."""
    lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = ((w >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _fp4_decode(byte, sb, N: tl.constexpr, D: tl.constexpr, FP4_DEC: tl.constexpr, WORDS: tl.constexpr):
    """Even / odd fp16 tiles ``[N, D/2]`` from ``_fp4_load``'s raw bytes (same WORDS)."""
    C: tl.constexpr = D // 16
    if WORDS:
        sf = e4m3_times_128_f16(sb.to(tl.int32) & 0xFF)  # [N, C]
        # word w of a row belongs to scale block w // 2 (4 bytes = 8 elements)
        sfw = tl.reshape(tl.broadcast_to(sf[:, :, None], [N, C, 2]), [N, D // 8])
        if FP4_DEC == 1:
            sbits = sfw.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            sc2 = sbits | (sbits << 16)  # the block scale in both f16x2 lanes
            e01, e23, o01, o23 = tl.inline_asm_elementwise(
                asm=FP4_ASM_F16, constraints="=r,=r,=r,=r,r,r,r", args=[byte, sc2, sc2],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=False, pack=1)
            # join(join(x0, x2), join(x1, x3)) -> [.., j, i] = x_(2j + i): elements in column order
            a0, a1 = _lo_hi_f16(e01)
            a2, a3 = _lo_hi_f16(e23)
            ev = tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [N, D // 2])
            b0, b1 = _lo_hi_f16(o01)
            b2, b3 = _lo_hi_f16(o23)
            od = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [N, D // 2])
        else:
            w = byte
            y0 = w & 0xFF
            y1 = (w >> 8) & 0xFF
            y2 = (w >> 16) & 0xFF
            y3 = (w >> 24) & 0xFF
            b = tl.reshape(tl.join(tl.join(y0, y2), tl.join(y1, y3)), [N, D // 8, 4])  # [.., j, i] = byte 4w + 2j + i
            ev, od = e2m1_nibbles_f16(b)
            ev = tl.reshape(ev * sfw[:, :, None], [N, D // 2])
            od = tl.reshape(od * sfw[:, :, None], [N, D // 2])
        return ev, od
    else:
        ev, od = nvfp4_decode_bytes_f16(byte, sb, N, C, FP4_DEC)
        return tl.reshape(ev, [N, D // 2]), tl.reshape(od, [N, D // 2])


@triton.jit
def _fp4_kv_tiles(P, S, byte_off, srow, ok, sd, N: tl.constexpr, D: tl.constexpr, FP4_DEC: tl.constexpr,
                  WORDS: tl.constexpr = False):
    """Even / odd NVFP4 tiles ``[N, D/2]`` fp16 of ``N`` rows, holding ``e2m1 * E4M3scale / FP4_POW2``.

    P: packed uint8 base; ``byte_off [N]`` int64 offset of each row's first byte, ``sd`` the byte stride.
    S: 128x4-swizzled scale bytes (flat); ``srow [N]`` int64 logical scale row of each row. Rows with
    ``ok == False`` are not read and come back as 0. Column k of the even (odd) tile is element
    2k (2k+1) of the row. WORDS: packed bytes read as int32 words (``_fp4_load``).
    """
    byte, sb = _fp4_load(P, S, byte_off, srow, ok, sd, N, D, WORDS)
    return _fp4_decode(byte, sb, N, D, FP4_DEC, WORDS)


@triton.jit
def _fp4_tile_raw(K, V, KSC, VSC, jsel, pgsel, sel, valid, c, g, Hkv, Lk, sk_0, sk_1, sk_2, sk_d, sv_0, sv_1, sv_2,
                  sv_d, BS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, WORDS: tl.constexpr):
    """Raw K / V bytes + scale bytes of the chunk's tile selected by ``sel`` (sub-tile ``c``), for the
    register prefetch (FP4_PF = 2); ``valid`` False (past the chunk) reads nothing."""
    offs_n = tl.arange(0, BLOCK_N)
    j = tl.sum(tl.where(sel, jsel, 0)).to(tl.int64)
    j_safe = tl.maximum(j, 0)
    xo = c * BLOCK_N + offs_n
    kv_ok = tl.where(valid & (j >= 0), j_safe * BS + xo < Lk, False)  # scalar & vector: see the tile loop
    page = tl.sum(tl.where(sel, pgsel, 0)).to(tl.int64)
    k_row = page * sk_0 + g * sk_1 + xo.to(tl.int64) * sk_2
    v_row = page * sv_0 + g * sv_1 + xo.to(tl.int64) * sv_2
    srow = (page * Hkv + g) * BS + xo
    kb, ks = _fp4_load(K, KSC, k_row, srow, kv_ok, sk_d, BLOCK_N, D, WORDS)
    vb, vs = _fp4_load(V, VSC, v_row, srow, kv_ok, sv_d, BLOCK_N, D, WORDS)
    return kb, ks, vb, vs


@triton.jit
def _opaque_f16(x):
    """Identity on an fp16 tensor that Triton cannot look through (GPU only): the MMA operand layout of a
    dot whose operand chain starts at an fp8 load is chosen for 8-bit data (kWidth 4: no ldmatrix, for the
    decoded K / V tiles too); hiding q's fp8 origin keeps the 16-bit layout."""
    return tl.inline_asm_elementwise(asm="mov.b32 $0, $1;", constraints="=r,r", args=[x], dtype=tl.float16,
                                     is_pure=False, pack=2)


@triton.jit
def _nvfp4_q(Q, t_row, heads, row_ok, sq_t, sq_h, sq_d, D: tl.constexpr, Q_RESCALE: tl.constexpr,
             OPAQUE: tl.constexpr):
    """q's even / odd column halves as fp16 ``[BLOCK_M, D/2]`` and a per-row logit factor.

    Q_RESCALE (bf16 / fp8 q): each row is scaled by ``nvfp4_q_pow2`` of its largest magnitude, so it is exact
    in fp16 and cannot overflow; the returned factor undoes it on the logits. (For fp8 q the conversion alone
    would be exact; the row reduction also keeps Triton from re-reading the fp8 q tile from shared memory and
    converting it again on every KV tile.) fp16 q: as is, factor 1.
    """
    offs_h = tl.arange(0, D // 2)
    q_ptr = Q + t_row[:, None] * sq_t + heads[:, None].to(tl.int64) * sq_h
    q_ev = tl.load(q_ptr + (2 * offs_h)[None, :] * sq_d, mask=row_ok[:, None], other=0.0)
    q_od = tl.load(q_ptr + (2 * offs_h + 1)[None, :] * sq_d, mask=row_ok[:, None], other=0.0)
    if Q_RESCALE:
        q_ev = q_ev.to(tl.float32)
        q_od = q_od.to(tl.float32)
        up, down = nvfp4_q_pow2(tl.maximum(tl.max(tl.abs(q_ev), 1), tl.max(tl.abs(q_od), 1)))
        q_ev = (q_ev * up[:, None]).to(tl.float16)
        q_od = (q_od * up[:, None]).to(tl.float16)
        if OPAQUE:
            q_ev = _opaque_f16(q_ev)
            q_od = _opaque_f16(q_od)
        return q_ev, q_od, down
    else:
        one = tl.full([q_ev.shape[0]], 1.0, tl.float32)
        return q_ev.to(tl.float16), q_od.to(tl.float16), one


@triton.jit
def _split_stats(MLPART, unit, offs_m, row_ok, BLOCK_M: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 NS_P2: tl.constexpr):
    """Split-KV combine, first step: the splits' (m, l) rows of ``unit`` -> (partial base index, combined
    max m_all, m_use (0 where m_all = -inf), combined sum l_all in units of exp2(m_use))."""
    sp = tl.arange(0, NS_P2)
    base = unit.to(tl.int64) * NUM_SPLITS
    ml_ptr = MLPART + (base + sp[:, None]) * (2 * BLOCK_M) + offs_m[None, :]
    ml_mask = (sp[:, None] < NUM_SPLITS) & row_ok[None, :]
    ms = tl.load(ml_ptr, mask=ml_mask, other=float("-inf"), cache_modifier=".cg")
    ls = tl.load(ml_ptr + BLOCK_M, mask=ml_mask, other=0.0, cache_modifier=".cg")
    m_all = tl.max(ms, 0)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.sum(tl.exp2(ms - m_use[None, :]) * ls, 0)
    return base, m_all, m_use, l_all


@triton.jit
def _publish_partial(MLPART, COUNTER, unit, part, m_i, l_i, offs_m, row_ok, BLOCK_M: tl.constexpr,
                     NUM_SPLITS: tl.constexpr):
    """Store this split's row max / sum (after its O partial), then count the split in: True for the last
    program of the unit (it then combines; acquire-release on the counter orders every split's stores)."""
    tl.store(MLPART + part * (2 * BLOCK_M) + offs_m, m_i, mask=row_ok)
    tl.store(MLPART + part * (2 * BLOCK_M) + BLOCK_M + offs_m, l_i, mask=row_ok)
    tl.debug_barrier()  # every thread's partial stores precede the release below
    done = tl.atomic_add(COUNTER + unit, 1, sem="acq_rel")
    return done == NUM_SPLITS - 1


@triton.jit
def _combine_partials(OPART, MLPART, base, col0, offs_m, offs_c, row_ok, m_use, BLOCK_M: tl.constexpr,
                      D: tl.constexpr, W: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """``sum_s O_s[:, col0 + offs_c] * 2^(m_s - m_use)`` over the unit's splits in fixed order (deterministic),
    one ``[BLOCK_M, W]`` partial slice per step (independent loads, no 3-D tile); partials ``[BLOCK_M, D]``."""
    acc = tl.zeros([BLOCK_M, W], tl.float32)
    o_base = OPART + base * (BLOCK_M * D) + col0
    ml_base = MLPART + base * (2 * BLOCK_M)
    o_off = offs_m[:, None] * D + offs_c[None, :]
    for s_i in tl.static_range(NUM_SPLITS):
        mc = tl.load(ml_base + s_i * (2 * BLOCK_M) + offs_m, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        oc = tl.load(o_base + s_i * (BLOCK_M * D) + o_off, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
        acc += oc * tl.exp2(mc - m_use)[:, None]
    return acc


@triton.jit
def msa_decode_kernel(
    Q, K, V, IDX, TABLE, LENS, SLOTS, SINK, OUT, LSE, OPART, MLPART, COUNTER,
    KSC, VSC, KGS, VGS,
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
    KV_FMT: tl.constexpr = 0, FP4_DEC: tl.constexpr = 0, HAS_KG: tl.constexpr = False,
    HAS_VG: tl.constexpr = False, FP4_PF: tl.constexpr = 0, SLOT_PRE: tl.constexpr = 0,
    USE_GDC: tl.constexpr = False,
):
    if USE_GDC:  # programmatic dependent launch: no memory access before the previous kernel has completed
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
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
    if KV_FMT == 0:
        q = tl.load(Q + t_row[:, None] * sq_t + heads[:, None].to(tl.int64) * sq_h + offs_d[None, :] * sq_d,
                    mask=row_ok[:, None], other=0.0).to(CDT)
    else:
        # NVFP4: even / odd halves of q (columns 2k / 2k+1) against the even / odd K tiles; the logit
        # scale absorbs the tiles' 1 / FP4_POW2 and k_global (read on the device); v_global and the V tiles'
        # 1 / FP4_POW2 are applied to the output once (_nvfp4_out_mul)
        gl_assert: tl.constexpr = LAYOUT == 0 and not HAS_SINK
        tl.static_assert(gl_assert, "NVFP4 K/V: paged HND layout without sink only")
        q, q_od, q_back = _nvfp4_q(Q, t_row, heads, row_ok, sq_t, sq_h, sq_d, D, Q.dtype.element_ty != tl.float16,
                                   FP4_DEC == 1 and Q.dtype.element_ty == tl.float8e4nv)
        qk_log2 = scale_log2 * FP4_POW2
        if HAS_KG:
            qk_log2 = qk_log2 * tl.load(KGS).to(tl.float32)
        qk_row = q_back * qk_log2  # [BLOCK_M]

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
    if KV_FMT == 0:
        acc = tl.zeros([BLOCK_M, D], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, D // 2], tl.float32)  # even output columns
        acc_od = tl.zeros([BLOCK_M, D // 2], tl.float32)  # odd output columns

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
            # the chunk's block ids from the index rows already in registers (no second load of IDX)
            sel3 = (tok[None, :, None] == il[:, None, None]) & (slot_ar[None, None, :] == slv[:, None, None])
            jv = tl.sum(tl.sum(tl.where(sel3, idxm[None, :, :], 0), 2), 1)
            jv = tl.where(pv, jv, -1)
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
        if LAYOUT == 1:
            if SLOT_PRE:
                # every slot id of the chunk's tiles at once ([CH, BLOCK_N], independent loads): inside the
                # tile loop the K / V addresses then depend on registers only, as on the paged path
                xs = (jv * BS + (pos % TPB) * BLOCK_N)[:, None] + offs_n[None, :].to(tl.int64)
                sl2 = tl.load(TABLE + req_row * st_0 + xs * st_1, mask=okv[:, None] & (xs < Lk), other=0)
                sl2 = tl.where((sl2 >= 0) & (sl2 < NUM_ROWS_KV), sl2,
                               ((sl2.to(tl.int64) % NUM_ROWS_KV) + NUM_ROWS_KV) % NUM_ROWS_KV).to(tl.int32)
        n_it = tl.minimum(t1 - c0, CH)
        if KV_FMT == 1:
            if FP4_PF == 2:  # register prefetch: raw bytes of the chunk's first tile
                kb, ks, vb, vs = _fp4_tile_raw(K, V, KSC, VSC, jsel, pgsel, ar == 0, n_it > 0, c0 % TPB, g, Hkv, Lk,
                                               sk_0, sk_1, sk_2, sk_d, sv_0, sv_1, sv_2, sv_d, BS, BLOCK_N, D, True)
        for it in range(0, n_it):
            sel = ar == it
            j = tl.sum(tl.where(sel, jsel, 0)).to(tl.int64)
            tile_ok = j >= 0
            j_safe = tl.maximum(j, 0)
            c = (c0 + it) % TPB
            xo = c * BLOCK_N + offs_n
            x = j_safe * BS + xo
            # where, not &: Triton 3.9's interpreter rejects the mask a 0-d reduction result & a vector gives
            kv_ok = tl.where(tile_ok, x < Lk, False)
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
                if SLOT_PRE:
                    sl_id = tl.sum(tl.where(sel[:, None], sl2, 0), 0).to(tl.int64)
                else:
                    sl_id = tl.load(TABLE + req_row * st_0 + x * st_1, mask=kv_ok, other=0).to(tl.int64)
                    sl_id = ((sl_id % NUM_ROWS_KV) + NUM_ROWS_KV) % NUM_ROWS_KV
                k_row = sl_id * sk_0 + g * sk_1
                v_row = sl_id * sv_0 + g * sv_1
            if KV_FMT == 0:
                k = tl.load(K + k_row[:, None] + offs_d[None, :] * sk_d, mask=kv_ok[:, None], other=0.0).to(CDT)
                v = tl.load(V + v_row[:, None] + offs_d[None, :] * sv_d, mask=kv_ok[:, None], other=0.0).to(CDT)
                s = tl.dot(q, tl.trans(k)) * scale_log2
            else:
                if FP4_PF == 2:
                    # issue the next tile's loads before decoding this one (hides their latency)
                    kb_n, ks_n, vb_n, vs_n = _fp4_tile_raw(K, V, KSC, VSC, jsel, pgsel, ar == it + 1, it + 1 < n_it,
                                                           (c0 + it + 1) % TPB, g, Hkv, Lk, sk_0, sk_1, sk_2, sk_d,
                                                           sv_0, sv_1, sv_2, sv_d, BS, BLOCK_N, D, True)
                    k_ev, k_od = _fp4_decode(kb, ks, BLOCK_N, D, FP4_DEC, True)
                    v_ev, v_od = _fp4_decode(vb, vs, BLOCK_N, D, FP4_DEC, True)
                    kb, ks, vb, vs = kb_n, ks_n, vb_n, vs_n
                else:
                    srow = (page * Hkv + g) * BS + xo  # logical scale row (page * Hkv + g) * 128 + token
                    k_ev, k_od = _fp4_kv_tiles(K, KSC, k_row, srow, kv_ok, sk_d, BLOCK_N, D, FP4_DEC, FP4_PF == 1)
                    v_ev, v_od = _fp4_kv_tiles(V, VSC, v_row, srow, kv_ok, sv_d, BLOCK_N, D, FP4_DEC, FP4_PF == 1)
                s = tl.dot(q_od, tl.trans(k_od), tl.dot(q, tl.trans(k_ev))) * qk_row[:, None]
            vis = row_mem[:, None] & kv_ok[None, :] & (x[None, :] <= lim[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            pr = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(pr, 1)
            if KV_FMT == 0:
                acc = acc * alpha[:, None] + tl.dot(pr.to(CDT), v)
            else:
                p_c = pr.to(tl.float16)
                acc = acc * alpha[:, None] + tl.dot(p_c, v_ev)
                acc_od = acc_od * alpha[:, None] + tl.dot(p_c, v_od)
            m_i = m_new

    if KV_FMT == 0:
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
            if _publish_partial(MLPART, COUNTER, unit, part, m_i, l_i, offs_m, row_ok, BLOCK_M, NUM_SPLITS):
                # last program for this (b, g, m_tile): combine in fixed split order (deterministic)
                base, m_all, m_use, l_all = _split_stats(MLPART, unit, offs_m, row_ok, BLOCK_M, NUM_SPLITS, NS_P2)
                acc = _combine_partials(OPART, MLPART, base, 0, offs_m, offs_d, row_ok, m_use, BLOCK_M, D, D,
                                        NUM_SPLITS)
                o, lse = _finalize(acc, m_all, l_all, q, SINK, heads, ss_h, ss_d, offs_d, row_ok, scale_log2,
                                   HAS_SINK)
                tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None])
                if WRITE_LSE:
                    tl.store(lse_ptrs, lse, mask=row_ok)
                tl.atomic_xchg(COUNTER + unit, 0)  # self-cleaning: ready for the next launch / graph replay
    else:
        _nvfp4_epilogue(acc, acc_od, m_i, l_i, q, OUT, LSE, OPART, MLPART, COUNTER, VGS, t_row, heads, row_ok,
                        offs_m, unit, split, so_t, so_h, so_d, sl_t, sl_h, D, BLOCK_M, NUM_SPLITS, NS_P2,
                        WRITE_LSE, HAS_VG)


@triton.jit
def _nvfp4_out_mul(VGS, HAS_VG: tl.constexpr):
    """Output factor of the NVFP4 path: the V tiles' FP4_POW2 times v_global (element 0, on the device)."""
    if HAS_VG:
        return tl.load(VGS).to(tl.float32) * FP4_POW2
    else:
        return FP4_POW2


@triton.jit
def _nvfp4_epilogue(acc, acc_od, m_i, l_i, q, OUT, LSE, OPART, MLPART, COUNTER, VGS, t_row, heads, row_ok, offs_m,
                    unit, split, so_t, so_h, so_d, sl_t, sl_h, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, NS_P2: tl.constexpr, WRITE_LSE: tl.constexpr, HAS_VG: tl.constexpr):
    """Store / combine of the NVFP4 path: even and odd output halves (columns 2k / 2k+1).

    Split partials keep the layout ``[BLOCK_M, D]`` = ``[even half | odd half]``, unscaled (fp32, log2
    units of the kernel's logit scale); the factor ``_nvfp4_out_mul`` is applied once to the final O.
    No sink on this path (``_finalize`` is called without it).
    """
    H: tl.constexpr = D // 2
    offs_h = tl.arange(0, H)
    o_row = OUT + t_row[:, None] * so_t + heads[:, None].to(tl.int64) * so_h
    ptr_ev = o_row + (2 * offs_h)[None, :] * so_d
    ptr_od = o_row + (2 * offs_h + 1)[None, :] * so_d
    lse_ptrs = LSE + t_row * sl_t + heads.to(tl.int64) * sl_h
    if NUM_SPLITS == 1:
        vmul = _nvfp4_out_mul(VGS, HAS_VG)
        o_ev, lse = _finalize(acc, m_i, l_i, q, q, heads, 0, 0, offs_h, row_ok, 1.0, False)
        o_od, _ = _finalize(acc_od, m_i, l_i, q, q, heads, 0, 0, offs_h, row_ok, 1.0, False)
        tl.store(ptr_ev, (o_ev * vmul).to(OUT.dtype.element_ty), mask=row_ok[:, None])
        tl.store(ptr_od, (o_od * vmul).to(OUT.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_LSE:
            tl.store(lse_ptrs, lse, mask=row_ok)
    else:
        part = unit.to(tl.int64) * NUM_SPLITS + split
        p_row = OPART + (part * BLOCK_M + offs_m[:, None]) * D
        tl.store(p_row + offs_h[None, :], acc, mask=row_ok[:, None])
        tl.store(p_row + H + offs_h[None, :], acc_od, mask=row_ok[:, None])
        if _publish_partial(MLPART, COUNTER, unit, part, m_i, l_i, offs_m, row_ok, BLOCK_M, NUM_SPLITS):
            # last program for this (b, g, m_tile): combine in fixed split order (deterministic); the even and
            # odd halves in one loop (as two _combine_partials calls more registers stay live: sm_100 spills)
            base, m_all, m_use, l_all = _split_stats(MLPART, unit, offs_m, row_ok, BLOCK_M, NUM_SPLITS, NS_P2)
            c_ev = tl.zeros([BLOCK_M, H], tl.float32)
            c_od = tl.zeros([BLOCK_M, H], tl.float32)
            o_base = OPART + base * (BLOCK_M * D)
            ml_base = MLPART + base * (2 * BLOCK_M)
            o_off = offs_m[:, None] * D + offs_h[None, :]
            for s_i in tl.static_range(NUM_SPLITS):
                mc = tl.load(ml_base + s_i * (2 * BLOCK_M) + offs_m, mask=row_ok, other=float("-inf"),
                             cache_modifier=".cg")
                w = tl.exp2(mc - m_use)[:, None]
                oc = tl.load(o_base + s_i * (BLOCK_M * D) + o_off, mask=row_ok[:, None], other=0.0,
                             cache_modifier=".cg")
                c_ev += oc * w
                oc = tl.load(o_base + s_i * (BLOCK_M * D) + H + o_off, mask=row_ok[:, None], other=0.0,
                             cache_modifier=".cg")
                c_od += oc * w
            vmul = _nvfp4_out_mul(VGS, HAS_VG)
            o_ev, lse = _finalize(c_ev, m_all, l_all, q, q, heads, 0, 0, offs_h, row_ok, 1.0, False)
            o_od, _ = _finalize(c_od, m_all, l_all, q, q, heads, 0, 0, offs_h, row_ok, 1.0, False)
            tl.store(ptr_ev, (o_ev * vmul).to(OUT.dtype.element_ty), mask=row_ok[:, None])
            tl.store(ptr_od, (o_od * vmul).to(OUT.dtype.element_ty), mask=row_ok[:, None])
            if WRITE_LSE:
                tl.store(lse_ptrs, lse, mask=row_ok)
            tl.atomic_xchg(COUNTER + unit, 0)  # self-cleaning: ready for the next launch / graph replay


_CDT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float8_e4m3fn: tl.float16}

KV_NATIVE = 0
KV_NVFP4 = 1
# NVFP4 nibble decoder on a GPU (FP4_DEC_PORTABLE / FP4_DEC_ASM); the interpreter always runs the portable
# one. Benchmarks override it with ``tuning.override(decode_fp4_decoder=0|1)`` (read at each launch).
FP4_DEC_GPU_DEFAULT = FP4_DEC_ASM


def fp4_decoder(device: torch.device) -> int:
    """The ``FP4_DEC`` constexpr used for a launch on ``device``."""
    if device.type != "cuda":
        return FP4_DEC_PORTABLE
    dec = tuning.current().decode_fp4_decoder
    return FP4_DEC_GPU_DEFAULT if dec is None else dec


# NVFP4 packed-byte access (constexpr FP4_PF): 0 = uint8 loads, decode right after the load (the measured
# path); 1 = the packed bytes read as int32 words (4 bytes = 8 elements per register, the asm decoder takes a
# whole word without repacking bytes); 2 = int32 words + register prefetch: the next tile's packed words and
# scale bytes are loaded before the current tile is decoded (within a chunk of CH tiles). 1 / 2 need unit
# byte stride, 4-byte aligned base pointers and strides (else 0 is used). Benchmarks and tests override it with
# ``tuning.override(decode_fp4_prefetch=0|1|2)`` (GPU and interpreter; read at each launch).
FP4_PF_GPU_DEFAULT = 2  # H100, B = 64, 32K: pf2 81.6 us, pf1 83.0, pf0 92.9 (bf16 96.8)
FP4_PF_CPU_DEFAULT = 0


def fp4_prefetch_mode(device: torch.device, k, v) -> int:
    """The ``FP4_PF`` constexpr for packed NVFP4 K / V (uint8 [P, Hkv, BS, D/2]) on ``device``."""
    mode = tuning.current().decode_fp4_prefetch
    if mode is None:
        mode = FP4_PF_GPU_DEFAULT if device.type == "cuda" else FP4_PF_CPU_DEFAULT
    if mode:
        for t in (k, v):
            if t.stride(3) != 1 or t.data_ptr() % 4 or any(st % 4 for st in t.stride()[:3]):
                return 0
    return mode


def launch(p: LaunchPlan, *, layout, q, k, v, idx, table, lens, slot_ids, sink, out, lse, o_part, ml_part, counter,
           causal, scale, write_lse, nvfp4=None, slot=None):
    """Launch ``msa_decode_kernel``.

    HND:   q [B*SQ, Hq, D]; k, v [P, Hkv, BS, D]; table = page_table [B, W]; lens = seqused_k [B].
    TOKEN: q [B, Hq, D];    k, v [S, Hkv, D];      table = req_to_token [R, W]; lens = seq_lens [B];
           slot_ids [B].
    idx [Hkv, B*SQ, topk] or None (dense); sink [Hq, D] or None; out like q (output dtype);
    lse fp32 [B*SQ, Hq] (written iff write_lse); o_part / ml_part fp32 and counter int32 (zeroed)
    of at least ``workspace_sizes(p)`` elements when ``p.num_splits > 1``.
    nvfp4: None, or ``(k_scale, v_scale, k_global, v_global)`` for packed NVFP4 K/V (HND only, no
    sink): k, v uint8 [P, Hkv, BS, D/2]; scales flat contiguous uint8 128x4-swizzled (logical row
    ``(page * Hkv + h) * BS + s``, D/16 columns); globals fp32 tensors (element 0) or None (= 1).
    slot: a dict owned by a validated call signature that fixes every shape, stride, dtype and host value of
    this call and the plan ``p`` (the eager fast paths' cache entries), or None. It keeps the scalar part of the
    argument tuple and the compiled kernels for the direct launch of ``_launch.TritonLauncher``.
    """
    if p.grid[0] == 0:
        return
    if nvfp4 is not None:
        k_sc, v_sc, k_gs, v_gs = nvfp4
        ex = (k_sc, v_sc, q if k_gs is None else k_gs, q if v_gs is None else v_gs)
    else:
        ex = (q, q, q, q)
    dense = idx is None
    if p.num_splits == 1:
        o_part = ml_part = out
        counter = lens
    tensors = (q, k, v, table if dense else idx, table, lens, lens if slot_ids is None else slot_ids,
               q if sink is None else sink, out, lse if write_lse else out, o_part, ml_part, counter, *ex)
    if slot is not None and nvfp4 is None:  # the slot's signature fixes every stride, shape and host value
        tail = slot.get("tail")
        if tail is None:
            tail = slot["tail"] = _scalar_tail(p, layout, q, k, v, idx, table, lens, slot_ids, sink, out, lse,
                                               causal, scale, write_lse, nvfp4)
    else:
        slot = None
        tail = _scalar_tail(p, layout, q, k, v, idx, table, lens, slot_ids, sink, out, lse, causal, scale, write_lse,
                            nvfp4)
    _LAUNCHER(p.grid, tensors + tail, slot=slot, num_warps=p.num_warps, num_stages=p.num_stages, n_ptr=17,
              launch_pdl=p.pdl)


def _scalar_tail(p, layout, q, k, v, idx, table, lens, slot_ids, sink, out, lse, causal, scale, write_lse, nvfp4):
    """Every kernel argument after the 17 pointers (strides, host ints, constexprs), in declaration order."""
    if nvfp4 is not None:
        _, _, k_gs, v_gs = nvfp4
        # NVFP4 MMAs run in fp16 for every q dtype
        fmt = (tl.float16, KV_NVFP4, fp4_decoder(q.device), k_gs is not None, v_gs is not None,
               fp4_prefetch_mode(q.device, k, v))
    else:
        fmt = (_CDT[q.dtype], KV_NATIVE, 0, False, False, 0)
    ks, vs = k.stride(), v.stride()
    if layout == LAYOUT_HND:
        sk, sv = ks, vs
    else:
        sk = (ks[0], ks[1], 0, ks[2])
        sv = (vs[0], vs[1], 0, vs[2])
    dense = idx is None
    si = (0, 0, 0) if dense else idx.stride()
    s_slot = 0 if slot_ids is None else slot_ids.stride(0)
    ss = (0, 0) if sink is None else sink.stride()
    sl = lse.stride() if write_lse else (0, 0)
    tshape = table.shape
    return (*q.stride(), *sk, *sv, *si, *table.stride(), lens.stride(0), s_slot, *ss, *out.stride(), *sl,
            p.Hkv, p.G, p.SQ, max(p.topk, 1), tshape[1], tshape[0], k.shape[0], p.MT, p.tiles_per_split,
            p.tiles_hint, float(scale) * LOG2E,
            layout, p.BS, p.D, p.BLOCK_M, p.BLOCK_N, p.TOK_P2, p.TK_P2, p.num_splits, p.NS_P2, p.chunk, dense,
            bool(causal), sink is not None, bool(write_lse), *fmt, p.slot_pre if layout == LAYOUT_TOKEN else 0,
            p.pdl)


_LAUNCHER = TritonLauncher(msa_decode_kernel)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions (scripts/aot_check.py): every launch configuration the plan
# above can produce on a device of compute capability ``arch``, derived from ``plan_from_config``.
# ---------------------------------------------------------------------------------------------
# (q dtype, kv dtype): output dtype bf16 for fp8 q, else q's; CDT as ``_CDT``
_AOT_DTYPES = ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float8_e4m3fn),
               (torch.float8_e4m3fn, torch.float8_e4m3fn))
# packed NVFP4 K/V (uint8; HND only, no sink): q bf16 / fp16 / fp8
_AOT_NVFP4_Q = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def _aot_plans(arch: int, nvfp4: bool = False):
    """Distinct plans over the supported shape space (both layouts): D 64/128/256, GQA 1..16, seqlen_q 1..4,
    block sizes 16..512 (HND official API: page 128), top-k 0 (dense) / 1..64, batch 1..256.
    ``nvfp4``: the packed NVFP4 K/V plans (HND only, config with ``NVFP4_CONFIG_OVERRIDES``)."""
    from ._aot import ARCHS, major_of

    cfg = config_for_major(major_of(arch), nvfp4)
    sms = ARCHS[arch]["sms"]
    plans = {}
    for layout in ((LAYOUT_HND,) if nvfp4 else (LAYOUT_HND, LAYOUT_TOKEN)):
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
                                    slot_pre = p.slot_pre if layout == LAYOUT_TOKEN else 0
                                    key = (layout, p.D, p.BS, p.BLOCK_M, p.BLOCK_N, p.TOK_P2, p.TK_P2, p.num_splits,
                                           p.chunk, p.dense, p.num_warps, p.num_stages, slot_pre)
                                    plans[key] = p
    return plans


def _aot_select(plans, full):
    """All plans (``full``) or one per tile class (layout, D, BLOCK_M, dense, warps, stages) at the class's
    largest BLOCK_N and index chunk, with NUM_SPLITS raised to the class's largest split count (the combine
    loop is unrolled NUM_SPLITS times); smaller BLOCK_N / chunks / split counts are strictly smaller."""
    if full:
        return list(plans.items())
    best, most = {}, {}
    for key, p in plans.items():
        cls = (key[0], p.D, p.BLOCK_M, p.dense, p.num_warps, p.num_stages, key[-1])
        score = (p.BLOCK_N, p.chunk * p.TOK_P2 * p.TK_P2)
        if cls not in best or score > best[cls][0]:
            best[cls] = (score, key, p)
        most[cls] = max(most.get(cls, 1), p.num_splits)
    sel = []
    for cls, (_, key, p) in best.items():
        q = copy.copy(p)
        q.num_splits = most[cls]
        sel.append((key, q))
    return sel


def aot_configs(arch: int, full: bool = False):
    """``AotConfig`` list for ``msa_decode_kernel`` on compute capability ``arch`` (see ``_aot``).

    ``full``: every distinct plan x dtype pair x (causal, sink, lse) flags. CI subset: per tile class
    (layout, D, BS, BLOCK_M, BLOCK_N, dense, warps, stages) the plan with the largest index chunk
    (``CH * TOK_P2 * TK_P2``) and the largest split count (unrolled combine), all flags on, every dtype pair
    for the HND BLOCK_M = 64 classes (the largest tiles) and bf16 otherwise.

    Packed NVFP4 K/V (``KV_FMT = 1``; HND only, no sink, both global scales given), from the NVFP4 plans
    (``NVFP4_CONFIG_OVERRIDES``) with the GPU default decoder ``FP4_DEC_GPU_DEFAULT``: q bf16, plus fp16 and
    fp8 (the opaque-q path) for the sparse class of the largest BLOCK_M; ``full``: every q dtype and both
    decoders.
    """
    from ._aot import AotConfig, dedupe, torch_to_tl_name

    # (key, plan, q dtype, kv dtype, FP4_DEC or None for native K/V, FP4_PF)
    jobs = []
    for key, p in _aot_select(_aot_plans(arch), full):
        layout = key[0]
        if full:
            dtypes = _AOT_DTYPES
        else:  # fp16 compiles like bf16; fp8 K/V adds the widening converts
            dtypes = ((_AOT_DTYPES[0], _AOT_DTYPES[2], _AOT_DTYPES[3]) if layout == LAYOUT_HND and p.BLOCK_M == 64
                      else _AOT_DTYPES[:1])
        if layout == LAYOUT_TOKEN:  # direct helper: bf16/fp16 q only
            dtypes = [d for d in dtypes if d[0] != torch.float8_e4m3fn]
        jobs += [(key, p, qd, kd, None, 0) for qd, kd in dtypes]
    decs = (FP4_DEC_PORTABLE, FP4_DEC_ASM) if full else (FP4_DEC_GPU_DEFAULT,)
    fp4_sel = _aot_select(_aot_plans(arch, nvfp4=True), full)
    m_max = max(p.BLOCK_M for _, p in fp4_sel)
    for key, p in fp4_sel:
        big = p.BLOCK_M == m_max and not p.dense
        nq = _AOT_NVFP4_Q if (full or big) else (torch.bfloat16,)
        jobs += [(key, p, qd, torch.uint8, dec, FP4_PF_GPU_DEFAULT) for qd in nq for dec in decs]
        # the other packed-byte access modes (``tuning.override(decode_fp4_prefetch=...)``): every class with
        # ``full``, else bf16 q on the sparse class of the largest BLOCK_M
        pfs = [m for m in (0, 1, 2) if m != FP4_PF_GPU_DEFAULT] if (full or big) else []
        jobs += [(key, p, torch.bfloat16, torch.uint8, dec, m) for m in pfs for dec in decs]
    out = []
    for key, p, qd, kd, dec, pf in jobs:
        layout = key[0]
        od = torch.bfloat16 if qd == torch.float8_e4m3fn else qd
        cdt = _CDT[qd] if dec is None else tl.float16
        if dec is None:
            flags = [(True, True, True), (False, False, False)] if full else [(True, True, True)]
        else:  # no sink with NVFP4 K/V
            flags = [(True, False, True), (False, False, False)] if full else [(True, False, True)]
        for causal, sink, wlse in flags:
            args = {}
            for n in msa_decode_kernel.arg_names:
                args[n] = "i32:D"
            args.update(Q="*" + torch_to_tl_name(qd), K="*" + torch_to_tl_name(kd),
                        V="*" + torch_to_tl_name(kd), IDX="*i32", TABLE="*i32", LENS="*i32", SLOTS="*i32",
                        SINK="*fp32", OUT="*" + torch_to_tl_name(od), LSE="*fp32", OPART="*fp32",
                        MLPART="*fp32", COUNTER="*i32", KSC="*u8", VSC="*u8", KGS="*fp32", VGS="*fp32",
                        sq_d=1, sk_d=1, sv_d=1, si_s=1, st_1=1, ss_d=1, so_d=1,
                        sl_h=1, s_len=1, s_slot=1, scale_log2="fp32",
                        Hkv="i32", G="i32", SQ="i32", TOPK="i32", TBL_W="i32", TBL_ROWS="i32",
                        NUM_ROWS_KV="i32", MT="i32", TILES_PER_SPLIT="i32", TILES_HINT="i32")
            args.update(LAYOUT=layout, BS=p.BS, D=p.D, BLOCK_M=p.BLOCK_M, BLOCK_N=p.BLOCK_N, TOK_P2=p.TOK_P2,
                        TK_P2=p.TK_P2, NUM_SPLITS=p.num_splits, NS_P2=_next_pow2(p.num_splits), CH=p.chunk,
                        DENSE=p.dense, CAUSAL=causal, HAS_SINK=sink, WRITE_LSE=wlse, CDT=cdt,
                        KV_FMT=KV_NATIVE if dec is None else KV_NVFP4, FP4_DEC=dec or 0,
                        HAS_KG=dec is not None, HAS_VG=dec is not None, FP4_PF=pf,
                        SLOT_PRE=p.slot_pre if layout == LAYOUT_TOKEN else 0, USE_GDC=p.pdl)
            kvname = torch_to_tl_name(kd) if dec is None else f"nvfp4 dec{dec} pf{pf}"
            label = (f"{'HND' if layout == LAYOUT_HND else 'TOK'} D{p.D} BS{p.BS} M{p.BLOCK_M} N{p.BLOCK_N} "
                     f"{'dense' if p.dense else f'tok{p.TOK_P2}xtk{p.TK_P2}'} S{p.num_splits} CH{p.chunk}"
                     f"{' pre' if layout == LAYOUT_TOKEN and p.slot_pre else ''} "
                     f"q{torch_to_tl_name(qd)}/kv{kvname}"
                     + (f" c{int(causal)}s{int(sink)}l{int(wlse)}" if full else ""))
            out.append(AotConfig(msa_decode_kernel, args, p.num_warps, p.num_stages, label, hot=True))
    return dedupe(out)
