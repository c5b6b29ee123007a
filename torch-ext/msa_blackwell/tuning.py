"""The one override hook for launch choices (benchmarks and tuning sweeps).

The package reads no environment variable of its own: every launch choice (tile sizes, warps, stages,
decoder variants, chunk sizes) comes from the per-architecture tables of the kernel modules
(``prefill_kernel``, ``csr_kernel``, ``decode_kernel``, ...). A benchmark that wants to time another
choice sets it for a block of code::

    from msa_blackwell import tuning          # or: importlib.import_module(msa.__name__ + ".tuning")

    with tuning.override(prefill="8,128,8,3", csr_chunk_entries=2048):
        out = msa.sparse_atten_func(...)      # launches inside the block use the override

Overrides nest (an inner ``override`` keeps the outer values it does not set), are restored when the
block exits (also on an exception), and are local to the thread / ``asyncio`` task (``contextvars``).
They are read when a kernel is launched, so a CUDA graph captured inside the block keeps the choice
of the capture. Launch plans are cached per override (a plan made inside a block is never used outside
it); the eager fast paths of the decode functions are skipped inside a block. A
``SparseDecodePagedAttentionWrapper`` sizes its workspaces in ``plan``: plan it inside the same block as
its ``run`` calls.

Fields (``None`` = the table's choice; see docs/API.md §9):

``prefill``, ``prefill_nvfp4``
    Tile config of the prefill kernel for element K/V (``sparse_atten_func``) and for packed NVFP4 K/V
    (``sparse_atten_nvfp4_kv_func``): a ``prefill_kernel.PrefillConfig``, a tuple
    ``(bmt, bns, num_warps, num_stages[, block_list])`` or the same as a comma-separated string.
``prefill_nvfp4_stage_bytes``
    Largest workspace (bytes, K and V together) for which ``sparse_atten_nvfp4_kv_func`` decodes the K/V it
    can read once into element tiles and runs the element kernel (``prefill_kernel.NVFP4_STAGE_MAX_BYTES``);
    larger calls, and every call with 0, run the fused NVFP4 kernel (no K/V copy).
``prefill_fp4_decoder``
    NVFP4 tile decoder of the prefill kernel: 2 = fp32 tiles in the compute dtype (the default),
    0 = fp16 tiles with the portable decoder, 1 = fp16 tiles with the inline-PTX decoder (GPU only;
    elsewhere the default is used).
``csr_chunk_entries``
    Entries (tokens x next_pow2(topK)) per chunk of the GPU CSR builder (default 1024); not used under
    the interpreter.
``decode``, ``decode_nvfp4``
    Changes to the decode launch-table entry (``decode_kernel.DecodeConfig``: tiles, warps, stages, split
    policy) for element K/V and for packed NVFP4 K/V launches: a ``DecodeConfig`` (every field) or a dict of
    fields, e.g. ``dict(num_stages=2, block_n={128: 128})`` (per-head-dim fields take a dict of the head dims
    to change). ``decode_nvfp4`` applies on top of the table's NVFP4 entry.
``decode_scores``
    Changes to the decode-indexer block-score table entry (``indexer_kernel.DecodeScoreConfig``: tokens per
    tile ``tn`` per head dim, warps, stages, programs per SM, tiles per program), same forms.
``decode_fp4_decoder``
    NVFP4 nibble decoder of the decode kernel on a GPU: 0 portable, 1 inline PTX (default).
``decode_fp4_prefetch``
    Packed-byte access of the NVFP4 decode kernel: 0 bytes, 1 int32 words, 2 words + register
    prefetch (GPU default 2; falls back to 0 for unaligned K/V).
"""

import contextlib
import contextvars
import dataclasses
from typing import Any, Optional

__all__ = ["Overrides", "active", "current", "override"]


