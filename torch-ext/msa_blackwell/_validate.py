"""Shared argument validation: clear TypeError/ValueError naming the argument, no host sync."""

import operator
import os
from typing import Iterable, Optional, Sequence

import torch

from .errors import MsaUnsupportedError

FP8 = torch.float8_e4m3fn
SUPPORTED_GQA = (1, 2, 4, 8, 16)


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None):
    """Type, rank and dtype of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_shape(name: str, t: torch.Tensor, shape: Sequence[Optional[int]]):
    """Exact shape check; ``None`` entries match anything."""
    ok = t.dim() == len(shape) and all(s is None or int(d) == int(s) for d, s in zip(t.shape, shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_devices(named: Iterable, *, kernel: bool = True) -> torch.device:
    """All named tensors on one device; CUDA, or CPU while the Triton interpreter is active.

    ``named`` is an iterable of ``(name, tensor_or_None)``; ``None`` entries are skipped.
    Returns the common device.
    """
    dev = None
    first = None
    for name, t in named:
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {first} is on {dev}; all tensors must share one device")
    if dev is None:
        raise ValueError("no tensor arguments given")
    if kernel and dev.type != "cuda" and not (dev.type == "cpu" and interpreter_active()):
        raise ValueError(
            f"{first} must be a CUDA tensor (got {dev}); CPU tensors are accepted only under TRITON_INTERPRET=1"
        )
    return dev


def check_host_int(name: str, value, *, allow_none: bool = False):
    """A host ``int`` (not bool); ``None`` passes through when ``allow_none``. TypeError otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_int_at_least(name: str, value, minimum: int = 0) -> int:
    """A host ``int`` >= ``minimum``: TypeError if not an int, ValueError ``"<name> must be >= <minimum>, got
    <value>"`` below it. Returns it."""
    check_host_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_int(name: str, value, *, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """A host ``int`` in ``[minimum, maximum]``."""
    check_host_int(name, value)
    if value < minimum or (maximum is not None and value > maximum):
        hi = "" if maximum is None else f", {maximum}"
        raise ValueError(f"{name} must be in [{minimum}{hi}], got {value}")
    return value


def check_gqa(num_q_heads: int, num_kv_heads: int, *, allowed: Optional[Sequence[int]] = SUPPORTED_GQA) -> int:
    """``Hq % Hkv == 0`` (ValueError) and ``G`` in ``allowed`` (MsaUnsupportedError). Returns G."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    g = num_q_heads // num_kv_heads
    if allowed is not None and g not in allowed:
        raise MsaUnsupportedError(f"GQA ratio {g} (Hq={num_q_heads}, Hkv={num_kv_heads}) is not supported; use one of {tuple(allowed)}")
    return g


def check_head_dim(name: str, d: int, allowed: Sequence[int] = (128,)):
    if d not in allowed:
        raise MsaUnsupportedError(f"{name}: head dim {d} is not supported; use one of {tuple(allowed)}")


def attention_out_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, allow_fp8_q: bool = True) -> torch.dtype:
    """Validate the Q/K/V dtype matrix (docs/API.md §3.1) and return the output dtype."""
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
    qd, kd = q.dtype, k.dtype
    if qd in (torch.bfloat16, torch.float16) and kd == qd:
        return qd
    if qd == torch.bfloat16 and kd == FP8:
        return torch.bfloat16
    if allow_fp8_q and qd == FP8 and kd == FP8:
        return torch.bfloat16
    raise TypeError(f"unsupported dtype combination q={qd}, k/v={kd}; see the dtype matrix (bf16/fp16, bf16 q + fp8 kv"
                    + (", fp8 q/k/v)" if allow_fp8_q else ")"))


def default_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return float(head_dim) ** -0.5
    s = float(softmax_scale)
    if s != s or s in (float("inf"), float("-inf")):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return s


def check_host_index(name: str, value) -> int:
    """An integer given as anything with ``__index__`` (int, numpy int, SymInt; not bool); TypeError otherwise.
    Returns it as an int."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
