"""Top-k block selection from block scores (docs/API.md §6.3, §6.4, §11.3).

``native_topk_from_scores`` runs the compiled CUDA op when the build has it and the tensors are on a CUDA
device; otherwise (CPU tensors, source-tree mode) it runs a vectorised PyTorch implementation that gives
identical results. Neither path synchronises with the host, so both are CUDA-graph and
``torch.compile(fullgraph=True)`` safe.
"""

import torch

from ._common import MAX_TOPK
from ._registry import add_op_namespace_prefix, native_op
from ._validate import check_positive_int, check_tensor

__all__ = ["has_native_ops", "native_topk_from_scores", "topk_from_scores_torch"]

_INT_CAP = 2**31

_TOPK_OP = native_op("msa_topk_from_scores")
_TOPK_FORCED_OP = native_op("msa_topk_from_scores_forced")
# OpOverloads: calling them skips the packet's overload resolution (less host overhead per eager call).
_TOPK_OVERLOAD = None if _TOPK_OP is None else _TOPK_OP.default
_TOPK_FORCED_OVERLOAD = None if _TOPK_FORCED_OP is None else _TOPK_FORCED_OP.default


def has_native_ops() -> bool:
    """True iff the compiled extension loaded and its top-k op is usable (False in source-tree mode)."""
    return _TOPK_OP is not None


if _TOPK_OP is not None:
    # The C++ ops exist only in a built variant; register_fake on a missing op would fail.

    @torch.library.register_fake(add_op_namespace_prefix("msa_topk_from_scores"))
    def _msa_topk_from_scores_fake(score, seq_lens, block_size, topk, topk_idx):
        """Mutates ``topk_idx`` [H, B, topk] in place; returns nothing."""
        return None


if _TOPK_FORCED_OP is not None:

    @torch.library.register_fake(add_op_namespace_prefix("msa_topk_from_scores_forced"))
    def _msa_topk_from_scores_forced_fake(score, seq_lens, block_size, topk, force_init_blocks, force_local_blocks,
                                          topk_idx):
        """Mutates ``topk_idx`` [H, B, topk] in place; returns nothing."""
        return None


