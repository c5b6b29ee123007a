"""Triton helpers that read NVFP4 K/V tiles inside the attention kernels (docs/API.md §5.6, §5.13).

The attention kernels never materialise dequantised K/V in memory: they call ``nvfp4_tile`` where
they would load a bf16 tile. It reads the packed E2M1 bytes and the 128x4-swizzled E4M3 block
scales of ``N`` rows and returns ``e2m1 * scale`` ([N, D], in the kernel's compute dtype). The
global scale is NOT applied here: the kernels fold ``k_global`` into the logit scale and apply
``v_global`` once to the output (§5.13 allows both). ``e2m1 * E4M3`` has at most 5 significant bits
and lies in [2^-10, 2688], so the product is exact in bf16 and in fp16: the tile equals
``dequantize_nvfp4_128x4_to_bf16(..., include_global_scale=False)`` bit for bit.
"""

import triton
import triton.language as tl


@triton.jit
def e4m3_code_to_f32(code):
    """Value of an E4M3FN byte (int32, sign bit 7); 0x7F/0xFF decode to NaN."""
    mag = code & 0x7F
    e = mag >> 3
    m = mag & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    val = tl.where(e == 0, sub, normal)
    val = tl.where(mag == 0x7F, float("nan"), val)
    return tl.where((code & 0x80) != 0, -val, val)


