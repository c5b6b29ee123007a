"""Decode indexer (API.md §6.1, §6.5, §11.2): block scores of one decode token against a token-major index-K
cache, native top-k selection with forced init / local blocks, optional attention over the selected blocks.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ._launch import TritonLauncher
from ._registry import add_op_namespace_prefix
from ._validate import check_devices, check_tensor, interpreter_active
from .topk import _topk_from_scores_unchecked

__all__ = ["flash_decode_with_topk_idx", "naive_flash_decode_with_topk_idx"]

_IDX_INT = (torch.int32, torch.int64)


@triton.jit
def _decode_block_scores_kernel(q_ptr, k_ptr, r2t_ptr, seq_ptr, slot_ptr, out_ptr,
                                sqb, sqh, sqd, skt, skh, skd, srr, src, s_seq, s_slot,
                                width, n_rows, max_slots, G, Hkv, B, NB, n_chunks, tiles_per_prog, sm_scale,
                                D: tl.constexpr, BS: tl.constexpr, TN: tl.constexpr, GP: tl.constexpr,
                                LSE: tl.constexpr):
    """scores[h, b, j] = max (or logsumexp) of sm_scale*<q[b,h], k[slot(b,x), h//G]> over block j (fp32).

    One program per (request b, KV head g, chunk c of ``tiles_per_prog`` tiles of TN tokens). The G Q heads of
    KV head g share each gathered K tile ``[TN, D]`` (loaded once): ``s [GP, TN] = q_g [GP, D] @ K^T`` (fp32
    accumulation; rows >= G are zero padding), masked ``x >= L_b`` -> -inf, NaN -> -inf, then reduced per block:
    a tile holds ``TN // BS`` whole blocks (BS <= TN) or is ``1 / (BS // TN)`` of one block (BS > TN; the
    partial max / (max, sum) is carried across the block's tiles; ``tiles_per_prog`` is a multiple of
    ``BS // TN`` so blocks never straddle programs). Blocks ``>= NB`` are never written; blocks past L_b get
    -inf without any K / req_to_token load.
    """
    NBT: tl.constexpr = TN // BS if BS <= TN else 1  # blocks per tile
    TPB: tl.constexpr = BS // TN if BS > TN else 1  # tiles per block
    BT: tl.constexpr = BS if BS <= TN else TN  # tokens of one block inside a tile
    pid = tl.program_id(0)
    c = pid % n_chunks
    bg = pid // n_chunks
    b = bg // Hkv
    g = bg % Hkv
    L = tl.load(seq_ptr + b.to(tl.int64) * s_seq).to(tl.int64)
    L = tl.minimum(tl.maximum(L, 0), width)
    row = tl.load(slot_ptr + b.to(tl.int64) * s_slot).to(tl.int64)
    row_ok = (row >= 0) & (row < n_rows)  # contract: slot_ids in [0, max_reqs); otherwise empty, nothing read
    L = tl.where(row_ok, L, 0)
    row = tl.where(row_ok, row, 0)
    ii = tl.arange(0, GP)
    h_ok = ii < G
    h = g * G + ii
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h[:, None].to(tl.int64) * sqh + dd[None, :] * sqd,
                mask=h_ok[:, None], other=0.0)
    tt = tl.arange(0, TN)
    jb = tl.arange(0, NBT)
    out_rows = out_ptr + (h.to(tl.int64) * B + b) * NB  # [GP]
    t0 = c * tiles_per_prog  # first tile of this chunk (global tile index within the request)
    # tiles holding at least one token < L, rounded up to whole blocks, within this chunk
    n_act = tl.minimum(tl.maximum((L - t0.to(tl.int64) * TN + TN - 1) // TN, 0), tiles_per_prog).to(tl.int32)
    n_act = (n_act + TPB - 1) // TPB * TPB
    m = tl.full([GP, NBT], float("-inf"), tl.float32)
    acc = tl.zeros([GP, NBT], tl.float32)
    for t in range(0, n_act):
        x = (t0 + t).to(tl.int64) * TN + tt
        ok = x < L
        tok = tl.load(r2t_ptr + row * srr + x * src, mask=ok, other=0).to(tl.int64)
        tok = ((tok % max_slots) + max_slots) % max_slots
        kk = tl.load(k_ptr + tok[:, None] * skt + g * skh + dd[None, :] * skd, mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kk.to(q.dtype)), input_precision="ieee") * sm_scale  # [GP, TN] fp32
        s = tl.where(ok[None, :], s, float("-inf"))
        s = tl.where(s != s, float("-inf"), s)
        if NBT == 1:
            pm = tl.expand_dims(tl.max(s, axis=1), 1)  # [GP, 1]
        else:
            s3 = tl.reshape(s, (GP, NBT, BT))
            pm = tl.max(s3, axis=2)  # [GP, NBT]
        if LSE:
            pm_safe = tl.where(pm == float("-inf"), 0.0, pm)
            if NBT == 1:
                ps = tl.expand_dims(tl.sum(tl.exp(s - pm_safe), axis=1), 1)
            else:
                ps = tl.sum(tl.exp(s3 - tl.expand_dims(pm_safe, 2)), axis=2)
            m_new = tl.maximum(m, pm)
            mn_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - mn_safe) + ps * tl.exp(pm - mn_safe)
            m = m_new
        else:
            m = tl.maximum(m, pm)
        last = (t % TPB) == TPB - 1
        if LSE:
            res = tl.where(m == float("-inf"), float("-inf"), m + tl.log(tl.where(m == float("-inf"), 1.0, acc)))
        else:
            res = m
        j = (t0 + t) * NBT // TPB + jb  # block ids of this tile
        tl.store(out_rows[:, None] + j[None, :], res, mask=h_ok[:, None] & (j[None, :] < NB) & last)
        m = tl.where(last, float("-inf"), m)
        acc = tl.where(last, 0.0, acc)
    neg = tl.full([GP, NBT], float("-inf"), tl.float32)
    for t in range(n_act, tiles_per_prog, TPB):
        j = (t0 + t) * NBT // TPB + jb
        tl.store(out_rows[:, None] + j[None, :], neg, mask=h_ok[:, None] & (j[None, :] < NB))


# Launch table per compute-capability major (None = interpreter / unknown). ``tn``: tokens per tile by head dim
# (the gathered K tile [tn, D] is cp.async-prefetched one tile ahead into one shared-memory buffer, the
# req_to_token slice two ahead: ~38 KB per program at D 128 / tn 128, so ~5 programs per SM on sm_90 and the
# memory parallelism comes from occupancy); ``progs_per_sm``: target programs per SM when splitting a request's
# tiles into chunks; ``max_tpp``: most tiles per program. sm_12x has ~99 KB of shared memory per block.
# NOT MEASURED YET (choices by reasoning; sweep with benchmarks/bench_selection.py).
DECODE_SCORE_CONFIGS = {
    None: dict(tn={64: 32, 128: 32, 256: 32}, num_warps=4, num_stages=1, progs_per_sm=4, max_tpp=16),
    9: dict(tn={64: 128, 128: 128, 256: 64}, num_warps=4, num_stages=3, progs_per_sm=4, max_tpp=16),
    10: dict(tn={64: 128, 128: 128, 256: 64}, num_warps=4, num_stages=3, progs_per_sm=4, max_tpp=16),
    12: dict(tn={64: 128, 128: 64, 256: 32}, num_warps=4, num_stages=3, progs_per_sm=4, max_tpp=16),
}
_SM_COUNT_CPU = 8


def decode_score_config(major):
    """``DECODE_SCORE_CONFIGS`` entry for compute-capability major ``major`` (None = interpreter)."""
    if major is None:
        return DECODE_SCORE_CONFIGS[None]
    if major in DECODE_SCORE_CONFIGS:
        return DECODE_SCORE_CONFIGS[major]
    return DECODE_SCORE_CONFIGS[12 if major >= 12 else 9]


@functools.lru_cache(maxsize=None)
def _device_info(device_type: str, index):
    """(capability major or None, SM count), read once per device (host query, no sync)."""
    if device_type != "cuda":
        return None, _SM_COUNT_CPU
    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    return props.major, props.multi_processor_count


def decode_score_plan(cfg, D: int, block_size: int, NB: int, n_rows: int, sms: int):
    """(TN, GP-independent tiles_per_prog, n_chunks) for ``n_rows = B * Hkv`` (request, KV head) rows of NB blocks.

    Tiles of TN tokens; ``tiles_per_prog`` (a multiple of the tiles per block) is chosen so that about
    ``progs_per_sm * sms`` programs run, at most ``max_tpp`` tiles (rounded up to whole blocks) each.
    """
    TN = int(cfg["tn"][D])
    tpb = block_size // TN if block_size > TN else 1
    n_tiles = -(-(NB * block_size) // TN)
    want = -(-(n_rows * n_tiles) // max(1, int(cfg["progs_per_sm"]) * sms))
    tpp = max(1, min(want, int(cfg["max_tpp"]), n_tiles))
    tpp = -(-tpp // tpb) * tpb
    return TN, tpp, -(-n_tiles // tpp)


# Launch plans of the score kernel, keyed by everything they are derived from and everything Triton specialises
# on (device, dtypes, shapes, strides, NB, block size, lse): (cfg, major, out shape, mode, grid, int args,
# constexprs, launcher key, num_warps, num_stages). ``cfg`` is the DECODE_SCORE_CONFIGS entry the plan was made
# from; a plan is used only while that entry is still the one in the table (tests and tuning swap entries).
# Bounded: cleared when it reaches _PLAN_CACHE_MAX entries.
_PLAN_CACHE = {}
_PLAN_CACHE_MAX = 4096
_MODE_EMPTY, _MODE_NEG, _MODE_LAUNCH = 0, 1, 2


def _decode_scores_make_plan(key, q, kc, req_to_token, seq_lens, slot_ids, NB, block_size, lse):
    B, Hq, D = q.shape
    out_shape = (Hq, B, NB)
    major, sms = _device_info(q.device.type, q.device.index)
    cfg = decode_score_config(major)
    if B == 0 or NB == 0 or Hq == 0:
        return cfg, major, out_shape, _MODE_EMPTY, None, None, None, None, 0, 0
    Hkv, max_slots = kc.shape[1], kc.shape[0]
    n_req_rows, width = req_to_token.shape
    if max_slots == 0 or n_req_rows == 0 or width == 0:
        return cfg, major, out_shape, _MODE_NEG, None, None, None, None, 0, 0  # no key can be read: all -inf
    TN, tpp, n_chunks = decode_score_plan(cfg, D, block_size, NB, B * Hkv, sms)
    G = Hq // Hkv
    GP = max(16, triton.next_power_of_2(G))
    grid = (n_chunks * B * Hkv,)
    args = (*q.stride(), *kc.stride(), *req_to_token.stride(), seq_lens.stride(0), slot_ids.stride(0), width,
            n_req_rows, max_slots, G, Hkv, B, NB, n_chunks, tpp)
    cx = (D, block_size, TN, GP, lse)  # constexprs D, BS, TN, GP, LSE
    return (cfg, major, out_shape, _MODE_LAUNCH, grid, args, cx, (key, cx, n_chunks, tpp), cfg["num_warps"],
            cfg["num_stages"])


def _decode_block_scores_impl(q: torch.Tensor, k_cache: torch.Tensor, req_to_token: torch.Tensor,
                              seq_lens: torch.Tensor, slot_ids: torch.Tensor, NB: int, block_size: int,
                              sm_scale: float, lse: bool) -> torch.Tensor:
    """q [B, Hq, D], k_cache [max_slots, Hkv, D] -> fp32 block scores [Hq, B, NB].

    Grid: one program per (request, KV head, chunk of tiles); host ints only (CUDA-graph safe). The launch plan
    is cached (``_PLAN_CACHE``), so a repeated call costs a dict look-up, the output allocation and the launch.
    """
    if not q.is_cuda:  # CPU (Triton interpreter): widen the dtypes it cannot compute in
        if q.dtype == torch.bfloat16:
            q = q.float()
        if k_cache.dtype in (torch.bfloat16, torch.float8_e4m3fn):
            k_cache = k_cache.float()
    key = (q.device, q.dtype, q.shape, q.stride(), k_cache.dtype, k_cache.shape, k_cache.stride(),
           req_to_token.dtype, req_to_token.shape, req_to_token.stride(), seq_lens.dtype, seq_lens.stride(),
           slot_ids.dtype, slot_ids.stride(), NB, block_size, lse)
    plan = _PLAN_CACHE.get(key)
    if plan is None or plan[0] is not decode_score_config(plan[1]):
        plan = _decode_scores_make_plan(key, q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, lse)
        if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    _, _, out_shape, mode, grid, args, cx, lkey, num_warps, num_stages = plan
    out = torch.empty(out_shape, dtype=torch.float32, device=q.device)
    if mode == _MODE_LAUNCH:
        # direct launch of the compiled kernel once this signature has run (lkey fixes every dtype, shape, stride,
        # host int and constexpr of the launch)
        _SCORE_LAUNCHER(grid, (q, k_cache, req_to_token, seq_lens, slot_ids, out) + args + (float(sm_scale),) + cx,
                        key=lkey, num_warps=num_warps, num_stages=num_stages)
    elif mode == _MODE_NEG:
        out.fill_(float("-inf"))
    return out


_SCORE_LAUNCHER = TritonLauncher(_decode_block_scores_kernel)
# The registered op (torch.compile, opcheck, peers) runs the same implementation; eager calls of
# flash_decode_with_topk_idx call _decode_block_scores_impl directly (no dispatcher round trip).
_decode_block_scores_op = torch.library.custom_op(add_op_namespace_prefix("decode_block_scores"),
                                                  _decode_block_scores_impl, mutates_args=())


@_decode_block_scores_op.register_fake
def _(q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, sm_scale, lse):
    return q.new_empty((q.shape[1], q.shape[0], NB), dtype=torch.float32)


def _validate_decode_indexer(q, sink, k_cache, v_cache, req_to_token, seq_lens, slot_ids, block_size, topk,
                             init_blocks, local_blocks, score_type, disable_index_value):
    from ._validate import check_head_dim
    if score_type not in ("max", "lse"):
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
    check_tensor("req_to_token", req_to_token, ndim=2, dtypes=_IDX_INT)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=_IDX_INT)
    check_tensor("slot_ids", slot_ids, ndim=1, dtypes=_IDX_INT)
    if seq_lens.shape[0] != B or slot_ids.shape[0] != B:
        raise ValueError(f"seq_lens and slot_ids must have length B={B}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not (16 <= block_size <= 512) \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 512], got {block_size!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= 64:
        raise ValueError(f"topk must be in [1, 64], got {topk!r}")
    for name, v in (("init_blocks", init_blocks), ("local_blocks", local_blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    check_devices([("q", q), ("sink", sink), ("k_cache", k_cache), ("v_cache", v_cache),
                   ("req_to_token", req_to_token), ("seq_lens", seq_lens), ("slot_ids", slot_ids)])


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
            and 1 <= topk <= 64 and init_blocks >= 0 and local_blocks >= 0
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
    """Decode indexer (API.md §6.1): block scores, forced init/local blocks, top-k block ids.

    q [B, Hq, D]; k_cache/v_cache [max_slots, Hkv, D]; req_to_token [max_reqs, width]; seq_lens, slot_ids [B].
    Returns ``(o [B, Hq, D] or None, topk_idx int32 [Hq, B, topk], None)``; ``o`` is the dense attention
    over all ``x < L_b`` (with ``sink``) unless ``disable_index_value``.

    Selection (§11.2, ``n = min(ceil(clamp(L_b, 0, width) / block_size), NB)``,
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
    lse = score_type == "lse"
    if type(q) is torch.Tensor and not torch.compiler.is_compiling():
        scores = _decode_block_scores_impl(q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, scale,
                                           lse)  # eager: no dispatcher round trip
    else:
        scores = _decode_block_scores_op(q, k_cache, req_to_token, seq_lens, slot_ids, NB, block_size, scale, lse)
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
    """Float64 reference of §6.5 over the 5-D cache ``kv_cache [max_slots, 2, max_len, Hkv, D]``.

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


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions (scripts/aot_check.py; see _aot.py)
# ----------------------------------------------------------------------------------------------
def aot_configs(arch: int, full: bool = False):
    """Decode block-score launch configurations: ``DECODE_SCORE_CONFIGS[major]`` (tile TN per head dim, warps,
    stages), D 64/128/256, block size 16..512 (whole blocks per tile or several tiles per block), GP 16..64 (Q
    heads per KV head, padded), max / lse, q bf16/fp16, K q's dtype or fp8.
    """
    from ._aot import AotConfig, dedupe, major_of

    out = []
    dts = [("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp8e4nv")]
    cfg = decode_score_config(major_of(arch))
    gps = (16, 32, 64) if full else (16, 64)
    for D in (64, 128, 256):
        TN = cfg["tn"][D]
        for BS in ((16, 32, 64, 128, 256, 512) if full else (16, 128, 512)):
            for qd, kd in (dts if (full or D == 128) else dts[:1]):
                for lse in ((False, True) if full else ((False, True) if (D == 128 and BS == 128) else (True,))):
                    for GP in (gps if (full or (D == 128 and BS == 128)) else gps[:1]):
                        args = dict(q_ptr="*" + qd, k_ptr="*" + kd, r2t_ptr="*i32", seq_ptr="*i32", slot_ptr="*i32",
                                    out_ptr="*fp32", sqb="i32:D", sqh="i32:D", sqd=1, skt="i32:D", skh="i32:D",
                                    skd=1, srr="i32:D", src=1, s_seq=1, s_slot=1, width="i32", n_rows="i32",
                                    max_slots="i32", G="i32", Hkv=1, B="i32", NB="i32", n_chunks="i32",
                                    tiles_per_prog="i32", sm_scale="fp32", D=D, BS=BS, TN=TN, GP=GP, LSE=lse)
                        out.append(AotConfig(_decode_block_scores_kernel, args, cfg["num_warps"], cfg["num_stages"],
                                             f"blkscore D{D} BS{BS} TN{TN} GP{GP} q{qd}/k{kd} lse{int(lse)}",
                                             hot=True))
    return dedupe(out)