def _check_int(name, value, minimum, maximum=None):
    """A host int (or a SymInt under torch.compile) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, int):
        check_positive_int(name, value, minimum=minimum, maximum=maximum)


def _validate_slow(score, seq_lens, block_size, topk, force_local_blocks, force_init_blocks):
    """Full checks with messages naming the argument (only reached when the fast check fails)."""
    check_tensor("score", score, dtypes=(torch.float32,))
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,))
    if score.dim() != 3:
        raise ValueError(f"score must be 3-D [H, B, NB], got shape {tuple(score.shape)}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != score.shape[1]:
        raise ValueError(
            f"seq_lens must have shape [B] = [{score.shape[1]}] (B = score.shape[1]), got {tuple(seq_lens.shape)}"
        )
    if seq_lens.device != score.device:
        raise ValueError(f"seq_lens is on {seq_lens.device} but score is on {score.device}; they must share one device")
    _check_int("block_size", block_size, 1)
    _check_int("topk", topk, 1, MAX_TOPK)
    _check_int("force_local_blocks", force_local_blocks, 0)
    _check_int("force_init_blocks", force_init_blocks, 0)


def _validate(score, seq_lens, block_size, topk, force_local_blocks, force_init_blocks):
    # Fast path first: this wrapper's host overhead is part of every eager call.
    if (
        type(block_size) is int
        and type(topk) is int
        and type(force_local_blocks) is int
        and type(force_init_blocks) is int
        and isinstance(score, torch.Tensor)
        and isinstance(seq_lens, torch.Tensor)
        and score.dtype is torch.float32
        and seq_lens.dtype is torch.int32
        and score.ndim == 3
        and seq_lens.ndim == 1
        and block_size >= 1
        and 1 <= topk <= MAX_TOPK
        and force_local_blocks >= 0
        and force_init_blocks >= 0
        and seq_lens.shape[0] == score.shape[1]
        and seq_lens.device == score.device
    ):
        return
    _validate_slow(score, seq_lens, block_size, topk, force_local_blocks, force_init_blocks)


_KEY_CLASS = 2**32  # topk_from_scores_torch keys: class * 2**32 + 32-bit order-preserving score code


def topk_from_scores_torch(score: torch.Tensor, seq_lens: torch.Tensor, block_size: int, topk: int,
                           force_local_blocks: int = 0, *, force_init_blocks: int = 0) -> torch.Tensor:
    """Pure PyTorch implementation of docs/API.md §11.3 (+ forced init / local blocks); no checks, no host sync.

    score: fp32 [H, B, NB]; seq_lens: int32 [B]. Returns int32 [H, B, topk], contiguous, identical to the CUDA
    op: forced init blocks ``j < min(force_init_blocks, n)`` that are not local (ascending id), forced local
    blocks ``[n - force_local_blocks, n)`` (ascending id), then the candidates by (score desc, id asc), then -1.

    One stable descending sort of int64 keys ``class * 2**32 + code``: class 3 init, 2 local (code 0, so the
    stable sort keeps them in ascending id), 1 candidate (code = the order-preserving 32-bit image of the score,
    as in the CUDA kernel; -0.0 ties with +0.0), 0 excluded.
    """
    H, B, NB = score.shape
    dev = score.device
    if NB == 0 or H * B == 0:
        return torch.full((H, B, topk), -1, dtype=torch.int32, device=dev)
    # seq_lens are int32: host ints beyond 2**31 behave like 2**31 (keeps the int64 arithmetic exact)
    block_size = min(block_size, _INT_CAP)
    force_local_blocks = min(force_local_blocks, _INT_CAP)
    force_init_blocks = min(force_init_blocks, _INT_CAP)
    sl = seq_lens.to(torch.int64).clamp(min=0)
    n = torch.clamp((sl + (block_size - 1)) // block_size, max=NB).view(B, 1)  # [B, 1]
    j = torch.arange(NB, device=dev, dtype=torch.int64).view(1, NB)
    in_range = j < n  # [B, NB]
    s = score.to(torch.float32)
    ok = in_range & ~torch.isnan(s) & (s != float("-inf"))  # [H, B, NB]
    bits = torch.where(s == 0, torch.zeros_like(s), s).view(torch.int32).to(torch.int64)
    code = torch.where(bits >= 0, bits + 2**31, -1 - bits)  # order preserving, in [0, 2**32)
    key = torch.where(ok, code + _KEY_CLASS, torch.zeros_like(code))
    if force_local_blocks > 0 or force_init_blocks > 0:
        f_lo = (n - force_local_blocks).clamp(min=0) if force_local_blocks > 0 else n  # local: [f_lo, n)
        cls = torch.where(in_range & (j >= f_lo), 2 * _KEY_CLASS, 0)
        if force_init_blocks > 0:
            cls = torch.where(j < f_lo.clamp(max=force_init_blocks), 3 * _KEY_CLASS, cls)  # init: [0, min(i, f_lo))
        key = torch.where(cls > 0, cls, key)
    vals, order = torch.sort(key, dim=-1, descending=True, stable=True)
    kk = min(topk, NB)
    idx = torch.where(vals[..., :kk] > 0, order[..., :kk], -1).to(torch.int32)
    if kk < topk:
        idx = torch.cat([idx, torch.full((H, B, topk - kk), -1, dtype=torch.int32, device=dev)], dim=-1)
    return idx.contiguous()


def native_topk_from_scores(score: torch.Tensor, seq_lens: torch.Tensor, block_size: int, topk: int, *,
                            force_local_blocks: int = 0, force_init_blocks: int = 0) -> torch.Tensor:
    """Best valid blocks per (h, b) row (docs/API.md §6.3 / §11.3).

    Args:
        score: fp32 [H, B, NB], any strides (a contiguous copy is made if needed).
        seq_lens: int32 [B], any stride; row (h, b) has ``n = min(ceil(max(seq_lens[b], 0) / block_size), NB)``
            blocks (negative lengths count as 0, lengths past ``NB * block_size`` as ``NB`` blocks).
        block_size: tokens per block (>= 1).
        topk: 1..64.
        force_local_blocks: m >= 0 (keyword-only). The last ``min(m, n)`` blocks ``[n - m, n)`` are always
            selected, whatever their score, and ranked in ascending id right after the init blocks.
        force_init_blocks: i >= 0 (keyword-only). The first blocks ``j < min(i, n)`` that are not local are
            always selected, whatever their score, and ranked first in ascending id (the decode rule
            ``init + local + rest`` of docs/API.md §11.2).

    Returns:
        int32 [H, B, topk], contiguous: the forced init blocks, then the forced local blocks, then the
        candidates (j < n, score not -inf/NaN; +inf allowed) ranked by (score desc, j asc), then -1 padding.
    """
    _validate(score, seq_lens, block_size, topk, force_local_blocks, force_init_blocks)
    return _topk_from_scores_unchecked(score, seq_lens, block_size, topk, force_local_blocks, force_init_blocks)


def _topk_from_scores_unchecked(score, seq_lens, block_size, topk, force_local_blocks, force_init_blocks):
    """``native_topk_from_scores`` on validated arguments (the decode indexer calls this directly)."""
    if score.is_cuda and _TOPK_OVERLOAD is not None:
        # seq_lens are int32, so clamping these host ints to 2**31 changes nothing and keeps them int64-safe.
        if block_size > _INT_CAP:
            block_size = _INT_CAP
        H, B, _ = score.shape
        # The C++ op makes score / seq_lens contiguous itself (no copy when they already are).
        if force_local_blocks == 0 and force_init_blocks == 0:
            out = torch.empty((H, B, topk), dtype=torch.int32, device=score.device)
            _TOPK_OVERLOAD(score, seq_lens, block_size, topk, out)
            return out
        if _TOPK_FORCED_OVERLOAD is not None:
            if force_local_blocks > _INT_CAP:
                force_local_blocks = _INT_CAP
            if force_init_blocks > _INT_CAP:
                force_init_blocks = _INT_CAP
            out = torch.empty((H, B, topk), dtype=torch.int32, device=score.device)
            _TOPK_FORCED_OVERLOAD(score, seq_lens, block_size, topk, force_init_blocks, force_local_blocks, out)
            return out
    return topk_from_scores_torch(score, seq_lens, block_size, topk, force_local_blocks,
                                  force_init_blocks=force_init_blocks)
