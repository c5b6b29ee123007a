"""NVFP4 helpers (docs/API.md §5.6-§5.12, §7.1): the quantised-tensor type, quantisers, dequantisers, scale swizzle.

NVFP4 = E2M1 values, one E4M3 scale per 16 consecutive elements (stored in the 128x4-swizzled layout) and one
FP32 global scale per tensor.

* ``Nvfp4QuantizedTensor``: frozen dataclass ``(data, scale_128x4, global_scale, logical_scale_shape,
  original_shape)``.
* ``quantize_bf16_to_nvfp4_128x4(x)`` / ``quantize_kv_bf16_to_nvfp4_128x4(k, v)``: the package's own Triton
  quantiser (``nvfp4_kernel``), bit-exact to the docs/API.md §5.8 algorithm; K and V of equal layout share
  the two launches.
* ``dequantize_nvfp4_128x4_to_bf16`` / ``swizzle_nvfp4_scale_to_128x4`` / ``nvfp4_global_scale_from_amax``: pure
  PyTorch (CPU or CUDA).
* ``native_nvfp4_dequant_swizzled_to_bf16``: Triton dequantiser, bit-identical to
  ``dequantize_nvfp4_128x4_to_bf16``.

Swizzled offset of logical scale ``(r, c)`` with ``C' = round_up(C, 4)``::

    off(r, c) = ((r // 128) * (C' / 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import nvfp4_kernel
from ._common import prod, round_up
from ._registry import add_op_namespace_prefix
from ._validate import check_devices, check_host_index, check_tensor

# Names other modules still import from here (their owners move them to ``_common`` / ``nvfp4_tile``).
from .nvfp4_tile import e2m1_code_to_f32 as _e2m1_code_to_f32, e4m3_code_to_f32 as _e4m3_code_to_f32  # noqa: F401

__all__ = ["Nvfp4QuantizedTensor", "quantize_bf16_to_nvfp4_128x4", "quantize_kv_bf16_to_nvfp4_128x4",
           "dequantize_nvfp4_128x4_to_bf16", "swizzle_nvfp4_scale_to_128x4", "nvfp4_global_scale_from_amax",
           "native_nvfp4_dequant_swizzled_to_bf16"]

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
    """An NVFP4-quantised tensor (docs/API.md §5.7).

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



