"""Decode indexer (docs/API.md §6.1, §6.1.1, §6.5, §11.2): block scores of one decode token per request against a
token-major index-K cache (``decode_block_scores``), native top-k selection with forced init / local blocks,
optional dense attention over the request (``flash_decode_with_topk_idx``), and the float64 reference
``naive_flash_decode_with_topk_idx``. The score kernel, its launch table and plans are in ``indexer_kernel.py``.
"""

import math

import torch

from ._common import MAX_TOPK
from ._registry import add_op_namespace_prefix
from ._validate import check_devices, check_head_dim, check_tensor, interpreter_active
from .indexer_kernel import block_scores
from .topk import _topk_from_scores_unchecked

__all__ = ["decode_block_scores", "flash_decode_with_topk_idx", "naive_flash_decode_with_topk_idx"]

_IDX_INT = (torch.int32, torch.int64)
_SCORE_TYPES = ("max", "lse")

# The registered op (torch.compile, opcheck) runs the same launch; eager calls go to ``block_scores`` directly
# (no dispatcher round trip).
_decode_block_scores_op = torch.library.custom_op(add_op_namespace_prefix("decode_block_scores"), block_scores,
                                                  mutates_args=())


@_decode_block_scores_op.register_fake
def _(q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, sm_scale, lse):
    return q.new_empty((q.shape[1], q.shape[0], NB), dtype=torch.float32)


def _scores(q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, scale, lse):
    """Block scores on validated arguments: eager calls launch directly, traced calls go through the op."""
    if type(q) is torch.Tensor and not torch.compiler.is_compiling():
        return block_scores(q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, scale, lse)
    return _decode_block_scores_op(q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, scale, lse)


def _validate_query_cache(q, k_cache, score_type):
    """score_type, q [B, Hq, D] and k_cache [max_slots, Hkv, D] (dtypes, head dim, GQA ratio)."""
    if score_type not in _SCORE_TYPES:
        raise ValueError(f"score_type must be 'max' or 'lse', got {score_type!r}")
    check_tensor("q", q, ndim=3, dtypes=(torch.bfloat16, torch.float16))
    check_tensor("k_cache", k_cache, ndim=3, dtypes=(torch.bfloat16, torch.float16, torch.float8_e4m3fn))
    if not (k_cache.dtype == q.dtype or (k_cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16)):
        raise TypeError(f"k_cache dtype {k_cache.dtype} is not allowed with q dtype {q.dtype}")
    B, Hq, D = q.shape
    check_head_dim("q", int(D), (64, 128, 256))
    if k_cache.shape[2] != D:
        raise ValueError(f"k_cache head dim ({k_cache.shape[2]}) must equal q's ({D})")
    Hkv = int(k_cache.shape[1])
    if Hkv <= 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k_cache heads ({Hkv})")


def _validate_token_map(B, req_to_token, seq_lens, slot_ids, block_size):
    """req_to_token [max_reqs, width], seq_lens / slot_ids [B] (int32 / int64), block_size."""
    check_tensor("req_to_token", req_to_token, ndim=2, dtypes=_IDX_INT)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=_IDX_INT)
    check_tensor("slot_ids", slot_ids, ndim=1, dtypes=_IDX_INT)
    if seq_lens.shape[0] != B or slot_ids.shape[0] != B:
        raise ValueError(f"seq_lens and slot_ids must have length B={B}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not (16 <= block_size <= 512) \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 512], got {block_size!r}")


