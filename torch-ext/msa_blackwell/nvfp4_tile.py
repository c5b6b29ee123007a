"""Triton helpers that read NVFP4 K/V tiles inside the attention kernels (API.md §5.6, §5.13).

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

from .nvfp4 import _e2m1_code_to_f32, _e4m3_code_to_f32


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
    lo = _e2m1_code_to_f32(byte & 15)
    hi = _e2m1_code_to_f32(byte >> 4)
    x = tl.reshape(tl.join(lo, hi), [N, D])  # element 2k = low nibble of byte k, 2k+1 = high nibble
    c = tl.arange(0, C)
    soff = nvfp4_scale_offset(srow[:, None], c[None, :], CP)
    sb = tl.load(S + soff, mask=ok[:, None], other=0).to(tl.int32) & 0xFF
    sf = _e4m3_code_to_f32(sb)
    x = tl.reshape(tl.reshape(x, [N, C, 16]) * sf[:, :, None], [N, D])
    return x.to(CDT)
