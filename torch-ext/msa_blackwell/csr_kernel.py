"""CSR kernels (``build_k2q_csr``, ``k2q_to_q2k`` and the prefill's CSR inversion): Triton kernels, launch, AOT list.

Builder (device-side only: no host synchronisation, graph-capturable, bit-deterministic), 4 launches and no
memsets (every output column is written by a kernel). Tokens are cut into chunks of ``C`` tokens (``C*TK``
entries with ``TK = next_pow2(topK)``; 1024 entries by default, ``tuning.override(csr_chunk_entries=...)`` for
benchmarks; doubled while the chunk histogram would exceed 2^25 entries):

1. ``_csr_count_kernel`` (grid ``Hkv x chunks``): every entry ``(t, s)`` -> request ``b`` (``_find_request``, the
   owner rule of docs/API.md §12.1), validity (``0 <= j < R_b``, ``j < max_kv_blocks``), level-major row
   ``row(b, j) = sum_b' min(R_b', j) + #{b' < b : R_b' > j}`` (an O(B) loop) and ``row < T``; per-chunk row
   histogram ``cnt[g, chunk, 0:T]`` in registers (``tl.histogram``, ``T <= 1024``) stored whole (no zeroing, no
   contended atomics); larger ``T`` uses integer ``atomic_add`` into a zeroed table.
2. ``_csr_scan_chunks_kernel``: exclusive scan of ``cnt`` over chunks (in place) + per-row totals.
3. ``_csr_rowptr_kernel``: scan of the totals over rows -> ``k2q_row_ptr``.
4. ``_csr_scatter_kernel`` (grid ``Hkv x chunks``): recomputes the chunk's entries, sorts the keys
   ``(row << log2(C*TK)) | e`` (``e`` = entry index in ``(t, s)`` order; int32 keys while they fit, else int64)
   in registers, ranks each entry inside its row run with a segmented ``associative_scan`` and writes ``i`` at
   ``row_ptr[row] + cnt[g, chunk, row] + rank``. The output equals a stable sort by row of the entries in
   ``(t, s)`` order, i.e. the sort by ``(row, i)`` of docs/API.md §5.3. The same program writes its share of
   the ``-1`` tail.

``build_torch`` is the PyTorch path for CPU tensors (the same binary search step for step, stable
``torch.sort``; it may synchronise): identical results.

Inversion (``invert_csr_slots``, used by the prefill kernel and ``k2q_to_q2k``): ``_rowinfo_kernel`` maps every
row ``r < T`` back to ``(b, j)`` (or -1) and writes each request's query-row window and owned rows
(``_request_window``); ``_csr_invert_kernel`` walks every row segment (row pointers clamped into
``[0, k2q_q_indices.shape[1]]``; entries outside ``[0, Lq_b)`` or naming a row the request does not own are
ignored) and inserts ``j`` into the token's slot set ``slots[g, t, 0:CAP]`` (``atomic_cas``, linear probing from
``j mod CAP``, ``CAP = next_pow2(2*topK)``). Repeated ``(row, i)`` pairs count once; slot positions depend on
the race order, the slot set does not, and consumers only use the set.
"""

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import KV_BLOCK
from ._validate import interpreter_active

__all__ = ["build_triton", "build_torch", "slot_capacity", "invert_csr_slots", "bsearch_iters", "aot_configs"]

DEFAULT_CHUNK_ENTRIES = 1024  # entries (tokens x next_pow2(topK)) per builder chunk on a GPU
INTERPRETER_CHUNK_ENTRIES = 256  # the interpreter's tl.sort / scans are slow on big tiles


def bsearch_iters(n: int) -> int:
    """Iterations of the vectorised binary search over ``n + 1`` boundaries."""
    return max(1, int(n).bit_length() + 1)


@triton.jit
def _probe(cu_ptr, lo, hi):
    """One bisection probe over ``cu[lo..hi]``: ``(act, mid, cu[mid])``: ``act`` where the search is still open
    (``lo < hi``), the upper-middle index ``mid = (lo + hi + 1) // 2`` and its boundary (0 where closed)."""
    act = lo < hi
    mid = (lo + hi + 1) // 2
    return act, mid, tl.load(cu_ptr + mid, mask=act, other=0)