@dataclasses.dataclass(frozen=True)
class Overrides:
    """The active overrides (every field ``None`` when no ``override`` block is active)."""

    prefill: Optional[Any] = None  # prefill_kernel.PrefillConfig
    prefill_nvfp4: Optional[Any] = None  # prefill_kernel.PrefillConfig
    prefill_fp4_decoder: Optional[int] = None
    prefill_nvfp4_stage_bytes: Optional[int] = None
    csr_chunk_entries: Optional[int] = None
    decode_fp4_decoder: Optional[int] = None
    decode_fp4_prefetch: Optional[int] = None
    decode: Optional[tuple] = None  # DecodeConfig.changes(...) form: ((field, value), ...)
    decode_nvfp4: Optional[tuple] = None
    decode_scores: Optional[tuple] = None  # DecodeScoreConfig.changes(...) form


_NONE = Overrides()
_CURRENT = contextvars.ContextVar("msa_blackwell_tuning", default=_NONE)


def current() -> Overrides:
    """The overrides in effect in this thread / task (read by the kernel modules at each launch)."""
    return _CURRENT.get()


def active() -> bool:
    """True inside an ``override`` block (the decode functions then skip their eager fast paths)."""
    return _CURRENT.get() is not _NONE


def _choice(name: str, value, allowed):
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"tuning.override: {name} must be one of {tuple(allowed)}, got {value!r}")
    return value


@contextlib.contextmanager
def override(*, prefill=None, prefill_nvfp4=None, prefill_fp4_decoder: Optional[int] = None,
             prefill_nvfp4_stage_bytes: Optional[int] = None, csr_chunk_entries: Optional[int] = None, decode_fp4_decoder: Optional[int] = None,
             decode_fp4_prefetch: Optional[int] = None, decode=None, decode_nvfp4=None, decode_scores=None):
    """Context manager: use the given launch choices inside the block (arguments left ``None`` keep the
    enclosing choice). Values are checked on entry (``ValueError`` / ``TypeError``). Yields the active
    ``Overrides``."""
    # the kernel modules own the config types (imported here: no import cycle)
    from .decode_kernel import DecodeConfig
    from .indexer_kernel import DecodeScoreConfig
    from .prefill_kernel import PrefillConfig

    new = {}
    if prefill is not None:
        new["prefill"] = PrefillConfig.coerce("prefill", prefill)
    if prefill_nvfp4 is not None:
        new["prefill_nvfp4"] = PrefillConfig.coerce("prefill_nvfp4", prefill_nvfp4)
    if prefill_fp4_decoder is not None:
        new["prefill_fp4_decoder"] = _choice("prefill_fp4_decoder", prefill_fp4_decoder, (0, 1, 2))
    if prefill_nvfp4_stage_bytes is not None:
        if (isinstance(prefill_nvfp4_stage_bytes, bool) or not isinstance(prefill_nvfp4_stage_bytes, int)
                or prefill_nvfp4_stage_bytes < 0):
            raise ValueError("tuning.override: prefill_nvfp4_stage_bytes must be a non-negative int, got "
                             f"{prefill_nvfp4_stage_bytes!r}")
        new["prefill_nvfp4_stage_bytes"] = prefill_nvfp4_stage_bytes
    if csr_chunk_entries is not None:
        if isinstance(csr_chunk_entries, bool) or not isinstance(csr_chunk_entries, int) or csr_chunk_entries < 1:
            raise ValueError(f"tuning.override: csr_chunk_entries must be a positive int, got {csr_chunk_entries!r}")
        new["csr_chunk_entries"] = csr_chunk_entries
    if decode_fp4_decoder is not None:
        new["decode_fp4_decoder"] = _choice("decode_fp4_decoder", decode_fp4_decoder, (0, 1))
    if decode_fp4_prefetch is not None:
        new["decode_fp4_prefetch"] = _choice("decode_fp4_prefetch", decode_fp4_prefetch, (0, 1, 2))
    for name, value, cls in (("decode", decode, DecodeConfig), ("decode_nvfp4", decode_nvfp4, DecodeConfig),
                             ("decode_scores", decode_scores, DecodeScoreConfig)):
        if value is not None:
            new[name] = cls.changes(name, value)
    token = _CURRENT.set(dataclasses.replace(_CURRENT.get(), **new))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
