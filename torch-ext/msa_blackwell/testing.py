"""Float64 references of the package's math (docs/API.md §11), for checking results.

Plain PyTorch in float64, deliberately simple (per request, dense masks): slow, for tests, validation
scripts and users who want to check the kernels' outputs on their own inputs. Nothing here launches a
kernel or imports the rest of the package.

* ``q2k_block_mask`` / ``visible_from_blocks`` / ``attention_ref``: block-sparse attention of one request
  (causal bottom-right, temperature LSE), the oracle of every attention function;
* ``gather_paged`` / ``gather_token_major``: a request's K/V rows from a paged or token-major cache;
* ``paged_decode_ref`` / ``token_major_decode_ref``: ``sparse_decode_atten_func`` and
  ``flash_decode_with_gqa_share_sparse`` per request;
* ``build_k2q_csr_ref`` / ``csr_block_mask`` / ``csr_rows_per_request`` / ``csr_level_row_map``: the CSR of
  docs/API.md §5.3 in pure Python and its set semantics (§5.5); ``csr_from_pairs``: its last step (row
  counts, prefix sums, -1 padding) for any list of ``(row, i)`` entries.
"""

import math

import torch

__all__ = ["q2k_block_mask", "visible_from_blocks", "attention_ref", "gather_paged", "gather_token_major",
           "paged_decode_ref", "token_major_decode_ref", "csr_rows_per_request", "csr_level_row_map",
           "csr_from_pairs", "build_k2q_csr_ref", "csr_block_mask"]


def q2k_block_mask(idx: torch.Tensor, nb: int) -> torch.Tensor:
    """Block-id rows -> boolean block sets.

    idx: int [H, T, topk] block ids (negative = empty, anything >= nb dropped, duplicates collapse).
    Returns bool [H, T, nb].
    """
    h, t, k = idx.shape
    idx = idx.long().cpu()
    mask = torch.zeros(h, t, nb + 1, dtype=torch.bool)
    valid = (idx >= 0) & (idx < nb)
    mask.scatter_(2, torch.where(valid, idx, torch.full_like(idx, nb)), True)
    return mask[:, :, :nb]


def visible_from_blocks(block_mask: torch.Tensor, lq: int, lk: int, *, block_size: int = 128,
                        causal: bool = True) -> torch.Tensor:
    """Token visibility of one request.

    block_mask: bool [H, lq, nb] selected blocks per (head, local query) (nb may exceed the blocks of lk).
    Returns bool [H, lq, lk]: x visible iff its block is selected, x < lk and (causal) x <= i + lk - lq.
    """
    h = block_mask.shape[0]
    if lk == 0:
        return torch.zeros(h, lq, 0, dtype=torch.bool)
    x = torch.arange(lk)
    blk = x // block_size
    nb = block_mask.shape[2]
    in_range = blk < nb
    vis = torch.zeros(h, lq, lk, dtype=torch.bool)
    vis[:, :, in_range] = block_mask[:, :, blk[in_range]]
    if causal:
        lim = torch.arange(lq) + (lk - lq)
        vis &= x.view(1, 1, -1) <= lim.view(1, -1, 1)
    return vis


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                  *, sink: torch.Tensor = None, tau: float = None):
    """Masked GQA attention of one request in float64.

    q: [lq, Hq, D]; k, v: [lk, Hkv, D] (logical token order); visible: bool [Hkv, lq, lk].
    sink: optional [Hq, D] (enters the denominator only). tau: optional temperature for LSE_T.
    Returns (O float64 [lq, Hq, D], LSE float64 [lq, Hq], LSE_T or None). Empty rows: O = 0, LSE = -inf.
    """
    q = q.double()
    k = k.double()
    v = v.double()
    lq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    kh = k.permute(1, 0, 2).repeat_interleave(g, 0)  # [Hq, lk, D]
    vh = v.permute(1, 0, 2).repeat_interleave(g, 0)
    vis = visible.to(q.device).repeat_interleave(g, 0)  # [Hq, lq, lk]
    s = scale * torch.einsum("qhd,hkd->hqk", q, kh)  # [Hq, lq, lk]
    s = s.masked_fill(~vis, -math.inf)
    m = s.amax(-1, keepdim=True) if s.shape[-1] else torch.full((hq, lq, 1), -math.inf, dtype=q.dtype, device=q.device)
    empty = torch.isneginf(m)
    if sink is not None:
        ss = scale * torch.einsum("qhd,hd->hq", q, sink.double().to(q.device)).unsqueeze(-1)
        m_all = torch.maximum(m, ss)
    else:
        m_all = m
    m_safe = torch.where(torch.isneginf(m_all), torch.zeros_like(m_all), m_all)
    p = torch.exp(s - m_safe)
    l_tok = p.sum(-1, keepdim=True)
    denom = l_tok + (torch.exp(ss - m_safe) if sink is not None else 0.0)
    o = torch.einsum("hqk,hkd->hqd", p, vh) / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.where(empty, torch.zeros_like(o), o)
    lse = torch.where(empty, torch.full_like(m, -math.inf), m_safe + torch.log(l_tok)).squeeze(-1)
    lse_t = None
    if tau is not None:
        st = s / tau
        mt = st.amax(-1, keepdim=True) if st.shape[-1] else m
        mt_safe = torch.where(torch.isneginf(mt), torch.zeros_like(mt), mt)
        lse_t = torch.where(empty, torch.full_like(mt, -math.inf),
                            mt_safe + torch.log(torch.exp(st - mt_safe).sum(-1, keepdim=True))).squeeze(-1)
        lse_t = lse_t.permute(1, 0)
    return o.permute(1, 0, 2), lse.permute(1, 0), lse_t


