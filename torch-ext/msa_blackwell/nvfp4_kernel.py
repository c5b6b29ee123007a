"""NVFP4 quantiser / dequantiser kernels (``quantize_*_to_nvfp4_128x4``, ``native_nvfp4_dequant_swizzled_to_bf16``).

Two-pass quantiser implementing the docs/API.md §5.8 algorithm bit-exactly, two launches (K and V of equal
layout share them):

1. ``_nvfp4_amax_kernel``: persistent grid-stride max |x| (software-pipelined 16 KB tiles), one partial per
   program (at most ``_NP``); NaN is ignored.
2. ``_nvfp4_quant_kernel``: persistent over 128-row x 64-column tiles, tail first (the amax pass read it last,
   so it is still in L2); every program reduces the partials once, program 0 writes the global scale. Rows
   are permuted inside a tile so that its 4 scale columns are one whole 512-byte swizzle tile (a contiguous
   store); codes are packed 8 per int32 word. The E2M1 encoder is 3 FMAs and 4 min/max per element
   (``_e2m1_biased``); the E4M3 scale uses the hardware RNE-satfinite conversion on sm_89+ (else the integer
   encoder ``_e4m3_rne_satfinite``, bit-identical). A block holding a NaN gets scale byte ``0x7F`` and zero
   codes (docs/API.md §12.3).

``_nvfp4_dequant_kernel`` writes bf16 ``(e2m1 * E4M3(scale)) * g`` bit patterns, bit-identical to the PyTorch
``dequantize_nvfp4_128x4_to_bf16``. The E2M1 / E4M3 decoders are the ones of ``nvfp4_tile``.
"""

import torch
import triton
import triton.language as tl

from ._common import cuda_properties, prod, round_up
from .nvfp4_tile import e2m1_code_to_f32, e4m3_code_to_f32

__all__ = ["quant_outputs", "quantize", "dequantize", "collapse_lead", "aot_configs"]


def collapse_lead(x: torch.Tensor):
    """View ``x [*lead, D]`` as ``[n0, n1, n2, D]`` with strides ``(s0, s1, s2, sD)`` (no copy when possible).

    Adjacent leading dims are merged when their strides allow it; more than three irreducible
    leading dims fall back to a contiguous copy. Returns ``(x, (n0, n1, n2), (s0, s1, s2, sD))``.
    """
    dims = [(int(n), int(s)) for n, s in zip(x.shape[:-1], x.stride()[:-1]) if int(n) != 1]
    merged = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:
            pn, _ = merged[-1]
            merged[-1] = (pn * n, s)
        else:
            merged.append((n, s))
    if len(merged) > 3:
        x = x.contiguous()
        merged = [(prod(x.shape[:-1]), int(x.shape[-1]))]
    while len(merged) < 3:
        merged.insert(0, (1, 0))
    (n0, s0), (n1, s1), (n2, s2) = merged
    return x, (n0, n1, n2), (s0, s1, s2, int(x.stride(-1)))


