"""Small shared helpers of the package (internal): constants, integer rounding, device properties, the
partial-update rules of the launch-table entries that ``msa.tuning`` changes.

One copy of each: kernel modules import these instead of defining their own.
"""

import dataclasses
import functools
from collections.abc import Mapping

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


class TableEntry:
    """Mixin of the per-architecture launch-table entries that ``msa.tuning`` can change field by field
    (frozen dataclasses of ints; the fields named in ``PER_HEAD_DIM`` map head dim -> int)."""

    PER_HEAD_DIM = ()
    ZERO_OK = ()  # int fields for which 0 is a valid value (the others must be >= 1)

    @classmethod
    def changes(cls, name: str, value) -> tuple:
        """``value`` as the checked, hashable tuple of ``(field, value)`` pairs that ``updated`` applies.

        ``value``: an instance (every field) or a mapping ``field -> value`` (only those fields); a
        per-head-dim field takes a mapping of the head dims to change. ``ValueError`` names a bad entry.
        """
        fields = [f.name for f in dataclasses.fields(cls)]
        if isinstance(value, cls):
            value = {f: getattr(value, f) for f in fields}
        if not isinstance(value, Mapping) or not value:
            raise ValueError(f"tuning.override: {name} must be a {cls.__name__} or a non-empty dict of its fields "
                             f"{fields}, got {value!r}")

        def num(what, x, low):
            if isinstance(x, bool) or not isinstance(x, int) or x < low:
                raise ValueError(f"tuning.override: {name}.{what} must be an int >= {low}, got {x!r}")
            return x

        out = []
        for k, v in value.items():
            if k not in fields:
                raise ValueError(f"tuning.override: {name} has no field {k!r} (fields: {fields})")
            if k in cls.PER_HEAD_DIM:
                if not isinstance(v, Mapping) or not v:
                    raise ValueError(f"tuning.override: {name}.{k} must be a non-empty dict head dim -> int, got {v!r}")
                v = tuple(sorted((num(f"{k} key", d, 1), num(f"{k}[{d}]", x, 1)) for d, x in v.items()))
            else:
                v = num(k, v, 0 if k in cls.ZERO_OK else 1)
            out.append((k, v))
        return tuple(sorted(out))

    def updated(self, changes: tuple):
        """A copy with ``changes`` (from ``changes``) applied; per-head-dim fields keep the head dims not named."""
        kw = {k: ({**getattr(self, k), **dict(v)} if k in self.PER_HEAD_DIM else v) for k, v in changes}
        return dataclasses.replace(self, **kw)