def gather_paged(cache: torch.Tensor, page_table_row: torch.Tensor, lk: int, block_size: int = 128) -> torch.Tensor:
    """Logical tokens of one request from a paged HND cache [P, Hkv, bs, D] -> [lk, Hkv, D]."""
    x = torch.arange(lk, device=cache.device)
    pages = page_table_row.to(cache.device).long()[x // block_size]
    return cache[pages, :, x % block_size, :]


def gather_token_major(cache: torch.Tensor, req_row: torch.Tensor, lk: int) -> torch.Tensor:
    """Logical tokens of one request from a token-major cache [S, Hkv, D] via req_to_token -> [lk, Hkv, D]."""
    slots = req_row[:lk].to(cache.device).long() % cache.shape[0]
    return cache[slots]


def paged_decode_ref(q, k, v, idx, page_table, seqused_k, seqlen_q, *, causal=True, scale=None, block_size=128):
    """Float64 reference of paged HND decode (docs/API.md §5.1 / 11.1).

    q [B*seqlen_q, Hq, D]; k, v [P, Hkv, bs, D]; idx int [Hkv, B*seqlen_q, topk] or None (dense);
    page_table [B, W]; seqused_k [B]. Out-of-table positions are masked.
    Returns (O float64 [B*seqlen_q, Hq, D], LSE float64 [B*seqlen_q, Hq]) on the CPU.
    """
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    page_table, seqused_k = page_table.cpu(), seqused_k.cpu()
    idx = None if idx is None else idx.cpu()
    b_count = page_table.shape[0]
    hkv = k.shape[1]
    d = q.shape[2]
    scale = d ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(b_count):
        lk = max(0, int(seqused_k[b]))
        lk_addr = min(lk, page_table.shape[1] * block_size)
        rows = slice(b * seqlen_q, (b + 1) * seqlen_q)
        nb = -(-lk_addr // block_size)
        if idx is None:
            bm = torch.ones(hkv, seqlen_q, nb, dtype=torch.bool)
        else:
            bm = q2k_block_mask(idx[:, rows], nb)
        vis = visible_from_blocks(bm, seqlen_q, lk, block_size=block_size, causal=causal)[:, :, :lk_addr]
        kb = gather_paged(k, page_table[b], lk_addr, block_size)
        vb = gather_paged(v, page_table[b], lk_addr, block_size)
        o, lse, _ = attention_ref(q[rows], kb, vb, vis, scale)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return (torch.zeros(0, q.shape[1], d, dtype=torch.float64), torch.zeros(0, q.shape[1], dtype=torch.float64))
    return torch.cat(outs), torch.cat(lses)


def token_major_decode_ref(q, k_cache, v_cache, req_to_token, seq_lens, slot_ids, block_size, topk_idx, *,
                           scale=None, sink=None):
    """Float64 reference of the direct token-major decode (docs/API.md §6.2 / 11.1), one query per request.

    q [B, Hq, D]; k_cache, v_cache [S, Hkv, D]; req_to_token [R, W]; seq_lens, slot_ids [B];
    topk_idx [Hkv, B, topk]; sink [Hq, D] or None. Returns (O float64 [B, Hq, D], LSE [B, Hq]).
    """
    q, k_cache, v_cache = q.cpu(), k_cache.cpu(), v_cache.cpu()
    req_to_token, seq_lens, slot_ids, topk_idx = req_to_token.cpu(), seq_lens.cpu(), slot_ids.cpu(), topk_idx.cpu()
    sink = None if sink is None else sink.cpu()
    d = q.shape[2]
    scale = d ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(q.shape[0]):
        lk = max(0, min(int(seq_lens[b]), req_to_token.shape[1]))
        nb = -(-lk // block_size)
        bm = q2k_block_mask(topk_idx[:, b:b + 1], nb)
        vis = visible_from_blocks(bm, 1, lk, block_size=block_size, causal=True)
        kb = gather_token_major(k_cache, req_to_token[int(slot_ids[b])], lk)
        vb = gather_token_major(v_cache, req_to_token[int(slot_ids[b])], lk)
        o, lse, _ = attention_ref(q[b:b + 1], kb, vb, vis, scale, sink=sink)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


# ---- KV-major CSR (docs/API.md §5.3 / §5.5), straight from the spec steps, pure Python ----------------------

def csr_rows_per_request(cu_k, block_size: int = 128):
    """``R_b = ceil(Lk_b / block_size)`` (negative lengths count as 0) from a list ``cu_k``."""
    return [max(0, -(-(cu_k[b + 1] - cu_k[b]) // block_size)) for b in range(len(cu_k) - 1)]


def csr_level_row_map(cu_k, block_size: int = 128):
    """Level-major row map of docs/API.md §5.3 step 2: dict ``(b, j) -> row``."""
    R = csr_rows_per_request(cu_k, block_size)
    row, r = {}, 0
    for j in range(max(R, default=0)):
        for b in range(len(R)):
            if j < R[b]:
                row[(b, j)] = r
                r += 1
    return row


def csr_from_pairs(heads, total_rows: int, width: int):
    """Per KV head, a list of ``(row, i)`` entries already in CSR order (rows ascending; ``0 <= row <
    total_rows``) -> ``(row_ptr int32 [Hkv, total_rows + 1], q_indices int32 [Hkv, width])`` as CPU tensors:
    row pointers are the prefix sums of the row counts, ``q_indices`` holds the ``i`` values, padded with -1."""
    rps, qis = [], []
    for pairs in heads:
        rp = [0] * (total_rows + 1)
        for r, _ in pairs:
            rp[r + 1] += 1
        for x in range(total_rows):
            rp[x + 1] += rp[x]
        rps.append(rp)
        qis.append([i for _, i in pairs] + [-1] * (width - len(pairs)))
    hkv = len(heads)
    return (torch.tensor(rps, dtype=torch.int32).view(hkv, total_rows + 1),
            torch.tensor(qis, dtype=torch.int32).view(hkv, width))


def build_k2q_csr_ref(q2k, cu_q, cu_k, total_rows: int, max_kv_blocks: int, block_size: int = 128):
    """docs/API.md §5.3 steps 1-7 in pure Python.

    q2k: int tensor or nested list [Hkv, total_q, topK]; cu_q, cu_k: lists [B+1].
    Returns (row_ptr int32 [Hkv, T+1], q_indices int32 [Hkv, total_q*topK]) as CPU tensors.
    """
    if isinstance(q2k, torch.Tensor):
        hkv, total_q, topk = q2k.shape
        q2k = q2k.tolist()
    else:
        hkv, total_q, topk = len(q2k), len(q2k[0]), len(q2k[0][0])
    cu_q = [int(x) for x in cu_q]
    cu_k = [int(x) for x in cu_k]
    R = csr_rows_per_request(cu_k, block_size)
    row = csr_level_row_map(cu_k, block_size)
    T = total_rows
    heads = []
    for g in range(hkv):
        pairs = []
        for b in range(len(cu_q) - 1):
            for t in range(cu_q[b], cu_q[b + 1]):
                if t >= total_q:
                    continue
                for j in q2k[g][t]:
                    if j < 0 or j >= R[b] or j >= max_kv_blocks:
                        continue
                    if row[(b, j)] >= T:
                        continue
                    pairs.append((row[(b, j)], t - cu_q[b]))
        pairs.sort()
        heads.append(pairs)
    return csr_from_pairs(heads, T, total_q * topk)


def csr_block_mask(row_ptr, q_idx, cu_q, cu_k, b: int, nb: int, block_size: int = 128) -> torch.Tensor:
    """Set semantics of docs/API.md §5.5 for request ``b``: bool [Hkv, Lq_b, nb] selected blocks.

    Rows via the level-major map of ``cu_k``; row pointers clamped into [0, q_idx.shape[1]];
    entries outside [0, Lq_b) ignored; repeated entries count once.
    """
    rp = row_ptr.cpu().tolist()
    qi = q_idx.cpu().tolist()
    cu_q = [int(x) for x in cu_q]
    cu_k = [int(x) for x in cu_k]
    row = csr_level_row_map(cu_k, block_size)
    lq = cu_q[b + 1] - cu_q[b]
    hkv = len(rp)
    T = len(rp[0]) - 1
    ncols = len(qi[0])
    mask = torch.zeros(hkv, lq, nb, dtype=torch.bool)
    for (bb, j), r in row.items():
        if bb != b or r >= T or j >= nb:
            continue
        for g in range(hkv):
            lo = min(max(rp[g][r], 0), ncols)
            hi = min(max(rp[g][r + 1], 0), ncols)
            for n in range(lo, hi):
                i = qi[g][n]
                if 0 <= i < lq:
                    mask[g, i, j] = True
    return mask
