"""Small shared helpers of the package (internal): constants, integer rounding, device properties.

One copy of each: kernel modules import these instead of defining their own.
"""

import functools

import torch

LOG2E = 1.4426950408889634  # log2(e): the kernels run their softmax in the exp2 domain
KV_BLOCK = 128  # KV block (= page) size of the official API
MAX_TOPK = 64  # largest topK / topk any attention or selection function accepts


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host ints (``b > 0``)."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """``a`` rounded up to a multiple of ``b`` (``b > 0``)."""
    return (a + b - 1) // b * b


def prod(xs) -> int:
    """Product of an iterable of ints (1 when empty); works with SymInts."""
    p = 1
    for v in xs:
        p = p * v
    return p


@functools.lru_cache(maxsize=None)
def cuda_properties(index: int):
    """``(major, minor, SM count)`` of CUDA device ``index`` (host properties, cached; no synchronisation)."""
    p = torch.cuda.get_device_properties(index)
    return int(p.major), int(p.minor), int(p.multi_processor_count)


@functools.lru_cache(maxsize=None)
def device_info(device_type: str, index, cpu_sms: int = 1):
    """``(compute-capability major, SM count)`` of a device (host query, once per device; no synchronisation).

    A non-CUDA device (the CPU interpreter) gives ``(None, cpu_sms)``: launch tables keyed by ``None`` cover it,
    and ``cpu_sms`` is the SM count its launch policy should assume.
    """
    if device_type != "cuda":
        return None, cpu_sms
    major, _minor, sms = cuda_properties(index if index is not None else torch.cuda.current_device())
    return major, sms
