"""Ahead-of-time (no GPU) compile descriptions shared by the kernel modules' ``aot_configs``.

Every Triton kernel module exposes ``aot_configs(arch: int, full: bool = False) -> list[AotConfig]``:
the launch configurations its host code can choose on a device of compute capability ``arch``
(``90``, ``100``, ``120``, ``121``), derived from the same tables / plan functions the runtime uses.
``scripts/aot_check.py`` compiles them with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))`` and checks the target's limits. ``full=False`` is the CI subset (every tile / warp /
stage / layout class, with the code-size axes that do not change tiles collapsed to their extremes).

``AotConfig.args`` maps every kernel parameter name to either

* a type string (non-constexpr runtime argument): ``"*bf16"`` pointer (16-byte aligned, as torch
  allocations are), ``"i32"`` / ``"i64"`` / ``"fp32"`` scalar, ``"i32:D"`` a scalar the runtime sees as a
  multiple of 16 (Triton's divisibility specialisation), or
* any other value: a ``tl.constexpr`` value; for a non-constexpr integer parameter the value ``1``
  mirrors Triton's runtime specialisation of arguments equal to 1 (unit strides of contiguous tensors).

This module does not import Triton's compiler; it only describes configurations.
"""

from typing import Any, Dict, NamedTuple

# compute capability -> (name, SM count, opt-in max shared memory per block in bytes, max regs/thread)
ARCHS = {
    90: dict(name="sm_90 (H100 SXM)", sms=132, smem=232448, regs=255),
    100: dict(name="sm_100 (B200)", sms=148, smem=232448, regs=255),
    120: dict(name="sm_120 (RTX 5090 / RTX PRO 6000)", sms=170, smem=101376, regs=255),
    121: dict(name="sm_121 (GB10 / DGX Spark)", sms=48, smem=101376, regs=255),
}


class AotConfig(NamedTuple):
    fn: Any  # the @triton.jit function
    args: Dict[str, Any]  # parameter name -> type string or constexpr value (see module docstring)
    num_warps: int
    num_stages: int
    label: str  # short human description (kernel-specific knobs)
    hot: bool = False  # decode / prefill hot loops: register spills fail the check


def torch_to_tl_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (Triton signature spelling)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
            torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}[dtype]


def major_of(arch: int) -> int:
    return arch // 10


def dedupe(configs):
    """Drop configurations that produce the identical compilation (same fn, args, warps, stages)."""
    seen = set()
    out = []
    for c in configs:
        key = (c.fn.__name__, tuple(sorted((k, repr(v)) for k, v in c.args.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