def _validate_decode_indexer(q, sink, k_cache, v_cache, req_to_token, seq_lens, slot_ids, block_size, topk,
                             init_blocks, local_blocks, score_type, disable_index_value):
    _validate_query_cache(q, k_cache, score_type)
    B, Hq, D = q.shape
    if v_cache is None:
        if not disable_index_value:
            raise ValueError("v_cache is required unless disable_index_value=True")
    else:
        check_tensor("v_cache", v_cache)
        if v_cache.dtype != k_cache.dtype:
            raise TypeError(f"v_cache dtype {v_cache.dtype} must equal k_cache dtype {k_cache.dtype}")
        if tuple(v_cache.shape) != tuple(k_cache.shape):
            raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    if sink is not None:
        check_tensor("sink", sink, ndim=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
        if tuple(sink.shape) != (Hq, D):
            raise ValueError(f"sink must have shape {(Hq, D)}, got {tuple(sink.shape)}")
    _validate_token_map(B, req_to_token, seq_lens, slot_ids, block_size)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be in [1, {MAX_TOPK}], got {topk!r}")
    for name, v in (("init_blocks", init_blocks), ("local_blocks", local_blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    check_devices([("q", q), ("sink", sink), ("k_cache", k_cache), ("v_cache", v_cache),
                   ("req_to_token", req_to_token), ("seq_lens", seq_lens), ("slot_ids", slot_ids)])


def decode_block_scores(q, k_cache, req_to_token, seq_lens, slot_ids, num_blocks, block_size, sm_scale=None,
                        score_type="max") -> torch.Tensor:
    """Block scores of the decode indexer (docs/API.md §6.1.1): fp32 ``[Hq, B, num_blocks]``.

    q [B, Hq, D] bf16 / fp16; k_cache [max_slots, Hkv, D] (q's dtype, or fp8 e4m3 with bf16 q); req_to_token
    [max_reqs, width], seq_lens, slot_ids [B] (int32 / int64). ``scores[h, b, j]`` is the max (``"max"``) or the
    logsumexp (``"lse"``) of ``sm_scale * <q[b, h], k_cache[req_to_token[slot_ids[b], x] mod max_slots, h // G]>``
    over the tokens ``x`` of block j with ``x < L_b = clamp(seq_lens[b], 0, width)`` (NaN counts as -inf); -inf
    for a block without such a token. What ``flash_decode_with_topk_idx`` ranks (with
    ``num_blocks = ceil(min(max_seqlen, width) / block_size)``). No host synchronisation.
    """
    _validate_query_cache(q, k_cache, score_type)
    _validate_token_map(q.shape[0], req_to_token, seq_lens, slot_ids, block_size)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
    check_devices([("q", q), ("k_cache", k_cache), ("req_to_token", req_to_token), ("seq_lens", seq_lens),
                   ("slot_ids", slot_ids)])
    scale = float(q.shape[2]) ** -0.5 if sm_scale is None else float(sm_scale)
    return _scores(q, k_cache, req_to_token, seq_lens, slot_ids, num_blocks, block_size, scale, score_type == "lse")


_Q_DTYPES = (torch.bfloat16, torch.float16)
_BLOCK_SIZES = frozenset((16, 32, 64, 128, 256, 512))
_HEAD_DIMS = frozenset((64, 128, 256))
_INT32_MAX = 2**31 - 1


def _decode_indexer_fast_ok(q, sink, k_cache, v_cache, req_to_token, seq_lens, max_seqlen, slot_ids, block_size,
                            topk, init_blocks, local_blocks, score_type, disable_index_value):
    """Cheap check of the common eager call (no value path, no sink). True only for arguments that
    ``_validate_decode_indexer`` accepts; anything else (False) goes through the full validation."""
    T = torch.Tensor
    if not (type(block_size) is int and type(topk) is int and type(init_blocks) is int
            and type(local_blocks) is int and type(max_seqlen) is int and block_size in _BLOCK_SIZES
            and 1 <= topk <= MAX_TOPK and init_blocks >= 0 and local_blocks >= 0
            and (score_type == "max" or score_type == "lse") and sink is None and v_cache is None
            and disable_index_value is True
            and isinstance(q, T) and isinstance(k_cache, T) and isinstance(req_to_token, T)
            and isinstance(seq_lens, T) and isinstance(slot_ids, T)):
        return False
    qd, kd = q.dtype, k_cache.dtype
    if not ((qd is torch.bfloat16 or qd is torch.float16)
            and (kd is qd or (kd is torch.float8_e4m3fn and qd is torch.bfloat16))
            and q.ndim == 3 and k_cache.ndim == 3 and req_to_token.ndim == 2 and seq_lens.ndim == 1
            and slot_ids.ndim == 1 and req_to_token.dtype in _IDX_INT and seq_lens.dtype in _IDX_INT
            and slot_ids.dtype in _IDX_INT):
        return False
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    dev = q.device
    return (D in _HEAD_DIMS and k_cache.shape[2] == D and Hkv > 0 and Hq % Hkv == 0
            and seq_lens.shape[0] == B and slot_ids.shape[0] == B
            and k_cache.device == dev and req_to_token.device == dev and seq_lens.device == dev
            and slot_ids.device == dev and (q.is_cuda or (dev.type == "cpu" and interpreter_active())))


def flash_decode_with_topk_idx(q, sink, k_cache, v_cache, req_to_token, seq_lens, max_seqlen, slot_ids,
                               block_size, topk, init_blocks, local_blocks, sm_scale=None, use_tma=True,
                               score_type="max", disable_index_value=False, use_dense_main_attn=False, page_size=1):
    """Decode indexer (docs/API.md §6.1): block scores, forced init/local blocks, top-k block ids.

    q [B, Hq, D]; k_cache/v_cache [max_slots, Hkv, D]; req_to_token [max_reqs, width]; seq_lens, slot_ids [B].
    Returns ``(o [B, Hq, D] or None, topk_idx int32 [Hq, B, topk], None)``; ``o`` is the dense attention
    over all ``x < L_b`` (with ``sink``) unless ``disable_index_value``.

    Selection (docs/API.md §11.2, ``n = min(ceil(clamp(L_b, 0, width) / block_size), NB)``,
    ``NB = ceil(min(max_seqlen, width) / block_size)``): the init blocks ``j < min(init_blocks, n)`` that are not
    local (ascending), the local blocks ``[n - local_blocks, n)`` (ascending), then the other blocks with a
    finite or +inf score by (score desc, id asc); -1 padding. Two launches on a GPU: the score kernel and the
    native top-k (``native_topk_from_scores`` with ``force_init_blocks`` / ``force_local_blocks``).
    """
    if use_dense_main_attn:
        from .errors import MsaUnsupportedError
        raise MsaUnsupportedError("use_dense_main_attn=True is not supported")
    if not _decode_indexer_fast_ok(q, sink, k_cache, v_cache, req_to_token, seq_lens, max_seqlen, slot_ids,
                                   block_size, topk, init_blocks, local_blocks, score_type, disable_index_value):
        _validate_decode_indexer(q, sink, k_cache, v_cache, req_to_token, seq_lens, slot_ids, block_size, topk,
                                 init_blocks, local_blocks, score_type, disable_index_value)
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise ValueError(f"max_seqlen must be a host int, got {type(max_seqlen).__name__}")
    D = q.shape[2]
    scale = float(D) ** -0.5 if sm_scale is None else float(sm_scale)
    width = req_to_token.shape[1]
    NB = (max(0, min(max_seqlen, width)) + block_size - 1) // block_size
    scores = _scores(q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, scale, score_type == "lse")
    # The top-k clamps n to NB = ceil(min(max_seqlen, width) / block_size) <= ceil(width / block_size) and takes
    # negative lengths as 0, so int32 lengths go in as they are (same selection as clamping them to [0, width]).
    if seq_lens.dtype is not torch.int32:
        seq_lens32 = seq_lens.clamp(0, min(width, _INT32_MAX)).to(torch.int32)
    else:
        seq_lens32 = seq_lens
    topk_idx = _topk_from_scores_unchecked(scores, seq_lens32, block_size, topk, local_blocks, init_blocks)
    o = None
    if not disable_index_value:
        B, Hq, _ = q.shape
        Hkv = k_cache.shape[1]
        if NB == 0:
            o = torch.zeros_like(q)
        else:
            from .decode import flash_decode_with_gqa_share_sparse
            all_blocks = torch.arange(NB, device=q.device, dtype=torch.int32).view(1, 1, NB).expand(Hkv, B, NB)
            o = flash_decode_with_gqa_share_sparse(q, sink, k_cache, v_cache, req_to_token, seq_lens, slot_ids,
                                                   block_size, all_blocks.contiguous(), sm_scale=scale)
    return o, topk_idx, None


def naive_flash_decode_with_topk_idx(q, sink, kv_cache, seq_lens, max_seqlen, slot_ids, block_size, topk,
                                     sm_scale=None, init_blocks=0, local_blocks=0):
    """Float64 reference of docs/API.md §6.5 over the 5-D cache ``kv_cache [max_slots, 2, max_len, Hkv, D]``.

    Returns ``(o [B, Hq, D] in q's dtype, topk_idx int32 [Hq, B, topk])``. May synchronise (reference).
    """
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [max_slots, 2, max_len, Hkv, D], got {tuple(kv_cache.shape)}")
    max_len = int(kv_cache.shape[2])
    if max_len % block_size != 0:
        raise ValueError(f"kv_cache.shape[2] ({max_len}) must be a multiple of block_size ({block_size})")
    B, Hq, D = q.shape
    Hkv = int(kv_cache.shape[3])
    G = Hq // Hkv
    scale = float(D) ** -0.5 if sm_scale is None else float(sm_scale)
    o = torch.zeros(B, Hq, D, dtype=torch.float64)
    idx = torch.full((Hq, B, topk), -1, dtype=torch.int32)
    lens = seq_lens.cpu().tolist()
    slots = slot_ids.cpu().tolist()
    for b in range(B):
        L = max(0, min(int(lens[b]), max_len))
        nb = -(-L // block_size)
        kv = kv_cache[slots[b]].double().cpu()
        local = list(range(max(0, nb - local_blocks), nb))
        init = [j for j in range(min(init_blocks, nb)) if j not in local]
        for h in range(Hq):
            qh = q[b, h].double().cpu()
            z = kv[0, :L, h // G] @ qh * scale
            sc = [float(z[j * block_size:(j + 1) * block_size].max()) for j in range(nb)]
            rest = [j for j in range(nb) if j not in local and j not in init and not math.isnan(sc[j])
                    and sc[j] > -math.inf]
            rest.sort(key=lambda j: (-sc[j], j))
            order = (init + local + rest)[:topk]
            idx[h, b, :len(order)] = torch.tensor(order, dtype=torch.int32)
            if L > 0:
                logits = z
                m = logits.max()
                if sink is not None:
                    m = torch.maximum(m, sink[h].double().cpu() @ qh * scale)
                p = torch.exp(logits - m)
                den = p.sum()
                if sink is not None:
                    den = den + torch.exp(sink[h].double().cpu() @ qh * scale - m)
                o[b, h] = (p @ kv[1, :L, h // G]) / den
    return o.to(q.dtype).to(q.device), idx.to(q.device)
