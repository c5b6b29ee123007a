"""Pure-PyTorch references of the direct decode helpers (docs/API.md §6.5, 6.6).

They run on CPU or CUDA, may synchronise with the host, compute in float32 and are meant for tests
and debugging, not speed. Shared building blocks (`_gather_5d`, `_block_visibility`,
`_masked_decode_attention`) are written so that other references (e.g. the decode indexer's
`naive_flash_decode_with_topk_idx`) can reuse them.
"""

from typing import Optional

import torch

from ._validate import check_tensor

_INT = (torch.int32, torch.int64)


def _gather_5d(kv_cache: torch.Tensor, slot: int, length: int):
    """K, V of one request from ``kv_cache [max_slots, 2, max_len, Hkv, D]`` -> two fp32 ``[L, Hkv, D]``."""
    kv = kv_cache[slot, :, :length].float()
    return kv[0], kv[1]


def _block_visibility(ids: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Block-id rows -> token visibility.

    ids: int [H, topk] (negative = empty, ``block_size*j >= length`` dropped, duplicates once).
    Returns bool [H, length]: token x visible iff its block ``x // block_size`` is selected.
    """
    nb = -(-length // block_size)
    ids = ids.long()
    valid = (ids >= 0) & (ids < nb)
    sel = torch.zeros(ids.shape[0], nb + 1, dtype=torch.bool, device=ids.device)
    sel.scatter_(1, torch.where(valid, ids, torch.full_like(ids, nb)), True)
    blk = torch.arange(length, device=ids.device) // block_size
    return sel[:, :nb][:, blk]


def _masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                             sm_scale: float, sink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One query per head over a masked key set, fp32.

    q [Hq, D]; k, v [L, Hkv, D]; visible bool [Hkv, L] (shared by the G heads of a group);
    sink [Hq, D] or None (enters the denominator only). Returns fp32 [Hq, D]; empty rows are 0.
    """
    hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.float()
    kh = k.float().permute(1, 0, 2).repeat_interleave(g, 0)  # [Hq, L, D]
    vh = v.float().permute(1, 0, 2).repeat_interleave(g, 0)
    vis = visible.repeat_interleave(g, 0)  # [Hq, L]
    s = sm_scale * torch.einsum("hd,hld->hl", qf, kh)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True) if s.shape[-1] else torch.full((hq, 1), float("-inf"), device=q.device)
    empty = torch.isneginf(m)
    if sink is not None:
        ss = sm_scale * (qf * sink.float()).sum(-1, keepdim=True)
        m = torch.maximum(m, ss)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    if sink is not None:
        den = den + torch.exp(ss - m)
    o = torch.einsum("hl,hld->hd", p, vh) / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(empty, torch.zeros_like(o), o)


def _check_naive_common(q, sink, kv_cache, seq_lens, slot_ids, block_size):
    check_tensor("q", q, ndim=3, dtypes=(torch.bfloat16, torch.float16, torch.float32))
    check_tensor("kv_cache", kv_cache, ndim=5)
    if kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [max_slots, 2, max_len, Hkv, D], got {tuple(kv_cache.shape)}")
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=_INT)
    check_tensor("slot_ids", slot_ids, ndim=1, dtypes=_INT)
    b, hq, d = q.shape
    if seq_lens.shape[0] != b or slot_ids.shape[0] != b:
        raise ValueError(f"seq_lens and slot_ids must have length B={b}")
    hkv = kv_cache.shape[3]
    if kv_cache.shape[4] != d or hkv <= 0 or hq % hkv != 0:
        raise ValueError(f"kv_cache [.., Hkv={hkv}, D={kv_cache.shape[4]}] does not match q {tuple(q.shape)}")
    if sink is not None:
        check_tensor("sink", sink, ndim=2)
        if tuple(sink.shape) != (hq, d):
            raise ValueError(f"sink must have shape [{hq}, {d}], got {tuple(sink.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return b, hq, d, hkv


def naive_flash_decode_with_gqa_share_sparse(q, sink, kv_cache, seq_lens, slot_ids, block_size, topk_idx,
                                             sm_scale=None) -> torch.Tensor:
    """Reference sparse decode (docs/API.md §6.6) over the contiguous 5-D cache.

    q [B, Hq, D]; sink [Hq, D] or None; kv_cache [max_slots, 2, max_len, Hkv, D] indexed by
    ``slot_ids [B]`` (negative = from the end); seq_lens [B] (clamped to [0, max_len]);
    topk_idx int [Hkv, B, topk] with set semantics (negative empty, out of range dropped,
    duplicates once). Returns [B, Hq, D] in q's dtype; rows with no valid block are 0.
    """
    b, hq, d, hkv = _check_naive_common(q, sink, kv_cache, seq_lens, slot_ids, block_size)
    check_tensor("topk_idx", topk_idx, ndim=3, dtypes=_INT)
    if topk_idx.shape[0] != hkv or topk_idx.shape[1] != b:
        raise ValueError(f"topk_idx must have shape [Hkv={hkv}, B={b}, topk], got {tuple(topk_idx.shape)}")
    scale = float(d) ** -0.5 if sm_scale is None else float(sm_scale)
    max_len = kv_cache.shape[2]
    lens = seq_lens.long().cpu().clamp(0, max_len).tolist()
    slots = slot_ids.long().cpu().tolist()
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        length = lens[i]
        if length == 0:
            continue
        k, v = _gather_5d(kv_cache, slots[i], length)
        vis = _block_visibility(topk_idx[:, i, :].to(kv_cache.device), length, block_size)
        out[i] = _masked_decode_attention(q[i].to(kv_cache.device), k, v, vis, scale, sink).to(q.device)
    return out.to(q.dtype)
