"""NVFP4 (E2M1 values, E4M3 16-element block scales, FP32 global scale) quantisation helpers.

API.md §5.6–§5.12 and §7.1.

* ``Nvfp4QuantizedTensor``: frozen dataclass ``(data, scale_128x4, global_scale, logical_scale_shape,
  original_shape)``.
* ``quantize_bf16_to_nvfp4_128x4(x)``: the package's own two-pass Triton quantiser (amax pass, then
  one program per ``BLOCK_R x BLOCK_C`` tile of 16-element blocks) implementing the §5.8 algorithm
  bit-exactly; scales are written straight into the swizzled 128x4 layout (padding 0).
* ``dequantize_nvfp4_128x4_to_bf16`` / ``swizzle_nvfp4_scale_to_128x4`` /
  ``nvfp4_global_scale_from_amax``: pure PyTorch (CPU or CUDA).
* ``native_nvfp4_dequant_swizzled_to_bf16``: Triton dequantiser, bit-identical to
  ``dequantize_nvfp4_128x4_to_bf16``.

Swizzled offset of logical scale ``(r, c)`` with ``C' = round_up(C, 4)``::

    off(r, c) = ((r // 128) * (C' / 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._registry import add_op_namespace_prefix
from ._validate import check_devices, check_tensor

__all__ = [
    "Nvfp4QuantizedTensor",
    "quantize_bf16_to_nvfp4_128x4",
    "quantize_kv_bf16_to_nvfp4_128x4",
    "dequantize_nvfp4_128x4_to_bf16",
    "swizzle_nvfp4_scale_to_128x4",
    "nvfp4_global_scale_from_amax",
    "native_nvfp4_dequant_swizzled_to_bf16",
]

FP4_MAX = 6.0
FP8_E4M3_MAX = 448.0
NVFP4_GLOBAL_DIV = FP4_MAX * FP8_E4M3_MAX  # 2688
FLT_MAX = 3.4028234663852886e38
_ONE_BYTE_DTYPES = tuple(
    d for d in (torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2,
                getattr(torch, "float8_e8m0fnu", None), getattr(torch, "float4_e2m1fn_x2", None))
    if d is not None
)


@dataclass(frozen=True)
class Nvfp4QuantizedTensor:
    """An NVFP4-quantised tensor (API.md §5.7).

    data:                uint8 ``[*original_shape[:-1], original_shape[-1] // 2]``, packed E2M1
                         (element 2k in the low nibble, 2k+1 in the high nibble).
    scale_128x4:         uint8 ``[round_up(R, 128), round_up(C, 4)]``, swizzled E4M3 bytes, padding 0.
    global_scale:        float32 ``[1]`` (consumers read element 0).
    logical_scale_shape: ``(R, C) = (prod(original_shape[:-1]), original_shape[-1] // 16)``.
    original_shape:      the shape of the quantised input.
    """

    data: torch.Tensor
    scale_128x4: torch.Tensor
    global_scale: torch.Tensor
    logical_scale_shape: Tuple[int, int]
    original_shape: Tuple[int, ...]


def _round_up(a, b):
    return (a + b - 1) // b * b


def _prod(xs):
    p = 1
    for v in xs:
        p = p * v
    return p


def _swizzle_offsets(rows: int, cols: int, device) -> torch.Tensor:
    """int64 ``[rows, cols]`` flat offsets ``off(r, c)`` of §5.6 (``C' = round_up(cols, 4)``)."""
    cp4 = _round_up(cols, 4) // 4
    r = torch.arange(rows, device=device, dtype=torch.int64).view(-1, 1)
    c = torch.arange(cols, device=device, dtype=torch.int64).view(1, -1)
    return ((r // 128) * cp4 + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def _collapse_lead(x: torch.Tensor):
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
        merged = [(_prod(x.shape[:-1]), int(x.shape[-1]))]
    while len(merged) < 3:
        merged.insert(0, (1, 0))
    (n0, s0), (n1, s1), (n2, s2) = merged
    return x, (n0, n1, n2), (s0, s1, s2, int(x.stride(-1)))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(rows, n1, n2, s0, s1, s2):
    rows64 = rows.to(tl.int64)
    i2 = rows64 % n2
    t = rows64 // n2
    i1 = t % n1
    i0 = t // n1
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def _nvfp4_amax_kernel(x_ptr, part_ptr, R, C, n1, n2, s0, s1, s2, sD,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-program partial max |x| over a ``BLOCK_R x (BLOCK_C*16)`` tile."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * (BLOCK_C * 16) + tl.arange(0, BLOCK_C * 16)
    roff = _row_offsets(rows, n1, n2, s0, s1, s2)
    mask = (rows[:, None] < R) & (cols[None, :] < C * 16)
    x = tl.load(x_ptr + roff[:, None] + cols[None, :].to(tl.int64) * sD, mask=mask, other=0.0).to(tl.float32)
    m = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    tl.store(part_ptr + pid_r * tl.num_programs(1) + pid_c, m)


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
def _e4m3_code_to_f32(code):
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
def _e2m1_rne_satfinite(w):
    """E2M1 code (int32, 0..15) of fp32 ``w``: RNE with ties to even, saturating to 6, sign kept."""
    a = tl.abs(w)
    code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32))
    neg = w.to(tl.int32, bitcast=True) < 0
    return code | (neg.to(tl.int32) << 3)


@triton.jit
def _e2m1_code_to_f32(code):
    """Value of an E2M1 nibble (int32 0..15): sign bit 3, magnitude [0, .5, 1, 1.5, 2, 3, 4, 6]."""
    m = code & 7
    bits = tl.where(m >= 2, (((m >> 1) + 126) << 23) | ((m & 1) << 22), tl.where(m == 1, 0x3F000000, 0))
    bits = bits | ((code & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nvfp4_quant_kernel(x_ptr, amax_ptr, data_ptr, scale_ptr, R, C, RP, CP, n1, n2, s0, s1, s2, sD,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Quantise a ``BLOCK_R x BLOCK_C`` tile of 16-element blocks (rows up to ``RP``, groups up to ``CP``).

    Rows ``>= R`` / groups ``>= C`` read as zero, so their scale bytes (the swizzle padding) are 0.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    grp = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    kk = tl.arange(0, 8)
    r3 = rows[:, None, None]
    g3 = grp[None, :, None]
    k3 = kk[None, None, :]
    mask = (r3 < R) & (g3 < C)
    # one contiguous [BLOCK_R, BLOCK_C*16] load, split into even / odd elements
    roff2 = _row_offsets(rows, n1, n2, s0, s1, s2)[:, None]
    cols = pid_c * (BLOCK_C * 16) + tl.arange(0, BLOCK_C * 16)
    m2 = (rows[:, None] < R) & (cols[None, :] < C * 16)
    x2 = tl.load(x_ptr + roff2 + cols[None, :].to(tl.int64) * sD, mask=m2, other=0.0).to(tl.float32)
    xe, xo = tl.split(tl.reshape(x2, [BLOCK_R, BLOCK_C, 8, 2]))

    amax = tl.load(amax_ptr + tl.zeros([1], dtype=tl.int32))  # [1]
    s_enc = tl.minimum(tl.math.div_rn(tl.full([1], 2688.0, tl.float32), amax), 3.4028234663852886e38)
    s_enc = tl.where((amax == 0.0) | (s_enc == 0.0), 1.0, s_enc)
    inv_s = tl.math.div_rn(tl.full([1], 1.0, tl.float32), s_enc)
    s_enc6 = s_enc * 0.16666666666666666  # fp32(1/6)

    a_b = tl.maximum(tl.max(tl.abs(xe), axis=2), tl.max(tl.abs(xo), axis=2))  # [BR, BC]
    sc = _e4m3_rne_satfinite(a_b * s_enc6)
    prod = _e4m3_code_to_f32(sc) * inv_s
    coef = tl.minimum(tl.math.div_rn(tl.full([BLOCK_R, BLOCK_C], 1.0, tl.float32), prod), 3.4028234663852886e38)
    coef = tl.where(prod == 0.0, 3.4028234663852886e38, coef)[:, :, None]
    lo = _e2m1_rne_satfinite(xe * coef)
    hi = _e2m1_rne_satfinite(xo * coef)
    byte = (lo | (hi << 4)).to(tl.uint8)
    doff = r3.to(tl.int64) * (C * 8) + g3 * 8 + k3
    tl.store(data_ptr + doff, byte, mask=mask)

    r2 = rows[:, None]
    g2 = grp[None, :]
    soff = (((r2 // 128) * (CP // 4) + g2 // 4) * 512 + (r2 % 32) * 16 + ((r2 % 128) // 32) * 4 + g2 % 4)
    tl.store(scale_ptr + soff.to(tl.int64), sc.to(tl.uint8), mask=(r2 < RP) & (g2 < CP))


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
    sf = _e4m3_code_to_f32(sbyte)
    if HAS_GS_PTR:
        g = tl.load(gs_ptr)
    else:
        g = gs_val
    v_lo = (_e2m1_code_to_f32(byte & 15) * sf) * g
    v_hi = (_e2m1_code_to_f32(byte >> 4) * sf) * g
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


def _quant_blocks(cp: int):
    block_c = min(triton.next_power_of_2(max(cp, 1)), 16)
    block_r = max(1, min(128, 4096 // (block_c * 16)))
    return block_r, block_c


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(add_op_namespace_prefix("nvfp4_quantize_128x4"), mutates_args=())
def _nvfp4_quantize_op(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [*lead, D] bf16/fp16 -> (data uint8 [*lead, D/2], scale uint8 [R', C'], global_scale fp32 [1])."""
    lead = tuple(x.shape[:-1])
    D = int(x.shape[-1])
    R = _prod(lead)
    C = D // 16
    RP, CP = _round_up(R, 128), _round_up(C, 4)
    dev = x.device
    data = torch.empty(*lead, D // 2, dtype=torch.uint8, device=dev)
    scale = torch.empty(RP, CP, dtype=torch.uint8, device=dev)
    if R == 0 or D == 0:
        scale.zero_()
        return data, scale, torch.zeros(1, dtype=torch.float32, device=dev)
    if dev.type == "cpu" and x.dtype == torch.bfloat16:
        # the interpreter's bf16 handling is unreliable; bf16 -> fp32 is exact
        x = x.float()
    x, (n0, n1, n2), (s0, s1, s2, sD) = _collapse_lead(x)
    BR, BC = _quant_blocks(CP)
    grid = (triton.cdiv(RP, BR), triton.cdiv(CP, BC))
    parts = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=dev)
    _nvfp4_amax_kernel[grid](x, parts, R, C, n1, n2, s0, s1, s2, sD, BLOCK_R=BR, BLOCK_C=BC)
    amax = parts.amax().reshape(1)
    _nvfp4_quant_kernel[grid](x, amax, data, scale, R, C, RP, CP, n1, n2, s0, s1, s2, sD,
                              BLOCK_R=BR, BLOCK_C=BC)
    gs = nvfp4_global_scale_from_amax(amax)
    return data, scale, gs


@_nvfp4_quantize_op.register_fake
def _(x):
    lead = tuple(x.shape[:-1])
    D = x.shape[-1]
    R = _prod(lead)
    C = D // 16
    data = x.new_empty((*lead, D // 2), dtype=torch.uint8)
    scale = x.new_empty((_round_up(R, 128), _round_up(C, 4)), dtype=torch.uint8)
    gs = x.new_empty((1,), dtype=torch.float32)
    return data, scale, gs


@torch.library.custom_op(add_op_namespace_prefix("nvfp4_dequant_swizzled_to_bf16"), mutates_args=())
def _nvfp4_dequant_op(packed: torch.Tensor, scale_128x4: torch.Tensor, global_scale: Optional[torch.Tensor],
                      global_scale_value: float) -> torch.Tensor:
    """packed uint8 [*lead, cols/2] + swizzled scales -> bf16 [*lead, cols] (global scale tensor elem 0 or value)."""
    lead = tuple(packed.shape[:-1])
    nb = int(packed.shape[-1])
    out = torch.empty(*lead, nb * 2, dtype=torch.bfloat16, device=packed.device)
    R = _prod(lead)
    if R == 0 or nb == 0:
        return out
    C = (nb * 2) // 16
    p, (n0, n1, n2), (s0, s1, s2, sD) = _collapse_lead(packed)
    sflat = scale_128x4.reshape(-1)
    BLOCK_B = min(triton.next_power_of_2(nb), 64)
    BLOCK_R = max(1, 4096 // BLOCK_B)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(nb, BLOCK_B))
    gs_ptr = global_scale.reshape(-1) if global_scale is not None else sflat
    _nvfp4_dequant_kernel[grid](p, sflat, gs_ptr, float(global_scale_value), out.view(torch.int16), R, C,
                                n1, n2, s0, s1, s2, sD, HAS_GS_PTR=global_scale is not None,
                                BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B)
    return out


@_nvfp4_dequant_op.register_fake
def _(packed, scale_128x4, global_scale, global_scale_value):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def quantize_bf16_to_nvfp4_128x4(x: torch.Tensor) -> Nvfp4QuantizedTensor:
    """Quantise ``x [*lead, D]`` (bf16/fp16, CUDA, any strides, ``D % 16 == 0``) to NVFP4 (API.md §5.8).

    Returns ``Nvfp4QuantizedTensor(data uint8 [*lead, D/2], scale_128x4 uint8 [round_up(R,128),
    round_up(D/16,4)], global_scale fp32 [1], (R, D/16), tuple(x.shape))`` with ``R = prod(lead)``.
    Bit-exact implementation of the §5.8 algorithm (whole-tensor amax, E4M3 RNE scales, E2M1 RNE codes).
    """
    check_tensor("x", x, dtypes=(torch.bfloat16, torch.float16))
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims, got shape {tuple(x.shape)}")
    D = int(x.shape[-1])
    if D % 16 != 0:
        raise ValueError(f"x.shape[-1] must be a multiple of 16, got {D}")
    check_devices([("x", x)])
    data, scale, gs = _nvfp4_quantize_op(x)
    R = _prod(tuple(x.shape[:-1]))
    return Nvfp4QuantizedTensor(data, scale, gs, (R, D // 16), tuple(x.shape))


def quantize_kv_bf16_to_nvfp4_128x4(k: torch.Tensor, v: torch.Tensor) -> Tuple[Nvfp4QuantizedTensor, Nvfp4QuantizedTensor]:
    """Quantise K and V independently (own amax / global scale each), API.md §5.9."""
    return quantize_bf16_to_nvfp4_128x4(k), quantize_bf16_to_nvfp4_128x4(v)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t
    if t.element_size() != 1:
        raise TypeError(f"expected a 1-byte dtype, got {t.dtype}")
    return t.view(torch.uint8)


_E2M1_LUT = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_nvfp4_128x4_to_bf16(qx: Nvfp4QuantizedTensor, *, include_global_scale: bool = True) -> torch.Tensor:
    """Pure-PyTorch dequantisation to bf16 ``qx.original_shape`` (API.md §5.10), CPU or CUDA.

    Element value ``bf16_RNE((LUT(code) * E4M3(scale_128x4.flat[off(r, c)])) * g)``, evaluated in FP32.
    """
    shape = tuple(int(s) for s in qx.original_shape)
    if len(shape) < 1:
        raise ValueError("original_shape must have at least one dim")
    D = shape[-1]
    data = _as_bytes(qx.data)
    if int(data.shape[-1]) * 2 != D:
        raise ValueError(f"data.shape[-1]*2 ({int(data.shape[-1]) * 2}) != original_shape[-1] ({D})")
    R, C = (int(v) for v in qx.logical_scale_shape)
    if C * 16 != D:
        raise ValueError(f"logical_scale_shape[1]*16 ({C * 16}) != original_shape[-1] ({D})")
    if R != _prod(shape[:-1]) or data.numel() != R * (D // 2):
        raise ValueError(f"data {tuple(data.shape)} / logical_scale_shape {(R, C)} do not match original_shape {shape}")
    scale = _as_bytes(qx.scale_128x4)
    RP, CP = _round_up(R, 128), _round_up(C, 4)
    if scale.numel() < RP * CP:
        raise ValueError(f"scale_128x4 has {scale.numel()} elements, needs at least {RP * CP} (round_up(R,128)*round_up(C,4))")
    dev = data.device
    data = data.reshape(R, D // 2)
    lut = torch.tensor(_E2M1_LUT, dtype=torch.float32, device=dev)
    codes = torch.stack([data & 15, data >> 4], dim=-1).reshape(R, C, 16).long()
    vals = lut[codes]
    sbytes = scale.reshape(-1).to(dev)[_swizzle_offsets(R, C, dev)]
    sf = sbytes.view(torch.float8_e4m3fn).to(torch.float32)
    out = vals * sf.unsqueeze(-1)
    if include_global_scale:
        g = qx.global_scale.reshape(-1)[0].to(device=dev, dtype=torch.float32)
        out = out * g
    return out.to(torch.bfloat16).reshape(shape)


def swizzle_nvfp4_scale_to_128x4(scale: torch.Tensor, *, rows: int, cols: int) -> torch.Tensor:
    """Logical ``scale[:rows, :cols]`` (any dtype) -> swizzled ``[round_up(rows,128), round_up(cols,4)]``, padding 0."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"scale must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dim() != 2:
        raise ValueError(f"scale must be 2-D, got shape {tuple(scale.shape)}")
    rows, cols = int(rows), int(cols)
    if rows < 0 or cols < 0 or scale.shape[0] < rows or scale.shape[1] < cols:
        raise ValueError(f"scale of shape {tuple(scale.shape)} is smaller than (rows, cols) = ({rows}, {cols})")
    RP, CP = _round_up(rows, 128), _round_up(cols, 4)
    if scale.element_size() == 1 and scale.dtype != torch.uint8:
        src = scale[:rows, :cols].view(torch.uint8)
        out = torch.zeros(RP * CP, dtype=torch.uint8, device=scale.device)
    else:
        src = scale[:rows, :cols]
        out = torch.zeros(RP * CP, dtype=scale.dtype, device=scale.device)
    if rows and cols:
        out[_swizzle_offsets(rows, cols, scale.device).reshape(-1)] = src.reshape(-1)
    out = out.view(RP, CP)
    return out.view(scale.dtype) if out.dtype != scale.dtype else out


def nvfp4_global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax.to(float32) / 2688`` (FP32 division), same shape and device (API.md §5.12)."""
    if not isinstance(amax, torch.Tensor):
        raise TypeError(f"amax must be a torch.Tensor, got {type(amax).__name__}")
    a = amax.to(torch.float32)
    # Tensor / tensor: PyTorch's CUDA division by a Python scalar multiplies by the reciprocal, which is
    # not the correctly rounded FP32 division the format defines (1-ulp differences).
    return a / torch.full_like(a, NVFP4_GLOBAL_DIV)


def native_nvfp4_dequant_swizzled_to_bf16(packed: torch.Tensor, scale_128x4: torch.Tensor, global_scale) -> torch.Tensor:
    """Triton dequantiser ``packed uint8 [*lead, cols/2]`` -> bf16 ``[*lead, cols]`` (API.md §7.1).

    Bit-identical to ``dequantize_nvfp4_128x4_to_bf16``. ``global_scale`` is a tensor (element 0,
    read on the device) or a Python float.
    """
    check_tensor("packed", packed, dtypes=(torch.uint8,))
    check_tensor("scale_128x4", scale_128x4, dtypes=(torch.uint8,))
    if packed.dim() < 2:
        raise ValueError(f"packed must have rank >= 2, got shape {tuple(packed.shape)}")
    cols = int(packed.shape[-1]) * 2
    if cols % 16 != 0:
        raise ValueError(f"cols = 2*packed.shape[-1] = {cols} must be a multiple of 16")
    R = _prod(tuple(int(s) for s in packed.shape[:-1]))
    need = _round_up(R, 128) * _round_up(cols // 16, 4)
    if scale_128x4.numel() < need:
        raise ValueError(f"scale_128x4 has {scale_128x4.numel()} elements, needs at least {need}")
    if isinstance(global_scale, torch.Tensor):
        if global_scale.numel() < 1:
            raise ValueError("global_scale must have at least one element")
        if global_scale.dtype != torch.float32:
            global_scale = global_scale.to(torch.float32)
        check_devices([("packed", packed), ("scale_128x4", scale_128x4), ("global_scale", global_scale)])
        return _nvfp4_dequant_op(packed, scale_128x4, global_scale, 1.0)
    if isinstance(global_scale, bool) or not isinstance(global_scale, (int, float)):
        raise TypeError(f"global_scale must be a tensor or a float, got {type(global_scale).__name__}")
    check_devices([("packed", packed), ("scale_128x4", scale_128x4)])
    return _nvfp4_dequant_op(packed, scale_128x4, None, float(global_scale))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions (scripts/aot_check.py; see _aot.py)
# ----------------------------------------------------------------------------------------------

def aot_configs(arch: int, full: bool = False):
    """Quantiser / dequantiser launch configurations (Triton defaults: 4 warps, 3 stages), from ``_quant_blocks``
    (``C' = round_up(D/16, 4)``: BLOCK_C 4/8/16) and the dequantiser's ``BLOCK_B = min(next_pow2(D/2), 64)``
    (8..64, D a multiple of 16). Input bf16/fp16 (CI: bf16)."""
    from ._aot import AotConfig, dedupe

    out = []
    row = dict(R="i32", C="i32", n1="i32", n2="i32", s0="i32:D", s1="i32:D", s2="i32:D", sD=1)
    for xd in (("bf16", "fp16") if full else ("bf16",)):
        for cp in (4, 8, 16):
            br, bc = _quant_blocks(cp)
            out.append(AotConfig(_nvfp4_amax_kernel, dict(row, x_ptr="*" + xd, part_ptr="*fp32", BLOCK_R=br, BLOCK_C=bc),
                                 4, 3, f"amax {xd} BR{br} BC{bc}"))
            out.append(AotConfig(_nvfp4_quant_kernel, dict(row, x_ptr="*" + xd, amax_ptr="*fp32", data_ptr="*u8",
                                                           scale_ptr="*u8", RP="i32", CP="i32", BLOCK_R=br, BLOCK_C=bc),
                                 4, 3, f"quant {xd} BR{br} BC{bc}"))
    for bb in (8, 16, 32, 64):
        for gs in (False, True):
            out.append(AotConfig(_nvfp4_dequant_kernel, dict(row, p_ptr="*u8", scale_ptr="*u8", gs_ptr="*fp32" if gs else "*u8",
                                                             gs_val="fp32", out_ptr="*i16", HAS_GS_PTR=gs,
                                                             BLOCK_R=max(1, 4096 // bb), BLOCK_B=bb),
                                 4, 3, f"dequant BB{bb} gs_ptr{int(gs)}"))
    return dedupe(out)