@triton.jit
def e2m1_code_to_f32(code):
    """Value of an E2M1 nibble (int32 0..15): sign bit 3, magnitude [0, .5, 1, 1.5, 2, 3, 4, 6]."""
    m = code & 7
    bits = tl.where(m >= 2, (((m >> 1) + 126) << 23) | ((m & 1) << 22), tl.where(m == 1, 0x3F000000, 0))
    bits = bits | ((code & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def nvfp4_scale_offset(srow, c, CP: tl.constexpr):
    """Flat byte offset of logical scale (row ``srow``, column ``c``) in the 128x4 layout (CP columns padded)."""
    return ((srow // 128) * (CP // 4) + c // 4) * 512 + (srow % 32) * 16 + ((srow % 128) // 32) * 4 + c % 4


@triton.jit
def nvfp4_tile(P, S, byte_off, srow, ok, sd, N: tl.constexpr, D: tl.constexpr, CDT: tl.constexpr):
    """Dequantised (no global scale) NVFP4 rows as a ``[N, D]`` tile of dtype ``CDT``.

    P: packed uint8 base pointer; ``byte_off [N]`` int64 offset of each row's first packed byte;
    ``sd``: stride between packed bytes of a row. S: swizzled scale bytes; ``srow [N]`` int64 logical
    scale row of each tile row. Rows with ``ok == False`` are not read and come back as 0.
    """
    C: tl.constexpr = D // 16
    CP: tl.constexpr = (C + 3) // 4 * 4
    ob = tl.arange(0, D // 2)
    byte = tl.load(P + byte_off[:, None] + ob[None, :] * sd, mask=ok[:, None], other=0).to(tl.int32) & 0xFF
    lo = e2m1_code_to_f32(byte & 15)
    hi = e2m1_code_to_f32(byte >> 4)
    x = tl.reshape(tl.join(lo, hi), [N, D])  # element 2k = low nibble of byte k, 2k+1 = high nibble
    c = tl.arange(0, C)
    soff = nvfp4_scale_offset(srow[:, None], c[None, :], CP)
    sb = tl.load(S + soff, mask=ok[:, None], other=0).to(tl.int32) & 0xFF
    sf = e4m3_code_to_f32(sb)
    x = tl.reshape(tl.reshape(x, [N, C, 16]) * sf[:, :, None], [N, D])
    return x.to(CDT)


# ---------------------------------------------------------------------------------------------------
# fp16 tiles scaled by 2^-7 (the decode kernel and the prefill kernel's fp16-tile decoders). A tile element
# is ``e2m1 * E4M3scale * 2^-7``, exact in fp16: the E2M1 nibble is placed bit-wise into an fp16
# (``mag << 9 | sign << 15`` is the fp16 ``e2m1 * 2^-14``, subnormal for 0.5) and multiplied once by
# ``scale * 2^7`` (<= 448 * 2^7 < 65504); the product has at most 5 significant bits and lies in
# [2^-17, 21] (fp16 subnormals reach 2^-24): exact. The kernels put the 2^7 (``FP4_POW2``) back outside
# the MMAs (logit scale / final output).
# ---------------------------------------------------------------------------------------------------
FP4_POW2 = tl.constexpr(128.0)  # the fp16 tiles hold e2m1 * scale / FP4_POW2 (.value: the float)

# FP4_DEC (constexpr) selects the nibble decoder: 0 = portable Triton (also the CPU interpreter, which
# cannot run inline PTX); 1 = PTX inline asm (GPU only): 4 packed bytes per 32-bit register, per byte the
# fp16 high byte of both nibbles by shift/mask over all four bytes at once, PRMT into f16x2 lanes, one
# mul.f16x2 with the block scales per two elements.
FP4_DEC_PORTABLE = 0
FP4_DEC_ASM = 1

# PTX per 4 packed bytes ($4) and their block scales as two f16x2 ($5, $6): outputs $0, $1 = even
# (low-nibble) elements of bytes 0-1 / 2-3, $2, $3 = odd (high-nibble) elements. E = per byte the fp16
# high byte of the low nibble (mag << 1 | sign << 7), O = the same for the high nibble; PRMT moves them
# into the high byte of each 16-bit lane (low byte 0): fp16 e2m1 * 2^-14.
FP4_ASM_F16 = tl.constexpr("""
        {
        .reg .b32 e, o, a, c;
        shl.b32 a, $4, 1;
        shl.b32 c, $4, 4;
        and.b32 a, a, 0x0E0E0E0E;
        and.b32 c, c, 0x80808080;
        or.b32 e, a, c;
        shr.u32 a, $4, 3;
        and.b32 a, a, 0x0E0E0E0E;
        and.b32 c, $4, 0x80808080;
        or.b32 o, a, c;
        prmt.b32 a, e, 0, 0x1404;
        mul.rn.f16x2 $0, a, $5;
        prmt.b32 a, e, 0, 0x3424;
        mul.rn.f16x2 $1, a, $6;
        prmt.b32 a, o, 0, 0x1404;
        mul.rn.f16x2 $2, a, $5;
        prmt.b32 a, o, 0, 0x3424;
        mul.rn.f16x2 $3, a, $6;
        }
        """)


@triton.jit
def fp4_asm_f16(b, sc):
    """(even, odd) fp16 ``e2m1(nibble) * 2^-14 * sc`` of the low / high nibble of uint8 bytes ``b`` (GPU only).

    ``is_pure=False`` keeps Triton from re-materialising the decode in the MMA operand layout (where
    every byte would be read and decoded separately): the decode runs on consecutive bytes per thread
    and its fp16 result goes to the MMA layout through shared memory like a bf16 tile.
    """
    ev, od = tl.inline_asm_elementwise(asm=FP4_ASM_F16, constraints="=r,=r,=r,=r,r,r,r", args=[b, sc],
                                       dtype=(tl.float16, tl.float16), is_pure=False, pack=4)
    return ev, od


@triton.jit
def e4m3_times_128_f16(code):
    """fp16 ``E4M3(code) * 2^7`` of E4M3FN bytes (int32): the bits ``sign << 15 | mag << 7`` are the fp16
    ``E4M3 * 2^-8`` (subnormals included), times 2^15 exactly; 0x7F / 0xFF decode to NaN."""
    h = (((code & 0x7F) << 7) | ((code & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True) * 32768.0
    return tl.where((code & 0x7F) == 0x7F, float("nan"), h)


@triton.jit
def nvfp4_scale_bytes(S, srow, ok, C: tl.constexpr):
    """E4M3 scale bytes ``[N, C]`` (uint8) of ``N`` rows: ``srow [N]`` int64 logical scale rows of the 128x4
    layout ``S``. Rows with ``ok == False`` are not read and come back as 0."""
    CP: tl.constexpr = (C + 3) // 4 * 4
    cc = tl.arange(0, C)
    return tl.load(S + nvfp4_scale_offset(srow[:, None], cc[None, :], CP), mask=ok[:, None], other=0)


@triton.jit
def nvfp4_load_bytes(P, S, byte_off, srow, ok, sd, D: tl.constexpr):
    """Packed bytes ``[N, D/16, 8]`` (uint8; entry ``[n, c, j]`` = byte ``8c + j`` of row ``n``) and scale bytes
    ``[N, D/16]`` of ``N`` NVFP4 rows, not decoded. Arguments as ``nvfp4_tile``."""
    C: tl.constexpr = D // 16
    col = tl.arange(0, C)[:, None] * 8 + tl.arange(0, 8)[None, :]  # [C, 8] byte index: 8 bytes per 16-element block
    byte = tl.load(P + byte_off[:, None, None] + col[None, :, :] * sd, mask=ok[:, None, None], other=0)
    return byte, nvfp4_scale_bytes(S, srow, ok, C)


@triton.jit
def nvfp4_tiles_f16(P, S, byte_off, srow, ok, sd, N: tl.constexpr, D: tl.constexpr, FP4_DEC: tl.constexpr):
    """Even / odd NVFP4 tiles ``[N, D/16, 8]`` fp16 of ``N`` rows, holding ``e2m1 * E4M3scale / FP4_POW2``.

    Arguments as ``nvfp4_tile``. Entry ``[n, c, j]`` of the even (odd) tile is element ``16c + 2j``
    (``16c + 2j + 1``) of row ``n``. Rows with ``ok == False`` are not read and come back as 0.
    """
    byte, sb = nvfp4_load_bytes(P, S, byte_off, srow, ok, sd, D)
    return nvfp4_decode_bytes_f16(byte, sb, N, D // 16, FP4_DEC)


@triton.jit
def e2m1_nibbles_f16(b):
    """(low, high) nibble of int32 bytes ``b`` (0..255) as fp16 ``e2m1 * 2^-14`` (bits ``mag << 9 | sign << 15``)."""
    ev = (((b & 0x7) << 9) | ((b & 0x8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)
    od = (((b & 0x70) << 5) | ((b & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)
    return ev, od


@triton.jit
def nvfp4_decode_bytes_f16(byte, sb, N: tl.constexpr, C: tl.constexpr, FP4_DEC: tl.constexpr):
    """Even / odd ``[N, C, 8]`` fp16 tiles ``e2m1 * scale / FP4_POW2`` from packed bytes ``[N, C, 8]`` (uint8)
    and their E4M3 scale bytes ``[N, C]``; ``FP4_DEC`` 1 = the PTX decoder, 0 = portable."""
    sf = e4m3_times_128_f16(sb.to(tl.int32) & 0xFF)
    if FP4_DEC == 1:
        ev, od = fp4_asm_f16(byte, tl.broadcast_to(sf[:, :, None], [N, C, 8]))
    else:
        ev, od = e2m1_nibbles_f16(byte.to(tl.int32) & 0xFF)
        ev = ev * sf[:, :, None]
        od = od * sf[:, :, None]
    return ev, od


@triton.jit
def nvfp4_tile_f16(P, S, byte_off, srow, ok, sd, N: tl.constexpr, D: tl.constexpr, FP4_DEC: tl.constexpr):
    """``[N, D]`` fp16 tile ``e2m1 * E4M3scale / FP4_POW2`` in natural column order (``nvfp4_tile / 128``,
    bit-exact). The two nibble tiles are interleaved in registers (join + reshape of per-thread data)."""
    ev, od = nvfp4_tiles_f16(P, S, byte_off, srow, ok, sd, N, D, FP4_DEC)
    return tl.reshape(tl.join(ev, od), [N, D])


@triton.jit
def nvfp4_q_f16(q, RESCALE: tl.constexpr):
    """``q [M, D]`` (any float dtype) as fp16 for MMAs against ``nvfp4_tile_f16`` tiles, and the per-row
    logit factor ``[M]`` fp32 that undoes the rescale.

    RESCALE (bf16 / fp8-widened q): each row is scaled by ``2^(14 - e)``, ``e = floor(log2(max |q_row|))``
    clamped to [-110, 127], so its largest elements are exact in fp16 and it cannot overflow (elements
    below ``max * 2^-28`` fall into fp16 subnormals); the factor is ``2^(e - 14)``. fp16 q: as is, factor 1.
    """
    if RESCALE:
        qf = q.to(tl.float32)
        up, down = nvfp4_q_pow2(tl.max(tl.abs(qf), 1))
        return (qf * up[:, None]).to(tl.float16), down
    else:
        return q.to(tl.float16), tl.full([q.shape[0]], 1.0, tl.float32)


@triton.jit
def nvfp4_q_pow2(amax):
    """``(2^(14 - e), 2^(e - 14))`` fp32 of fp32 row maxima ``amax``, ``e = floor(log2(amax))`` clamped to
    [-110, 127]: the per-row power of two that puts a q row into fp16 exactly (``nvfp4_q_f16``) and its inverse."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, -110), 127)
    up = ((141 - e) << 23).to(tl.float32, bitcast=True)  # 2^(14 - e)
    down = ((113 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e - 14)
    return up, down
