"""Top-k block selection from block scores (API.md §6.3, §6.4, §11.3).

``native_topk_from_scores`` runs the compiled CUDA op when the build has it and the tensors are on a CUDA
device; otherwise (CPU tensors, source-tree mode) it runs a vectorised PyTorch implementation that gives
identical results. Neither path synchronises with the host, so both are CUDA-graph and
``torch.compile(fullgraph=True)`` safe.
"""

import torch

from ._registry import add_op_namespace_prefix, native_op
from ._validate import check_positive_int, check_tensor

__all__ = ["has_native_ops", "native_topk_from_scores", "topk_from_scores_torch"]

MAX_TOPK = 64
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
    def _msa_topk_from_scores_forced_fake(score, seq_lens, block_size, topk, force_local_blocks, topk_idx):
        """Mutates ``topk_idx`` [H, B, topk] in place; returns nothing."""
        return None


def _check_int(name, value, minimum, maximum=None):
    """A host int (or a SymInt under torch.compile) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, int):
        check_positive_int(name, value, minimum=minimum, maximum=maximum)


def _validate_slow(score, seq_lens, block_size, topk, force_local_blocks):
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


def _validate(score, seq_lens, block_size, topk, force_local_blocks):
    # Fast path first: this wrapper's host overhead is part of every eager call.
    if (
        isinstance(score, torch.Tensor)
        and isinstance(seq_lens, torch.Tensor)
        and score.dtype == torch.float32
        and seq_lens.dtype == torch.int32
        and score.dim() == 3
        and seq_lens.dim() == 1
        and type(block_size) is int
        and type(topk) is int
        and type(force_local_blocks) is int
        and block_size >= 1
        and 1 <= topk <= MAX_TOPK
        and force_local_blocks >= 0
        and seq_lens.shape[0] == score.shape[1]
        and seq_lens.device == score.device
    ):
        return
    _validate_slow(score, seq_lens, block_size, topk, force_local_blocks)


def topk_from_scores_torch(score: torch.Tensor, seq_lens: torch.Tensor, block_size: int, topk: int,
                           force_local_blocks: int = 0) -> torch.Tensor:
    """Pure PyTorch implementation of §11.3 (+ forced local blocks); no validation, no host sync.

    score: fp32 [H, B, NB]; seq_lens: int32 [B]. Returns int32 [H, B, topk], contiguous.
    """
    H, B, NB = score.shape
    dev = score.device
    if NB == 0 or H * B == 0:
        return torch.full((H, B, topk), -1, dtype=torch.int32, device=dev)
    sl = seq_lens.to(torch.int64).clamp(min=0)
    n = torch.clamp((sl + (block_size - 1)) // block_size, max=NB)  # [B]
    j = torch.arange(NB, device=dev, dtype=torch.int64)
    in_range = j.view(1, NB) < n.view(B, 1)  # [B, NB]
    s = score.to(torch.float32)
    ok = in_range.unsqueeze(0) & ~torch.isnan(s) & (s != float("-inf"))  # [H, B, NB]
    # Class 2: forced local blocks (ascending id); class 1: candidates (score desc, id asc); class 0: excluded.
    cls = ok.to(torch.int8)
    val = torch.where(ok, s, torch.full_like(s, float("-inf")))
    val = torch.where(val == 0, torch.zeros_like(val), val)  # -0.0 ties with +0.0
    if force_local_blocks > 0:
        forced = in_range & (j.view(1, NB) >= (n - force_local_blocks).view(B, 1))  # [B, NB]
        forced = forced.unsqueeze(0).expand(H, B, NB)
        cls = torch.where(forced, torch.full_like(cls, 2), cls)
        val = torch.where(forced, torch.zeros_like(val), val)
    # Lexicographic (cls desc, val desc, id asc) via two stable sorts.
    _, i1 = torch.sort(val, dim=-1, descending=True, stable=True)
    c1 = torch.gather(cls, -1, i1)
    c2, i2 = torch.sort(c1, dim=-1, descending=True, stable=True)
    idx = torch.gather(i1, -1, i2)
    kk = min(topk, NB)
    idx = torch.where(c2[..., :kk] > 0, idx[..., :kk], torch.full_like(idx[..., :kk], -1)).to(torch.int32)
    if kk < topk:
        idx = torch.cat([idx, torch.full((H, B, topk - kk), -1, dtype=torch.int32, device=dev)], dim=-1)
    return idx.contiguous()


def native_topk_from_scores(score: torch.Tensor, seq_lens: torch.Tensor, block_size: int, topk: int, *,
                            force_local_blocks: int = 0) -> torch.Tensor:
    """Best valid blocks per (h, b) row (API.md §6.3 / §11.3).

    Args:
        score: fp32 [H, B, NB], any strides (a contiguous copy is made if needed).
        seq_lens: int32 [B]; row (h, b) has ``n = min(ceil(max(seq_lens[b], 0) / block_size), NB)`` blocks.
        block_size: tokens per block (>= 1).
        topk: 1..64.
        force_local_blocks: m >= 0 (keyword-only). The last ``min(m, n)`` blocks ``[n - m, n)`` are always
            selected, whatever their score, and ranked first in ascending id.

    Returns:
        int32 [H, B, topk], contiguous: candidates (j < n, score not -inf/NaN; +inf allowed) ranked by
        (score desc, j asc) after any forced blocks, then -1 padding.
    """
    _validate(score, seq_lens, block_size, topk, force_local_blocks)
    H, B, _ = score.shape
    # seq_lens are int32, so clamping these host ints to 2**31 changes nothing and keeps them int64-safe.
    if block_size > _INT_CAP:
        block_size = _INT_CAP
    if force_local_blocks > _INT_CAP:
        force_local_blocks = _INT_CAP
    if score.is_cuda and _TOPK_OVERLOAD is not None and (force_local_blocks == 0 or _TOPK_FORCED_OVERLOAD is not None):
        s = score if score.is_contiguous() else score.contiguous()
        sl = seq_lens if seq_lens.is_contiguous() else seq_lens.contiguous()
        out = torch.empty((H, B, topk), dtype=torch.int32, device=score.device)
        if force_local_blocks > 0:
            _TOPK_FORCED_OVERLOAD(s, sl, block_size, topk, force_local_blocks, out)
        else:
            _TOPK_OVERLOAD(s, sl, block_size, topk, out)
        return out
    return topk_from_scores_torch(score, seq_lens, block_size, topk, force_local_blocks)
