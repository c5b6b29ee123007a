"""Float64 references of the spec's math (API.md section 11), independent of the package.

Everything here is plain PyTorch in float64 and deliberately simple (per request, dense masks).
"""

import math

import torch


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