@triton.jit
def _turn(lo, hi, act, mid, right):
    """The bisection step after a probe: ``lo = mid`` where open and ``right``, ``hi = mid - 1`` where open and not."""
    return tl.where(act & right, mid, lo), tl.where(act & (~right), mid - 1, hi)


@triton.jit
def _find_request(cu_ptr, t, B, niter):
    """Vectorised: ``b = #{b' in [1, B] : cu[b'] <= t}`` (the request of token ``t`` for monotone cu)."""
    lo = t * 0
    hi = lo + B
    for _ in range(niter):
        act, mid, c = _probe(cu_ptr, lo, hi)
        lo, hi = _turn(lo, hi, act, mid, c <= t)
    return lo


@triton.jit
def _nblocks(lo, hi):
    """``max(0, ceil((hi - lo) / 128))`` on int32 tensors (no negative-division pitfalls). The difference is
    taken in int64 (``hi - lo`` of two int32 values can exceed the int32 range), the result fits int32."""
    n = hi.to(tl.int64) - lo
    n = tl.where(n > 0, n, 0)
    return ((n + 127) // 128).to(tl.int32)


@triton.jit
def _request_window(cuq_ptr, b, B, niter):
    """Rows of request ``b`` in ``[0, B]`` under the owner rule (docs/API.md §12.1), for any ``cu_seqlens_q``.

    The owner of row ``t`` is ``_find_request(t)`` if ``cu[b] <= t < cu[b+1]`` (else none). The bisection's
    answer is non-decreasing in ``t``, so walking its probe path toward ``b`` (the probe indices depend on
    ``b`` only, not on ``t``) gives, with ``niter`` loads:

    * ``ws``: the least ``t`` whose bisection answer is ``>= b`` (``-2^31`` for ``b = 0``): non-decreasing
      in ``b``, so the windows ``[ws_b, ws_{b+1})`` partition the rows, and window ``b`` holds every row that
      request ``b`` owns;
    * ``[ol, oh)``: the rows ``b`` owns (``ol >= oh`` when none; always none for ``b = B``).

    For non-decreasing ``cu`` this is ``ws = cu[b]`` (``b >= 1``) and ``[ol, oh) = [cu[b], cu[b+1])``.
    ``b`` may be a scalar or a tensor; the results are int32 of its shape.
    """
    NEG: tl.constexpr = -2147483648
    POS: tl.constexpr = 2147483647
    lo = b * 0
    hi = lo + B
    maxr = lo + NEG  # max of cu[mid] over the probes where the path turns right (t >= cu[mid] needed)
    hmin = lo + POS  # min of cu[mid] over the probes where it turns left (t < cu[mid] needed)
    ws = lo + POS
    for _ in range(niter):
        act, mid, c = _probe(cuq_ptr, lo, hi)
        right = mid <= b
        left = act & (~right)
        # a row that goes right here (t >= c, after the right turns so far) ends at a request > b
        ws = tl.where(left, tl.minimum(ws, tl.maximum(maxr, c)), ws)
        maxr = tl.where(act & right, tl.maximum(maxr, c), maxr)
        hmin = tl.where(left, tl.minimum(hmin, c), hmin)
        lo, hi = _turn(lo, hi, act, mid, right)
    ws = tl.minimum(ws, maxr)
    real = b < B
    bc = tl.minimum(b, B - 1)
    ol = tl.maximum(maxr, tl.load(cuq_ptr + bc))
    oh = tl.minimum(hmin, tl.load(cuq_ptr + bc + 1))
    oh = tl.where(real, oh, ol)
    return ws, ol, oh


@triton.jit
def _level_row(cuk_ptr, B, b, j):
    """Level-major row of (request ``b``, block ``j``): ``sum_b' min(R_b', j) + #{b' < b : R_b' > j}``.

    ``b`` and ``j`` are broadcast-compatible int tensors; returns int64 of their broadcast shape.
    """
    row = (j * 0 + b * 0).to(tl.int64)
    for bp in range(0, B):
        r = _nblocks(tl.load(cuk_ptr + bp), tl.load(cuk_ptr + bp + 1))
        row += tl.minimum(r, j).to(tl.int64) + ((bp < b) & (r > j)).to(tl.int64)
    return row


@triton.jit
def _entry_rows(q2k_ptr, s_g, s_t, s_s, cuq_ptr, cuk_ptr, g, c, total_q, topk, B, niter, T, max_kvb,
                C: tl.constexpr, TK: tl.constexpr):
    """Rows (int64, [C, TK]), batch-local q index (int32, [C]) and validity of the entries of chunk ``c``."""
    t = c * C + tl.arange(0, C)
    s = tl.arange(0, TK)
    tmask = t < total_q
    smask = s < topk
    ptrs = q2k_ptr + g.to(tl.int64) * s_g + t.to(tl.int64)[:, None] * s_t + s.to(tl.int64)[None, :] * s_s
    ids = tl.load(ptrs, mask=tmask[:, None] & smask[None, :], other=-1)
    b = _find_request(cuq_ptr, t, B, niter)
    bc = tl.minimum(b, B - 1)
    qs = tl.load(cuq_ptr + bc)
    qe = tl.load(cuq_ptr + bc + 1)
    tok_ok = tmask & (b < B) & (qs <= t) & (t < qe)
    rb = _nblocks(tl.load(cuk_ptr + bc), tl.load(cuk_ptr + bc + 1))
    valid = tok_ok[:, None] & smask[None, :] & (ids >= 0) & (ids < rb[:, None]) & (ids < max_kvb)
    jj = tl.where(valid, ids, 0)
    row = _level_row(cuk_ptr, B, bc[:, None], jj)
    valid = valid & (row < T)
    return row, t - qs, valid


@triton.jit
def _csr_count_kernel(q2k_ptr, s_g, s_t, s_s, cuq_ptr, cuk_ptr, cnt_ptr, total_q, topk, B, niter, T, max_kvb,
                      nch, C: tl.constexpr, TK: tl.constexpr, NB: tl.constexpr):
    """Per-chunk row histogram ``cnt[g, c, 0:T]``. ``NB > 0``: in-register ``tl.histogram`` over ``NB >= T``
    bins, every bin stored (no atomics, no memset); ``NB == 0``: integer atomics into a zeroed table."""
    g = tl.program_id(0)
    c = tl.program_id(1)
    row, i, valid = _entry_rows(q2k_ptr, s_g, s_t, s_s, cuq_ptr, cuk_ptr, g, c, total_q, topk, B, niter, T,
                                max_kvb, C, TK)
    base = cnt_ptr + (g.to(tl.int64) * nch + c) * T
    if NB > 0:
        CTK: tl.constexpr = C * TK
        r1 = tl.reshape(tl.where(valid, row, 0).to(tl.int32), [CTK])
        h = tl.histogram(r1, NB, mask=tl.reshape(valid, [CTK]))
        bins = tl.arange(0, NB)
        tl.store(base + bins, h, mask=bins < T)
    else:
        ones = tl.full([C, TK], 1, tl.int32)
        tl.atomic_add(base + tl.where(valid, row, 0), ones, mask=valid, sem="relaxed")


@triton.jit
def _csr_scan_chunks_kernel(cnt_ptr, tot_ptr, nch, T, NCB: tl.constexpr, BR: tl.constexpr):
    g = tl.program_id(0)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    rmask = r < T
    base = cnt_ptr + g.to(tl.int64) * nch * T
    carry = tl.zeros([BR], tl.int32)
    for c0 in range(0, nch, NCB):
        c = c0 + tl.arange(0, NCB)
        m = (c[:, None] < nch) & rmask[None, :]
        p = base + c.to(tl.int64)[:, None] * T + r[None, :]
        x = tl.load(p, mask=m, other=0)
        incl = tl.cumsum(x, axis=0)
        tl.store(p, incl - x + carry[None, :], mask=m)
        carry += tl.sum(x, axis=0)
    tl.store(tot_ptr + g.to(tl.int64) * T + r, carry, mask=rmask)


@triton.jit
def _csr_rowptr_kernel(tot_ptr, rp_ptr, T, BR: tl.constexpr):
    g = tl.program_id(0)
    base = rp_ptr + g.to(tl.int64) * (T + 1)
    carry = tl.sum(tl.zeros([BR], tl.int32), axis=0)
    tl.store(base, carry)
    for r0 in range(0, T, BR):
        r = r0 + tl.arange(0, BR)
        m = r < T
        x = tl.load(tot_ptr + g.to(tl.int64) * T + r, mask=m, other=0)
        tl.store(base + 1 + r, tl.cumsum(x, axis=0) + carry, mask=m)
        carry += tl.sum(x, axis=0)


@triton.jit
def _keep_run_start(r1, p1, r2, p2):
    # (row, sorted position) pairs sorted by row: carry the run's first position while the row is unchanged
    return r2, tl.where(r1 == r2, p1, p2)


@triton.jit
def _csr_scatter_kernel(q2k_ptr, s_g, s_t, s_s, cuq_ptr, cuk_ptr, cnt_ptr, rp_ptr, out_ptr, total_q, topk, B,
                        niter, T, max_kvb, nch, ncols, C: tl.constexpr, TK: tl.constexpr, LOGN: tl.constexpr,
                        KEY64: tl.constexpr):
    g = tl.program_id(0)
    c = tl.program_id(1)
    CTK: tl.constexpr = C * TK
    row, i, valid = _entry_rows(q2k_ptr, s_g, s_t, s_s, cuq_ptr, cuk_ptr, g, c, total_q, topk, B, niter, T,
                                max_kvb, C, TK)
    # key = (row << LOGN) | entry index e (e = local token * TK + s, i.e. (t, s) order); int32 when it fits
    e = tl.arange(0, CTK)
    if KEY64:
        KDT: tl.constexpr = tl.int64
        SENT: tl.constexpr = 0x7FFFFFFFFFFFFFFF
    else:
        KDT: tl.constexpr = tl.int32
        SENT: tl.constexpr = 0x7FFFFFFF
    key = tl.where(tl.reshape(valid, [CTK]), (tl.reshape(row, [CTK]).to(KDT) << LOGN) | e.to(KDT), SENT)
    skey = tl.sort(key)
    ok = skey != SENT
    srow = skey >> LOGN
    se = (skey & (CTK - 1)).to(tl.int32)
    t = c * C + se // TK
    bq = tl.minimum(_find_request(cuq_ptr, t, B, niter), B - 1)
    sval = t - tl.load(cuq_ptr + bq)
    p = tl.arange(0, CTK)
    _, start = tl.associative_scan((srow, p), 0, _keep_run_start)
    rank = p - start
    rowc = tl.where(ok, srow, 0)
    rp = tl.load(rp_ptr + g.to(tl.int64) * (T + 1) + rowc, mask=ok, other=0)
    off = tl.load(cnt_ptr + (g.to(tl.int64) * nch + c) * T + rowc, mask=ok, other=0)
    pos = rp.to(tl.int64) + off + rank
    ok = ok & (pos >= 0) & (pos < ncols)
    obase = out_ptr + g.to(tl.int64) * ncols
    tl.store(obase + tl.where(ok, pos, 0), sval, mask=ok)
    # the -1 tail: columns of this chunk's share that lie at or after nnz_g
    nnz = tl.load(rp_ptr + g.to(tl.int64) * (T + 1) + T)
    col = c.to(tl.int64) * C * topk + tl.arange(0, CTK)
    fill = (tl.arange(0, CTK) < C * topk) & (col < ncols) & (col >= nnz)
    tl.store(obase + col, tl.full([CTK], -1, tl.int32), mask=fill)


@triton.jit
def _rowinfo_kernel(cuk_ptr, B, T, rb_ptr, rj_ptr, cuq_ptr, total_q, niter, info_ptr, BJ: tl.constexpr):
    """Row -> (b, j) for rows < T (arrays pre-filled with -1). Grid (B, max(1, cdiv(T, BJ))).

    Programs ``(b, 0)`` also write the query-row windows of ``_request_window`` for ``b`` (and ``B``, by
    ``b = B - 1``), clamped into ``[0, total_q]``: ``info[0, b]`` window start, ``info[1:3, b]`` owned rows
    ``[lo, hi)`` (``lo == hi`` when none); ``info`` is int32 ``[3, B + 1]``.
    """
    b = tl.program_id(0)
    j0 = tl.program_id(1) * BJ
    if tl.program_id(1) == 0:
        bb = b + tl.arange(0, 2)
        keep = (bb == b) | (bb == B)
        ws, ol, oh = _request_window(cuq_ptr, bb, B, niter)
        ws = tl.minimum(tl.maximum(ws, 0), total_q)
        ol = tl.minimum(tl.maximum(ol, 0), total_q)
        oh = tl.minimum(tl.maximum(oh, ol), total_q)
        tl.store(info_ptr + bb, ws, mask=keep)
        tl.store(info_ptr + (B + 1) + bb, ol, mask=keep)
        tl.store(info_ptr + 2 * (B + 1) + bb, oh, mask=keep)
    rb = _nblocks(tl.load(cuk_ptr + b), tl.load(cuk_ptr + b + 1))
    if j0 < rb:
        j = j0 + tl.arange(0, BJ)
        row = _level_row(cuk_ptr, B, b, j)
        m = (j < rb) & (row < T)
        rowc = tl.where(m, row, 0)
        tl.store(rb_ptr + rowc, tl.zeros([BJ], tl.int32) + b, mask=m)
        tl.store(rj_ptr + rowc, j, mask=m)


@triton.jit
def _csr_invert_kernel(rp_ptr, s_rg, s_rr, qi_ptr, s_qg, s_qn, ncols, rb_ptr, rj_ptr, cuq_ptr, info_ptr, B, total_q,
                       T, slots_ptr, nsplit, CAP: tl.constexpr, E: tl.constexpr):
    """Insert block j of row r into the slot set of every token listed in the row. Grid (T, Hkv, nsplit).

    Only tokens that request ``b`` owns (``info[1:3, b]``, see ``_rowinfo_kernel``) are inserted; for a
    non-decreasing ``cu_seqlens_q`` that is every ``t = cu_q[b] + i`` with ``0 <= i < Lq_b`` and
    ``0 <= t < total_q``.
    """
    r = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    b = tl.load(rb_ptr + r)
    j = tl.load(rj_ptr + r)
    if b >= 0:
        rbase = rp_ptr + g.to(tl.int64) * s_rg
        p0 = tl.load(rbase + r.to(tl.int64) * s_rr)
        p1 = tl.load(rbase + (r + 1).to(tl.int64) * s_rr)
        p0 = tl.minimum(tl.maximum(p0, 0), ncols)
        p1 = tl.minimum(tl.maximum(p1, 0), ncols)
        qs = tl.load(cuq_ptr + b)
        own_lo = tl.load(info_ptr + (B + 1) + b)
        own_hi = tl.load(info_ptr + 2 * (B + 1) + b)
        jv = tl.zeros([E], tl.int32) + j
        neg1 = tl.full([E], -1, tl.int32)
        neg2 = tl.full([E], -2, tl.int32)
        for n0 in range(p0 + sp * E, p1, nsplit * E):
            n = n0 + tl.arange(0, E)
            m = n < p1
            i = tl.load(qi_ptr + g.to(tl.int64) * s_qg + n.to(tl.int64) * s_qn, mask=m, other=-1)
            t = qs + i  # int32: a wrapped sum is negative, so it fails t >= own_lo >= 0
            act = m & (i >= 0) & (t >= own_lo) & (t < own_hi)
            base = slots_ptr + (g.to(tl.int64) * total_q + tl.where(act, t, 0)) * CAP
            k = p0 * 0
            while (tl.max(act.to(tl.int32), axis=0) > 0) & (k < CAP):
                # inactive lanes compare against -2 (never stored): a harmless read of a valid slot
                addr = base + ((j + k) & (CAP - 1))
                old = tl.atomic_cas(addr, tl.where(act, neg1, neg2), jv, sem="relaxed")
                act = act & (old != -1) & (old != j)
                k += 1



# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _chunk_tokens(tk: int, hkv: int, total_q: int, t_rows: int) -> int:
    """Tokens per builder chunk: ``INTERPRETER_CHUNK_ENTRIES // tk`` under the interpreter, else
    ``tuning.override(csr_chunk_entries=...)`` or ``DEFAULT_CHUNK_ENTRIES`` divided by ``tk``."""
    if interpreter_active():
        return max(1, INTERPRETER_CHUNK_ENTRIES // tk)
    entries = tuning.current().csr_chunk_entries or DEFAULT_CHUNK_ENTRIES
    c = max(1, entries // tk)
    # keep the chunk histogram (Hkv x chunks x T int32) bounded; bigger chunks sort more in registers
    while c * tk < 8192 and hkv * triton.cdiv(total_q, c) * t_rows > (1 << 25):
        c *= 2
    return c


_HIST_MAX_BINS = 1024  # tl.histogram keeps NB/32 bins per thread in registers


def build_triton(q2k, cu_q, cu_k, total_rows: int, max_kvb: int):
    hkv, total_q, topk = q2k.shape
    batch = cu_q.shape[0] - 1
    dev = q2k.device
    T = total_rows
    ncols = total_q * topk
    if hkv == 0 or total_q == 0 or batch == 0 or T == 0:
        return (torch.zeros((hkv, T + 1), dtype=torch.int32, device=dev),
                torch.full((hkv, ncols), -1, dtype=torch.int32, device=dev))
    # every column of both outputs is written by the kernels (row_ptr by the row scan, q_idx by the
    # scatter: entries fill [0, nnz), each chunk fills its share of the -1 tail), so no memsets
    row_ptr = torch.empty((hkv, T + 1), dtype=torch.int32, device=dev)
    q_idx = torch.empty((hkv, ncols), dtype=torch.int32, device=dev)
    cu_q = cu_q.contiguous()
    cu_k = cu_k.contiguous()
    tk = triton.next_power_of_2(topk)
    C = _chunk_tokens(tk, hkv, total_q, T)
    nch = triton.cdiv(total_q, C)
    niter = bsearch_iters(batch)
    nb = max(64, triton.next_power_of_2(T))
    if nb > _HIST_MAX_BINS:
        nb = 0
    cnt = (torch.empty if nb else torch.zeros)((hkv, nch, T), dtype=torch.int32, device=dev)
    tot = torch.empty((hkv, T), dtype=torch.int32, device=dev)
    sg, st, ss = q2k.stride()
    nw = 8 if C * tk >= 2048 else 4
    _csr_count_kernel[(hkv, nch)](q2k, sg, st, ss, cu_q, cu_k, cnt, total_q, topk, batch, niter, T, max_kvb, nch,
                                  C=C, TK=tk, NB=nb, num_warps=nw)
    BR = min(64, triton.next_power_of_2(T))
    NCB = max(1, min(triton.next_power_of_2(nch), 4096 // BR))
    _csr_scan_chunks_kernel[(hkv, triton.cdiv(T, BR))](cnt, tot, nch, T, NCB=NCB, BR=BR, num_warps=4)
    _csr_rowptr_kernel[(hkv,)](tot, row_ptr, T, BR=min(1024, triton.next_power_of_2(T)), num_warps=4)
    logn = (C * tk).bit_length() - 1
    key64 = T >= (1 << (31 - logn)) - 1
    _csr_scatter_kernel[(hkv, nch)](q2k, sg, st, ss, cu_q, cu_k, cnt, row_ptr, q_idx, total_q, topk, batch, niter, T,
                                    max_kvb, nch, ncols, C=C, TK=tk, LOGN=logn, KEY64=key64, num_warps=nw)
    return row_ptr, q_idx


def _find_request_torch(cuq: torch.Tensor, t: torch.Tensor, batch: int) -> torch.Tensor:
    """``_find_request`` step for step (same probes, same answer for every ``cu_seqlens_q``, monotone or not;
    ``torch.searchsorted`` is only defined for sorted input)."""
    lo = torch.zeros_like(t)
    hi = torch.full_like(t, batch)
    for _ in range(bsearch_iters(batch)):
        act = lo < hi
        mid = (lo + hi + 1) // 2
        ok = cuq[mid] <= t
        lo = torch.where(act & ok, mid, lo)
        hi = torch.where(act & ~ok, mid - 1, hi)
    return lo


def build_torch(q2k, cu_q, cu_k, total_rows: int, max_kvb: int):
    """Pure-PyTorch path (CPU; reads the lengths on the host). Same output as the Triton path."""
    hkv, total_q, topk = q2k.shape
    dev = q2k.device
    T = total_rows
    ncols = total_q * topk
    row_ptr = torch.zeros((hkv, T + 1), dtype=torch.int32, device=dev)
    q_idx = torch.full((hkv, ncols), -1, dtype=torch.int32, device=dev)
    batch = cu_q.shape[0] - 1
    if hkv == 0 or total_q == 0 or batch == 0 or T == 0:
        return row_ptr, q_idx
    cuq = cu_q.to(torch.int64)
    cuk = cu_k.to(torch.int64)
    lk = (cuk[1:] - cuk[:-1]).clamp_min(0)
    R = (lk + KV_BLOCK - 1) // KV_BLOCK  # [B]
    levels = int(min(int(R.max()), max_kvb, T))
    # level-major row map: rowmap[b, j] for j < levels
    if levels > 0:
        present = R.view(1, -1) > torch.arange(levels, device=dev).view(-1, 1)  # [levels, B]
        flat = present.reshape(-1).to(torch.int64)
        rowmap = (torch.cumsum(flat, 0) - 1).view(levels, batch).t().contiguous()  # [B, levels]
    else:
        rowmap = torch.zeros((batch, 1), dtype=torch.int64, device=dev)
    t = torch.arange(total_q, device=dev)
    b = _find_request_torch(cuq, t, batch)
    bc = b.clamp(max=batch - 1)
    tok_ok = (b < batch) & (cuq[bc] <= t) & (t < cuq[bc + 1])
    i = t - cuq[bc]
    ids = q2k.to(torch.int64)  # [Hkv, total_q, topk]
    valid = tok_ok.view(1, -1, 1) & (ids >= 0) & (ids < R[bc].view(1, -1, 1)) & (ids < levels)
    jj = torch.where(valid, ids, torch.zeros_like(ids))
    row = rowmap[bc.view(1, -1, 1).expand_as(jj), jj]
    valid &= row < T
    key = torch.where(valid, row, torch.full_like(row, T)).reshape(hkv, ncols)
    skey, perm = torch.sort(key, dim=1, stable=True)
    ival = i.view(1, -1, 1).expand(hkv, total_q, topk).reshape(hkv, ncols)
    vals = torch.gather(ival, 1, perm)
    q_idx = torch.where(skey < T, vals, torch.full_like(vals, -1)).to(torch.int32)
    bounds = torch.arange(T + 1, device=dev).view(1, -1).expand(hkv, T + 1).contiguous()
    row_ptr = torch.searchsorted(skey.contiguous(), bounds).to(torch.int32)
    return row_ptr, q_idx



# ----------------------------------------------------------------------------------------------

def slot_capacity(topk: int) -> int:
    """Slots per (g, token) of the inverted table: ``next_pow2(2 * topK)`` (load factor <= 1/2)."""
    return triton.next_power_of_2(max(2, 2 * int(topk)))


def invert_csr_slots(row_ptr, q_idx, cu_q, cu_k, total_q: int, cap: int):
    """Device-side CSR -> slot sets ``int32 [Hkv, total_q, cap]`` (-1 = empty; unordered, deduplicated).

    Row map from ``cu_k`` (level-major, 128-token blocks); ``T = row_ptr.shape[1] - 1``. Returns
    ``(slots, info)``: ``info`` int32 ``[3, B + 1]`` holds the query-row windows and owned rows of every
    request (``_rowinfo_kernel``; ``None`` when ``B == 0`` or ``total_q == 0``). Only owned tokens get slots.
    """
    hkv = row_ptr.shape[0]
    T = row_ptr.shape[1] - 1
    batch = cu_q.shape[0] - 1
    dev = row_ptr.device
    slots = torch.full((hkv, total_q, cap), -1, dtype=torch.int32, device=dev)
    if total_q == 0 or batch == 0:
        return slots, None
    cu_q = cu_q.contiguous()
    cu_k = cu_k.contiguous()
    # one allocation, one fill: rinfo rows (b, j) per CSR row (-1 = none), then info [3, B + 1] (written whole)
    buf = torch.full((2 * T + 3 * (batch + 1),), -1, dtype=torch.int32, device=dev)
    rb, rj, info = buf[:T], buf[T:2 * T], buf[2 * T:]
    BJ = 64
    _rowinfo_kernel[(batch, max(1, triton.cdiv(T, BJ)))](cu_k, batch, T, rb, rj, cu_q, total_q, bsearch_iters(batch), info,
                                                          BJ=BJ, num_warps=2)
    info = info.view(3, batch + 1)
    if hkv == 0 or T == 0 or q_idx.shape[1] == 0:
        return slots, info
    ncols = q_idx.shape[1]
    E = 256
    # split long rows over several programs (hot rows such as block 0 hold ~total_q entries)
    nsplit = max(1, min(16, triton.cdiv(ncols, max(T, 1) * E)))
    _csr_invert_kernel[(T, hkv, nsplit)](row_ptr, row_ptr.stride(0), row_ptr.stride(1), q_idx, q_idx.stride(0),
                                         q_idx.stride(1), ncols, rb, rj, cu_q, info, batch, total_q, T, slots,
                                         nsplit, CAP=cap, E=E, num_warps=4)
    return slots, info



# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions (scripts/aot_check.py; see _aot.py)
# ----------------------------------------------------------------------------------------------

def aot_configs(arch: int, full: bool = False):
    """Launch configurations of the CSR builder / inverter kernels (same on every architecture).

    Derived from ``_build_triton`` / ``_chunk_tokens`` / ``invert_csr_slots``: chunk entries ``C*TK`` in
    1024..8192 (default 1024, doubled to bound the histogram), ``TK = next_pow2(topK)`` (topK 1..64),
    histogram bins ``NB`` 0 (atomics) or 64..1024, 32/64-bit sort keys, scan tiles ``BR x NCB <= 4096``,
    slot capacity ``CAP`` 2..128. CI subset: the extremes of each axis.
    """
    from ._aot import AotConfig, dedupe

    out = []
    p2 = [1 << i for i in range(13)]
    tks = (1, 2, 4, 8, 16, 32, 64) if full else (16, 64)
    entries = (1024, 2048, 4096, 8192) if full else (1024, 8192)
    common = dict(q2k_ptr="*i32", s_g="i32:D", s_t="i32:D", s_s=1, cuq_ptr="*i32", cuk_ptr="*i32", cnt_ptr="*i32",
                  total_q="i32", topk="i32", B="i32", niter="i32", T="i32", max_kvb="i32", nch="i32")
    for tk in tks:
        for e in entries:
            C = e // tk
            nw = 8 if e >= 2048 else 4
            for nb in ((0, 64, 128, 256, 512, 1024) if full else ((0, 1024) if e == 1024 else (1024,))):
                out.append(AotConfig(_csr_count_kernel, dict(common, C=C, TK=tk, NB=nb), nw, 3,
                                     f"count C{C} TK{tk} NB{nb}"))
            logn = e.bit_length() - 1
            for key64 in ((False, True) if full else ((e == 8192),)):
                out.append(AotConfig(_csr_scatter_kernel, dict(common, rp_ptr="*i32", out_ptr="*i32", ncols="i32",
                                                               C=C, TK=tk, LOGN=logn, KEY64=key64), nw, 3,
                                     f"scatter C{C} TK{tk} key{64 if key64 else 32}"))
    scan = [(br, ncb) for br in p2[:7] for ncb in p2 if br * ncb <= 4096] if full else [(64, 64), (1, 4096), (64, 1)]
    for br, ncb in scan:
        out.append(AotConfig(_csr_scan_chunks_kernel, dict(cnt_ptr="*i32", tot_ptr="*i32", nch="i32", T="i32",
                                                           NCB=ncb, BR=br), 4, 3, f"scan BR{br} NCB{ncb}"))
    for br in (p2[:11] if full else (1, 1024)):
        out.append(AotConfig(_csr_rowptr_kernel, dict(tot_ptr="*i32", rp_ptr="*i32", T="i32", BR=br), 4, 3,
                             f"rowptr BR{br}"))
    out.append(AotConfig(_rowinfo_kernel, dict(cuk_ptr="*i32", B="i32", T="i32", rb_ptr="*i32", rj_ptr="*i32",
                                               cuq_ptr="*i32", total_q="i32", niter="i32", info_ptr="*i32", BJ=64),
                         2, 3, "rowinfo BJ64"))
    for cap in (sorted({slot_capacity(t) for t in range(1, 65)}) if full else (2, 128)):
        out.append(AotConfig(_csr_invert_kernel, dict(rp_ptr="*i32", s_rg="i32:D", s_rr=1, qi_ptr="*i32", s_qg="i32:D",
                                                      s_qn=1, ncols="i32", rb_ptr="*i32", rj_ptr="*i32", cuq_ptr="*i32",
                                                      info_ptr="*i32", B="i32", total_q="i32", T="i32",
                                                      slots_ptr="*i32", nsplit="i32", CAP=cap, E=256),
                             4, 3, f"invert CAP{cap} E256"))
    return dedupe(out)