@triton.jit
def _row_offsets(rows, n1, n2, s0, s1, s2):
    rows64 = rows.to(tl.int64)
    i2 = rows64 % n2
    t = rows64 // n2
    i1 = t % n1
    i0 = t // n1
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def _tile_rows(row0, lr, n1, n2, s0, s1, s2, ROWS: tl.constexpr):
    """(scalar int64 base, per-row offsets) of rows ``row0 + lr`` of the collapsed ``[n0, n1, n2]`` lead dims.

    ``ROWS`` 0: flat (``n0 = n1 = 1``), offset ``row * s2``; 1: paged (no tile crosses a boundary of the
    innermost dim: one 32-bit divmod per tile), int32 offsets inside the tile; 2: generic, int64 per-row
    divmod (base 0). The host picks 0/1 only when the in-tile offsets fit in int32.
    """
    if ROWS == 0:
        base = row0.to(tl.int64) * s2
        roff = lr * s2
    elif ROWS == 1:
        tq = row0 // n2
        base = (tq // n1).to(tl.int64) * s0 + (tq % n1).to(tl.int64) * s1 + (row0 % n2).to(tl.int64) * s2
        roff = lr * s2
    else:
        base = tl.zeros([], dtype=tl.int64)
        roff = _row_offsets(row0 + lr, n1, n2, s0, s1, s2)
    return base, roff


@triton.jit
def _pair_program(PAIR: tl.constexpr):
    """``(pid, G, p, is_y)``: the program id, programs per tensor ``G``, this program's index ``p`` among its
    tensor's programs, and whether that tensor is ``y`` (``PAIR``: programs ``[G, 2G)`` take ``y``; else none)."""
    pid = tl.program_id(0)
    if PAIR:
        G = tl.num_programs(0) // 2
    else:
        G = tl.num_programs(0)
    is_y = pid >= G
    return pid, G, tl.where(is_y, pid - G, pid), is_y


@triton.jit
def _nvfp4_amax_kernel(x_ptr, y_ptr, part_ptr, R, D, n_tiles, n_ct, n1, n2, s0, s1, s2, sD,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr,
                       PAIR: tl.constexpr):
    """Partial max |x| of ``BLOCK_R x BLOCK_D`` tiles, written to ``part_ptr[pid]``.

    Program ``p`` of a tensor takes the tiles ``p, p + G, ...`` (``G`` programs per tensor): grid-stride,
    software-pipelined (``STAGES`` tiles in flight), so the tiles read last are the tensor's tail, where
    the quantise pass starts (L2 hits). ``PAIR``: programs ``[G, 2G)`` do the same for ``y`` (same shape and
    strides as ``x``). ``ROWS``: see ``_tile_rows``.
    """
    pid, G, p, is_y = _pair_program(PAIR)
    if PAIR:
        x_ptr = tl.where(is_y, y_ptr, x_ptr)
    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for t in tl.range(p, n_tiles, G, num_stages=STAGES):
        rt = t // n_ct
        ct = t - rt * n_ct
        base, roff = _tile_rows(rt * BLOCK_R, rr, n1, n2, s0, s1, s2, ROWS)
        cols = ct * BLOCK_D + cc
        m = ((rt * BLOCK_R + rr)[:, None] < R) & (cols[None, :] < D)
        x = tl.load(x_ptr + base + roff[:, None] + (cols * sD)[None, :], mask=m, other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
    tl.store(part_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _e4m3_rne_satfinite(v):
    """E4M3FN code (int32, 0..0x7E) of a non-negative finite-or-inf fp32 ``v``, RNE, saturating to 448."""
    bits = v.to(tl.int32, bitcast=True)
    # normal range (v >= 2^-6): keep 3 mantissa bits with round-to-nearest-even on the bit pattern
    code_n = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    code_n = tl.minimum(code_n, 0x7E)
    # subnormal range: m * 2^-9, m = RNE(v * 512) in [0, 8] (8 is the smallest normal, code 8)
    y = v * 512.0
    fl = tl.floor(y)
    fr = y - fl
    fli = fl.to(tl.int32)
    up = (fr > 0.5) | ((fr == 0.5) & ((fli & 1) == 1))
    code_s = fli + up.to(tl.int32)
    return tl.where(v < 0.015625, code_s, code_n)


@triton.jit
def _max_propagate_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# bits of M = 1.5 * 2^22 (fp32 ulp 0.5) summed at the 8 nibble shifts, mod 2^32
_E2M1_WORD_BIAS = tl.constexpr((0x4AC00000 * 0x11111111) & 0xFFFFFFFF)


@triton.jit
def _e2m1_biased(w):
    """E2M1 code of fp32 ``w`` plus ``0x4AC00000`` (uint32): RNE, ties to even, saturating to 6, sign in bit 3.

    ``a = |w|`` maps onto a uniform 0.5-step grid by the concave ``u = min(a, a/2 + 1, a/4 + 2)`` (the E2M1
    magnitude ``LUT[n]`` maps to ``n / 2``). Each line is evaluated with the magic ``M = 1.5 * 2^22`` added
    (ulp 0.5), so one fp32 rounding gives ``RNE(2u)`` exactly: the ``a * 2^-k`` products are exact, and
    rounding is monotone, so the min of the rounded lines is the rounded min. ``max(., M)`` maps NaN to
    code 0 (max/min ignore NaN), ``min(., M + 3.5)`` saturates to code 7; the result's bits are
    ``bits(M) + code``, and the sign adds 8.
    """
    a = tl.abs(w)
    t = tl.minimum(tl.minimum(a + 6291456.0, a * 0.5 + 6291457.0), a * 0.25 + 6291458.0)
    t = tl.minimum(tl.maximum(t, 6291456.0), 6291459.5)
    neg = w.to(tl.uint32, bitcast=True) >> 31
    return t.to(tl.uint32, bitcast=True) | (neg << 3)


@triton.jit
def _e2m1_rne_satfinite(w):
    """E2M1 code (int32, 0..15) of fp32 ``w``: RNE with ties to even, saturating to 6, sign kept; NaN -> 0 (+sign)."""
    return (_e2m1_biased(w) - 0x4AC00000).to(tl.int32, bitcast=True)


@triton.jit
def _nvfp4_quant_kernel(x_ptr, y_ptr, part_ptr, n_parts, data_ptr, data_y_ptr, scale_ptr, scale_y_ptr, gs_ptr, gs_y_ptr,
                        R, C, CP, n_tiles, n_ct, n1, n2, s0, s1, s2, sD,
                        NP: tl.constexpr, ROWS: tl.constexpr, HW_CVT: tl.constexpr, STAGES: tl.constexpr,
                        PAIR: tl.constexpr):
    """Quantise tiles of 128 rows x 4 groups of 16 (64 columns; rows up to ``round_up(R, 128)``), persistent.

    * The whole-tensor amax is the max of the amax pass's ``n_parts`` partials (reduced once per program);
      the tensor's program 0 writes the global scale.
    * Program ``p`` (of ``G`` per tensor) takes tiles ``n_tiles - 1 - (p + k * G)``: tail first, which the
      amax pass read last (L2 hits); loads are software-pipelined (``STAGES``).
    * Slot ``i`` of a tile holds row ``(i % 4) * 32 + i // 4``, so the tile's scales ``[128, 4]`` are one whole
      512-byte swizzle tile, byte ``i * 4 + c``.
    * Codes are packed 8 per int32 word (element ``8w + k`` in nibble ``k``): the data pointers are int32.
    * ``HW_CVT``: E4M3 scale via the hardware RNE-satfinite conversion (sm_89+), else the integer encoder.
    * ``PAIR``: programs ``[G, 2G)`` quantise ``y`` (same shape and strides) into the ``*_y_ptr`` outputs,
      with the partials ``[n_parts, 2 n_parts)``.
    Rows ``>= R`` / groups ``>= C`` read as zero, so their scale bytes (the swizzle padding) are 0.
    """
    pid, G, p, is_y = _pair_program(PAIR)
    if PAIR:
        x_ptr = tl.where(is_y, y_ptr, x_ptr)
        part_ptr = part_ptr + tl.where(is_y, n_parts, 0)
        data_ptr = tl.where(is_y, data_y_ptr, data_ptr)
        scale_ptr = tl.where(is_y, scale_y_ptr, scale_ptr)
        gs_ptr = tl.where(is_y, gs_y_ptr, gs_ptr)
    pp = tl.arange(0, NP)
    amax = tl.max(tl.load(part_ptr + pp, mask=pp < n_parts, other=0.0), axis=0, keep_dims=True)  # [1]
    s_enc = tl.minimum(tl.math.div_rn(tl.full([1], 2688.0, tl.float32), amax), 3.4028234663852886e38)
    s_enc = tl.where((amax == 0.0) | (s_enc == 0.0), 1.0, s_enc)
    inv_s = tl.math.div_rn(tl.full([1], 1.0, tl.float32), s_enc)
    s_enc6 = s_enc * 0.16666666666666666  # fp32(1/6)
    if p == 0:
        tl.store(gs_ptr + tl.arange(0, 1), tl.math.div_rn(amax, tl.full([1], 2688.0, tl.float32)))

    i = tl.arange(0, 128)
    lr = (i % 4) * 32 + i // 4
    c4 = tl.arange(0, 4)
    hw = tl.arange(0, 2)
    nib = (4 * tl.arange(0, 8)).to(tl.uint32)
    for k in tl.range(p, n_tiles, G, num_stages=STAGES):
        t = n_tiles - 1 - k
        rt = t // n_ct
        ct = t - rt * n_ct
        rows = rt * 128 + lr
        row_ok = rows < R
        cols = ct * 64 + tl.arange(0, 64)
        base, roff = _tile_rows(rt * 128, lr, n1, n2, s0, s1, s2, ROWS)
        m = row_ok[:, None] & (cols[None, :] < C * 16)
        x = tl.load(x_ptr + base + roff[:, None] + (cols * sD)[None, :], mask=m, other=0.0)
        x4 = tl.reshape(x.to(tl.float32), [128, 4, 2, 8])
        # block amax with a NaN-propagating max (max.NaN: same cost as the plain max), so v is NaN exactly for
        # the blocks holding a NaN. NaN policy: such a block gets the NaN scale byte 0x7F and all-zero codes
        # (it dequantises to 16 NaNs); the amax pass ignored NaN, so no other block changes
        v = tl.reduce(tl.reduce(tl.abs(x4), 3, _max_propagate_nan), 2, _max_propagate_nan) * s_enc6  # [128, 4]
        nanb = v != v
        if HW_CVT:
            f8 = tl.where(v != v, 448.0, v).to(tl.float8e4nv)  # cvt.rn.satfinite; NaN as the integer encoder (448)
            sc = f8.to(tl.uint8, bitcast=True)
            sf = f8.to(tl.float32)
        else:
            code = _e4m3_rne_satfinite(v)
            sc = code.to(tl.uint8)
            sf = e4m3_code_to_f32(code)
        sc = tl.where(nanb, 0x7F, sc)
        prod = sf * inv_s
        coef = tl.minimum(tl.math.div_rn(tl.full([128, 4], 1.0, tl.float32), prod), 3.4028234663852886e38)
        coef = tl.where(prod == 0.0, 3.4028234663852886e38, coef)
        biased = _e2m1_biased(x4 * coef[:, :, None, None])  # [128, 4, 2, 8] uint32, code + bits(M)
        biased = tl.where(nanb[:, :, None, None], 0x4AC00000, biased)  # NaN block: code 0 everywhere
        # element 8w + k in nibble k of word w; the bias terms sum to the constant _E2M1_WORD_BIAS (mod 2^32)
        words = tl.sum(biased << nib[None, None, None, :], axis=3) - _E2M1_WORD_BIAS  # [128, 4, 2]
        # data: int32 word (4 ct + c) * 2 + h of row rt * 128 + lr
        cw = (ct * 4 + c4) * 2
        doff = (lr * (C * 2))[:, None, None] + cw[None, :, None] + hw[None, None, :]
        tl.store(data_ptr + (rt * 128).to(tl.int64) * (C * 2) + doff, words.to(tl.int32, bitcast=True),
                 mask=row_ok[:, None, None] & (cw < C * 2)[None, :, None])
        # scales: the whole 512-byte tile rt * C' / 4 + ct
        tl.store(scale_ptr + (rt.to(tl.int64) * (CP // 4) + ct) * 512 + (i * 4)[:, None] + c4[None, :], sc)


@triton.jit
def _nvfp4_dequant_kernel(p_ptr, scale_ptr, gs_ptr, gs_val, out_ptr, R, C, n1, n2, s0, s1, s2, sD,
                          HAS_GS_PTR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """Dequantise ``BLOCK_R`` rows x ``BLOCK_B`` packed bytes into bf16 bit patterns (int16 output)."""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    bcol = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    r2 = rows[:, None]
    b2 = bcol[None, :]
    mask = (r2 < R) & (b2 < C * 8)
    roff = _row_offsets(rows, n1, n2, s0, s1, s2)[:, None]
    byte = tl.load(p_ptr + roff + b2.to(tl.int64) * sD, mask=mask, other=0).to(tl.int32) & 0xFF
    c = b2 // 8
    soff = (((r2 // 128) * ((C + 3) // 4) + c // 4) * 512 + (r2 % 32) * 16 + ((r2 % 128) // 32) * 4 + c % 4)
    sbyte = tl.load(scale_ptr + soff.to(tl.int64), mask=mask, other=0).to(tl.int32) & 0xFF
    sf = e4m3_code_to_f32(sbyte)
    if HAS_GS_PTR:
        g = tl.load(gs_ptr)
    else:
        g = gs_val
    v_lo = (e2m1_code_to_f32(byte & 15) * sf) * g
    v_hi = (e2m1_code_to_f32(byte >> 4) * sf) * g
    # fp32 -> bf16 round-to-nearest-even on the bit pattern (NaN -> canonical 0x7FC0)
    blo = v_lo.to(tl.int32, bitcast=True)
    bhi = v_hi.to(tl.int32, bitcast=True)
    blo = tl.where(v_lo != v_lo, 0x7FC00000, blo + 0x7FFF + ((blo >> 16) & 1))
    bhi = tl.where(v_hi != v_hi, 0x7FC00000, bhi + 0x7FFF + ((bhi >> 16) & 1))
    o_lo = (blo >> 16).to(tl.int16)
    o_hi = (bhi >> 16).to(tl.int16)
    ocol = pid_b * (2 * BLOCK_B) + tl.arange(0, 2 * BLOCK_B)
    ooff = r2.to(tl.int64) * (C * 16) + ocol[None, :]
    omask = (r2 < R) & (ocol[None, :] < C * 16)
    tl.store(out_ptr + ooff, tl.reshape(tl.join(o_lo, o_hi), [BLOCK_R, 2 * BLOCK_B]), mask=omask)



_NP = 512  # max amax-pass partials (power of two; every quantise program reduces them all)
_STAGES = 3  # tiles in flight per program (software-pipelined loads) in both passes
_CTAS_PER_SM = 2  # persistent grids: programs per SM


def _amax_blocks(D: int):
    """(BLOCK_R, BLOCK_D, num_warps) of the amax pass: 8192-element tiles, at most 256 columns."""
    bd = min(triton.next_power_of_2(D), 256)
    return 8192 // bd, bd, 8


_QUANT_WARPS = 8  # quantise pass: 128 x 64 tiles (8192 elements), 32 per thread
# E4M3 block scales through cvt.rn.satfinite.e4m3x2.f32 on sm_89+ (bit-identical to _e4m3_rne_satfinite for
# every non-NaN input; NaN is mapped to 448 first); False: the integer encoder everywhere
_E4M3_HW_CVT = True


def _cuda_caps(index: int):
    """(SM count, has the sm_89+ E4M3 conversion) of CUDA device ``index`` (host properties, no sync)."""
    major, minor, sms = cuda_properties(index)
    return sms, _E4M3_HW_CVT and (major, minor) >= (8, 9)


def _rows_mode(n0: int, n1: int, n2: int, s0: int, s1: int, s2: int, block_r: int, R: int) -> int:
    """``ROWS`` of ``_tile_rows`` for ``block_r``-row tiles: 0 flat, 1 paged, 2 generic (per-row int64)."""
    fits = block_r * abs(s2) < 2**31 and R < 2**31
    if n0 == 1 and n1 == 1 and fits:
        return 0
    if n2 % block_r == 0 and fits:
        return 1
    return 2



def quant_outputs(x: torch.Tensor):
    """Empty (data uint8 [*lead, D/2], scale uint8 [R', C'], global_scale fp32 [1]) for ``x [*lead, D]``."""
    lead = tuple(x.shape[:-1])
    D = x.shape[-1]
    R = prod(lead)
    data = x.new_empty((*lead, D // 2), dtype=torch.uint8)
    scale = x.new_empty((round_up(R, 128), round_up(D // 16, 4)), dtype=torch.uint8)
    return data, scale, x.new_empty((1,), dtype=torch.float32)


def quantize(x: torch.Tensor, y=None):
    """Quantise ``x [*lead, D]`` (bf16/fp16) and optionally ``y`` (same shape, dtype and strides, quantised
    independently): ``[data, scale, global_scale]`` of x, then of y. Two launches: the amax pass (grid-stride
    partials, at most ``_NP`` per tensor), then the quantise pass."""
    if y is not None and (y.shape != x.shape or y.stride() != x.stride() or y.dtype != x.dtype
                          or y.device != x.device):
        raise ValueError("y must have x's shape, strides, dtype and device")
    outs = list(quant_outputs(x)) + (list(quant_outputs(y)) if y is not None else [])
    D = int(x.shape[-1])
    R = prod(tuple(x.shape[:-1]))
    C = D // 16
    RP, CP = round_up(R, 128), round_up(C, 4)
    dev = x.device
    if R == 0 or D == 0:
        for i in range(0, len(outs), 3):
            outs[i + 1].zero_()
            outs[i + 2].zero_()
        return outs
    if dev.type == "cpu" and x.dtype == torch.bfloat16:
        # the interpreter's bf16 handling is unreliable; bf16 -> fp32 is exact
        x = x.float()
        y = y.float() if y is not None else None
    if int(x.stride(-1)) * D >= 2**31:  # 32-bit in-row offsets
        x = x.contiguous()
        y = y.contiguous() if y is not None else None
    # identical shapes and strides collapse identically (both copied or neither)
    xc, (n0, n1, n2), (s0, s1, s2, sD) = collapse_lead(x)
    yc = collapse_lead(y)[0] if y is not None else None
    pair = yc is not None
    ny = 2 if pair else 1
    if dev.type == "cuda":
        sms, hw_cvt = _cuda_caps(dev.index if dev.index is not None else torch.cuda.current_device())
        cap = max(1, min(_NP, _CTAS_PER_SM * sms // ny))
        NP = _NP
    else:  # interpreter: few programs, so the grid-stride loops run several tiles each
        cap, NP, hw_cvt = 3, 4, False
    BRA, BDA, wa = _amax_blocks(D)
    n_ct_a = triton.cdiv(D, BDA)
    n_tiles_a = triton.cdiv(R, BRA) * n_ct_a
    ga = min(n_tiles_a, cap)
    parts = torch.empty(ga * ny, dtype=torch.float32, device=dev)
    _nvfp4_amax_kernel[(ga * ny,)](xc, yc if pair else xc, parts, R, D, n_tiles_a, n_ct_a, n1, n2, s0, s1, s2, sD,
                                   BLOCK_R=BRA, BLOCK_D=BDA, ROWS=_rows_mode(n0, n1, n2, s0, s1, s2, BRA, R),
                                   STAGES=_STAGES, PAIR=pair, num_warps=wa)
    n_ct = CP // 4
    n_tiles = (RP // 128) * n_ct
    gq = min(n_tiles, cap)
    d, sc, gs = outs[0].view(torch.int32), outs[1], outs[2]
    dy, scy, gsy = (outs[3].view(torch.int32), outs[4], outs[5]) if pair else (d, sc, gs)
    _nvfp4_quant_kernel[(gq * ny,)](xc, yc if pair else xc, parts, ga, d, dy, sc, scy, gs, gsy,
                                    R, C, CP, n_tiles, n_ct, n1, n2, s0, s1, s2, sD,
                                    NP=NP, ROWS=_rows_mode(n0, n1, n2, s0, s1, s2, 128, R), HW_CVT=hw_cvt,
                                    STAGES=_STAGES, PAIR=pair, num_warps=_QUANT_WARPS)
    return outs


def dequantize(packed: torch.Tensor, scale_128x4: torch.Tensor, global_scale, global_scale_value: float):
    """packed uint8 [*lead, cols/2] + swizzled scales -> bf16 [*lead, cols] (global scale: tensor element 0, or
    ``global_scale_value`` when ``global_scale`` is None)."""
    lead = tuple(packed.shape[:-1])
    nb = int(packed.shape[-1])
    out = torch.empty(*lead, nb * 2, dtype=torch.bfloat16, device=packed.device)
    R = prod(lead)
    if R == 0 or nb == 0:
        return out
    C = (nb * 2) // 16
    p, (n0, n1, n2), (s0, s1, s2, sD) = collapse_lead(packed)
    sflat = scale_128x4.reshape(-1)
    BLOCK_B = min(triton.next_power_of_2(nb), 64)
    BLOCK_R = max(1, 4096 // BLOCK_B)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(nb, BLOCK_B))
    gs_ptr = global_scale.reshape(-1) if global_scale is not None else sflat
    _nvfp4_dequant_kernel[grid](p, sflat, gs_ptr, float(global_scale_value), out.view(torch.int16), R, C,
                                n1, n2, s0, s1, s2, sD, HAS_GS_PTR=global_scale is not None,
                                BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B)
    return out


def aot_configs(arch: int, full: bool = False):
    """Quantiser / dequantiser launch configurations (``num_stages`` 3; the two quantiser loops pipeline with
    ``_STAGES`` through ``tl.range``).

    * ``_nvfp4_amax_kernel``: ``_amax_blocks(D)`` (BLOCK_D = min(next_pow2(D), 256), BLOCK_R = 8192 / BLOCK_D,
      8 warps), row modes flat / paged / generic, one column tile (D <= 256: ``n_ct`` specialised to 1) or
      several.
    * ``_nvfp4_quant_kernel``: 128 x 64 tiles, ``_QUANT_WARPS`` warps, ``NP = _NP`` partials, row modes flat /
      paged / generic, hardware E4M3 conversion (every CUDA target here is sm_89+; the integer encoder is the
      interpreter's path, compiled only with ``full``), ``n_ct`` 1 (D <= 64) or more.
    * Both: single tensor or ``PAIR`` (``quantize_kv_bf16_to_nvfp4_128x4`` with K / V of equal layout).
    * ``_nvfp4_dequant_kernel``: ``BLOCK_B = min(next_pow2(D/2), 64)`` (8..64, D a multiple of 16), 4 warps.
    Input bf16/fp16 (CI: bf16)."""
    from ._aot import AotConfig, dedupe

    out = []
    row = dict(R="i32", C="i32", n1="i32", n2="i32", s0="i32:D", s1="i32:D", s2="i32:D", sD=1)
    # CI subset: every tile shape class and each row mode / PAIR / n_ct value at least once
    ci_amax = {(128, 0, False), (128, 1, True), (16, 2, False), (512, 0, True), (64, 1, False)}
    ci_quant = {(1, 0, False), ("i32", 1, True), ("i32", 2, False), (1, 0, True)}
    for xd in (("bf16", "fp16") if full else ("bf16",)):
        for D in (16, 32, 64, 128, 256, 512):
            br, bd, nw = _amax_blocks(D)
            for rows in (0, 1, 2):
                for pair in (False, True):
                    if not full and (D, rows, pair) not in ci_amax:
                        continue
                    args = dict(row, x_ptr="*" + xd, y_ptr="*" + xd, part_ptr="*fp32", D="i32:D", n_tiles="i32",
                                n_ct=1 if D <= bd else "i32", BLOCK_R=br, BLOCK_D=bd, ROWS=rows, STAGES=_STAGES,
                                PAIR=pair)
                    del args["C"]
                    out.append(AotConfig(_nvfp4_amax_kernel, args, nw, 3,
                                         f"amax {xd} BR{br} BD{bd} ct{args['n_ct']} rows{rows} pair{int(pair)}"))
        for n_ct in (1, "i32"):
            for rows in (0, 1, 2):
                for hw in ((True, False) if full else (True,)):
                    for pair in (False, True):
                        if not full and (n_ct, rows, pair) not in ci_quant:
                            continue
                        args = dict(row, x_ptr="*" + xd, y_ptr="*" + xd, part_ptr="*fp32", n_parts="i32",
                                    data_ptr="*i32", data_y_ptr="*i32", scale_ptr="*u8", scale_y_ptr="*u8",
                                    gs_ptr="*fp32", gs_y_ptr="*fp32", CP="i32", n_tiles="i32", n_ct=n_ct, NP=_NP,
                                    ROWS=rows, HW_CVT=hw, STAGES=_STAGES, PAIR=pair)
                        out.append(AotConfig(_nvfp4_quant_kernel, args, _QUANT_WARPS, 3,
                                             f"quant {xd} ct{n_ct} rows{rows} hw{int(hw)} pair{int(pair)}"))
    for bb in (8, 16, 32, 64):
        for gs in (False, True):
            out.append(AotConfig(_nvfp4_dequant_kernel, dict(row, p_ptr="*u8", scale_ptr="*u8", gs_ptr="*fp32" if gs else "*u8",
                                                             gs_val="fp32", out_ptr="*i16", HAS_GS_PTR=gs,
                                                             BLOCK_R=max(1, 4096 // bb), BLOCK_B=bb),
                                 4, 3, f"dequant BB{bb} gs_ptr{int(gs)}"))
    return dedupe(out)