def _swizzle_offsets(rows: int, cols: int, device) -> torch.Tensor:
    """int64 ``[rows, cols]`` flat offsets ``off(r, c)`` of §5.6 (``C' = round_up(cols, 4)``)."""
    cp4 = round_up(cols, 4) // 4
    r = torch.arange(rows, device=device, dtype=torch.int64).view(-1, 1)
    c = torch.arange(cols, device=device, dtype=torch.int64).view(1, -1)
    return ((r // 128) * cp4 + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4



@torch.library.custom_op(add_op_namespace_prefix("nvfp4_quantize_128x4"), mutates_args=())
def _nvfp4_quantize_op(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """x [*lead, D] bf16/fp16 -> [data uint8 [*lead, D/2], scale uint8 [R', C'], global_scale fp32 [1]].

    With ``y`` (same shape, dtype and strides as ``x``, quantised independently: own amax and global scale)
    the list continues with y's three outputs; both tensors share each launch (``nvfp4_kernel.quantize``).
    """
    return nvfp4_kernel.quantize(x, y)


@_nvfp4_quantize_op.register_fake
def _(x, y=None):
    return list(nvfp4_kernel.quant_outputs(x)) + (list(nvfp4_kernel.quant_outputs(y)) if y is not None else [])


@torch.library.custom_op(add_op_namespace_prefix("nvfp4_dequant_swizzled_to_bf16"), mutates_args=())
def _nvfp4_dequant_op(packed: torch.Tensor, scale_128x4: torch.Tensor, global_scale: Optional[torch.Tensor],
                      global_scale_value: float) -> torch.Tensor:
    """packed uint8 [*lead, cols/2] + swizzled scales -> bf16 [*lead, cols] (global scale tensor elem 0 or value)."""
    return nvfp4_kernel.dequantize(packed, scale_128x4, global_scale, global_scale_value)


@_nvfp4_dequant_op.register_fake
def _(packed, scale_128x4, global_scale, global_scale_value):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.bfloat16)



# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _check_quant_input(name: str, x: torch.Tensor):
    check_tensor(name, x, dtypes=(torch.bfloat16, torch.float16))
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims, got shape {tuple(x.shape)}")
    D = int(x.shape[-1])
    if D % 16 != 0:
        raise ValueError(f"{name}.shape[-1] must be a multiple of 16, got {D}")
    if prod(tuple(int(v) for v in x.shape[:-1])) >= 2**31 - 128:
        raise ValueError(f"{name} has too many rows ({tuple(x.shape)}): prod(shape[:-1]) must be < 2^31 - 128")


def quantize_bf16_to_nvfp4_128x4(x: torch.Tensor) -> Nvfp4QuantizedTensor:
    """Quantise ``x [*lead, D]`` (bf16/fp16, CUDA, any strides, ``D % 16 == 0``) to NVFP4 (docs/API.md §5.8).

    Returns ``Nvfp4QuantizedTensor(data uint8 [*lead, D/2], scale_128x4 uint8 [round_up(R,128),
    round_up(D/16,4)], global_scale fp32 [1], (R, D/16), tuple(x.shape))`` with ``R = prod(lead)``.
    Bit-exact implementation of the §5.8 algorithm (whole-tensor amax, E4M3 RNE scales, E2M1 RNE codes).
    """
    _check_quant_input("x", x)
    check_devices([("x", x)])
    data, scale, gs = _nvfp4_quantize_op(x)
    R = prod(tuple(x.shape[:-1]))
    return Nvfp4QuantizedTensor(data, scale, gs, (R, int(x.shape[-1]) // 16), tuple(x.shape))


def quantize_kv_bf16_to_nvfp4_128x4(k: torch.Tensor, v: torch.Tensor) -> Tuple[Nvfp4QuantizedTensor, Nvfp4QuantizedTensor]:
    """Quantise K and V independently (own amax / global scale each), docs/API.md §5.9.

    Same as ``(quantize_bf16_to_nvfp4_128x4(k), quantize_bf16_to_nvfp4_128x4(v))``; when k and v have the
    same shape, strides and dtype, both share one op call (two launches in all instead of four).
    """
    _check_quant_input("k", k)
    _check_quant_input("v", v)
    check_devices([("k", k)])
    check_devices([("v", v)])
    if k.shape != v.shape or k.stride() != v.stride() or k.dtype != v.dtype or k.device != v.device:
        return quantize_bf16_to_nvfp4_128x4(k), quantize_bf16_to_nvfp4_128x4(v)
    dk, sk, gk, dv, sv, gv = _nvfp4_quantize_op(k, v)
    R = prod(tuple(k.shape[:-1]))
    C = int(k.shape[-1]) // 16
    return (Nvfp4QuantizedTensor(dk, sk, gk, (R, C), tuple(k.shape)),
            Nvfp4QuantizedTensor(dv, sv, gv, (R, C), tuple(v.shape)))


def _as_bytes(name: str, t) -> torch.Tensor:
    """A tensor of any 1-byte dtype, viewed as uint8 (TypeError naming ``name`` otherwise)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.uint8:
        return t
    if t.element_size() != 1:
        raise TypeError(f"{name} must have a 1-byte dtype (uint8), got {str(t.dtype).replace('torch.', '')}")
    return t.view(torch.uint8)


def _int_tuple(name: str, value, length: Optional[int] = None) -> Tuple[int, ...]:
    """A tuple / list / torch.Size of non-negative host ints (TypeError / ValueError naming ``name``)."""
    if not isinstance(value, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be a tuple of ints, got {type(value).__name__}")
    out = tuple(check_host_index(f"{name} entries", v) for v in value)
    if length is not None and len(out) != length:
        raise ValueError(f"{name} must have {length} entries, got {out}")
    if any(v < 0 for v in out):
        raise ValueError(f"{name} must be non-negative, got {out}")
    return out


def _check_global_scale(name: str, g) -> torch.Tensor:
    """``global_scale``: a one-element float32 tensor (TypeError for the type / dtype, ValueError for the size).

    Its value is not checked: reading it would synchronise with a CUDA device (docs/API.md §3.6); a NaN / inf global
    scale propagates through the multiplication (docs/API.md §12.4).
    """
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(g).__name__}")
    if g.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 tensor, got {str(g.dtype).replace('torch.', '')}")
    if g.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(g.shape)}")
    return g


_E2M1_LUT = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_nvfp4_128x4_to_bf16(qx: Nvfp4QuantizedTensor, *, include_global_scale: bool = True) -> torch.Tensor:
    """Pure-PyTorch dequantisation to bf16 ``qx.original_shape`` (docs/API.md §5.10), CPU or CUDA.

    Element value ``bf16_RNE((LUT(code) * E4M3(scale_128x4.flat[off(r, c)])) * g)``, evaluated in FP32.
    Errors: ``TypeError`` for a non-``Nvfp4QuantizedTensor`` argument or a field of the wrong type / dtype
    (``data`` / ``scale_128x4`` 1-byte tensors, ``global_scale`` float32), ``ValueError`` for inconsistent
    shapes or a ``global_scale`` that does not hold exactly one element; messages name the field.
    """
    if not isinstance(qx, Nvfp4QuantizedTensor):
        raise TypeError(f"qx must be an Nvfp4QuantizedTensor, got {type(qx).__name__}")
    shape = _int_tuple("qx.original_shape", qx.original_shape)
    if len(shape) < 1:
        raise ValueError("qx.original_shape must have at least one dim")
    D = shape[-1]
    data = _as_bytes("qx.data", qx.data)
    if data.dim() < 1 or int(data.shape[-1]) * 2 != D:
        raise ValueError(f"qx.data.shape[-1]*2 ({int(data.shape[-1]) * 2 if data.dim() else 0}) != "
                         f"qx.original_shape[-1] ({D})")
    R, C = _int_tuple("qx.logical_scale_shape", qx.logical_scale_shape, 2)
    if C * 16 != D:
        raise ValueError(f"qx.logical_scale_shape[1]*16 ({C * 16}) != qx.original_shape[-1] ({D})")
    if R != prod(shape[:-1]) or data.numel() != R * (D // 2):
        raise ValueError(f"qx.data {tuple(data.shape)} / qx.logical_scale_shape {(R, C)} do not match "
                         f"qx.original_shape {shape}")
    scale = _as_bytes("qx.scale_128x4", qx.scale_128x4)
    g = _check_global_scale("qx.global_scale", qx.global_scale)
    RP, CP = round_up(R, 128), round_up(C, 4)
    if scale.numel() < RP * CP:
        raise ValueError(f"qx.scale_128x4 has {scale.numel()} elements, needs at least {RP * CP} "
                         "(round_up(R,128)*round_up(C,4))")
    dev = data.device
    data = data.reshape(R, D // 2)
    lut = torch.tensor(_E2M1_LUT, dtype=torch.float32, device=dev)
    codes = torch.stack([data & 15, data >> 4], dim=-1).reshape(R, C, 16).long()
    vals = lut[codes]
    sbytes = scale.reshape(-1).to(dev)[_swizzle_offsets(R, C, dev)]
    sf = sbytes.view(torch.float8_e4m3fn).to(torch.float32)
    out = vals * sf.unsqueeze(-1)
    if include_global_scale:
        out = out * g.reshape(-1)[0].to(device=dev)
    # fp32 -> bf16 round-to-nearest-even on the bit pattern, NaN -> 0x7FC0: the native dequantiser's bits
    # (torch's own conversion gives other NaN payloads on some devices)
    bits = out.view(torch.int32)
    rne = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rne = torch.where(out.isnan(), 0x7FC0, rne)
    return rne.to(torch.int16).view(torch.bfloat16).reshape(shape)


def swizzle_nvfp4_scale_to_128x4(scale: torch.Tensor, *, rows: int, cols: int) -> torch.Tensor:
    """Logical ``scale[:rows, :cols]`` (any dtype) -> swizzled ``[round_up(rows,128), round_up(cols,4)]``, padding 0."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"scale must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dim() != 2:
        raise ValueError(f"scale must be 2-D, got shape {tuple(scale.shape)}")
    rows, cols = check_host_index("rows", rows), check_host_index("cols", cols)
    if rows < 0 or cols < 0:
        raise ValueError(f"rows and cols must be >= 0, got ({rows}, {cols})")
    if scale.shape[0] < rows or scale.shape[1] < cols:
        raise ValueError(f"scale of shape {tuple(scale.shape)} is smaller than (rows, cols) = ({rows}, {cols})")
    RP, CP = round_up(rows, 128), round_up(cols, 4)
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
    """``amax.to(float32) / 2688`` (FP32 division), same shape and device (docs/API.md §5.12)."""
    if not isinstance(amax, torch.Tensor):
        raise TypeError(f"amax must be a torch.Tensor, got {type(amax).__name__}")
    if amax.is_complex():
        raise TypeError(f"amax must be a real tensor, got {str(amax.dtype).replace('torch.', '')}")
    a = amax.to(torch.float32)
    # Tensor / tensor: PyTorch's CUDA division by a Python scalar multiplies by the reciprocal, which is
    # not the correctly rounded FP32 division the format defines (1-ulp differences).
    return a / torch.full_like(a, NVFP4_GLOBAL_DIV)


def native_nvfp4_dequant_swizzled_to_bf16(packed: torch.Tensor, scale_128x4: torch.Tensor, global_scale) -> torch.Tensor:
    """Triton dequantiser ``packed uint8 [*lead, cols/2]`` -> bf16 ``[*lead, cols]`` (docs/API.md §7.1).

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
    R = prod(tuple(int(s) for s in packed.shape[:-1]))
    need = round_up(R, 128) * round_up(cols // 16, 4)
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
