#!/usr/bin/env python3
"""MiniMax-M3 sparse-attention pipeline, its float64 checks, and the long-context validation rows.

Shared by ``scripts/demo.py`` (the main job) and ``scripts/validation_report.py``. Standalone:
``python scripts/long_context.py [--lengths 65536,131072,1048576] [--chunk 512]`` prints the rows.

The pipeline (M3 shape: Hq 64, Hkv 4, D 128, 128-token blocks, top-16; indexer with 4 index-Q heads,
one per KV group, and one shared index-K head of dim 128), over one paged HND KV cache with a
shuffled page table:

* decode (one query per request, B requests):
  ``flash_decode_with_topk_idx`` (block-max scores over the token-major index-K cache, local block
  forced) -> ``topk_idx [4, B, 16]`` -> ``sparse_decode_atten_func`` (paged, LSE);
* prefill chunk (the last ``T`` tokens of request 0, causal against its whole KV length ``L``):
  ``quantize_bf16_to_nvfp4_128x4`` (index q; the index-K cache is stored NVFP4) ->
  ``fp4_indexer_block_scores`` (causal, ``[4, NB, T]``) -> ``native_topk_from_scores``
  (``force_local_blocks=1``) -> ``build_k2q_csr`` -> ``sparse_atten_func`` (paged, causal, LSE).

Checks (each against a float64 reference written here or in ``msa.testing``):

* block scores: float64 on the exact inputs (bf16 index K; dequantised FP4 values), atol 0.1 /
  rtol 0.01 on finite entries, the -inf pattern exact (API.md §3.5);
* selection: exact equality with an independent top-k of the *kernel's* scores (§6.3, §11.3);
* CSR: exact equality with ``msa.testing.build_k2q_csr_ref`` (§5.3);
* attention: ``msa.testing.attention_ref`` in float64 over the tokens of the selected blocks
  only (per KV group and chunk of query rows, so memory stays bounded at 1M tokens). Gates:
  ours cos >= 0.9999, max-abs <= 1e-2, LSE atol = rtol = 1e-3; peer cos >= 0.999, max-abs <= 5e-2.
"""

import argparse
import math
import os
import pathlib
import sys
import time
from types import SimpleNamespace

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
REPO_ID = "flashrt/MiniMaxAI-msa-blackwell"
# float64 references: the ``testing`` module of the package ``load_msa`` loaded (set there)
REFS = None

HQ, HKV, D, BS, TOPK = 64, 4, 128, 128, 16
HIDX = HKV  # M3: one index-Q head per KV group
G = HQ // HKV
SCALE = D ** -0.5
F8 = torch.float8_e4m3fn

PEER = dict(cos=0.999, atol=5e-2)
OURS = dict(cos=0.9999, atol=1e-2, lse=1e-3)
SCORE_TOL = dict(atol=0.1, rtol=0.01)

_T0 = time.perf_counter()


def log(msg: str):
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def load_msa():
    """The package as users load it (``kernels.get_kernel`` through ``LOCAL_KERNELS``); interpreter without a GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import warnings

        # the interpreter evaluates both sides of tl.where with numpy (e.g. 1/0 for all-zero NVFP4 blocks)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    os.environ.setdefault("LOCAL_KERNELS", f"{REPO_ID}={REPO}")
    from kernels import get_kernel

    global REFS
    msa = get_kernel(REPO_ID, version=1, trust_remote_code=True)
    REFS = msa.testing
    return msa


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# metrics and gates
# --------------------------------------------------------------------------------------------------

def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().flatten()
    b = b.double().flatten().to(a.device)
    na, nb = a.norm(), b.norm()
    if float(na) == 0.0 and float(nb) == 0.0:
        return 1.0
    return float((a @ b) / (na * nb).clamp_min(1e-300))


def attn_metrics(out, ref, lse=None, lse_ref=None) -> dict:
    """Output (any float dtype) vs float64 reference; optional LSE. Both gates evaluated."""
    o = out.double()
    r = ref.double().to(o.device)
    finite = bool(torch.isfinite(o).all())
    err = float((o - r).abs().max()) if o.numel() else 0.0
    cos = cosine(o, r)
    lse_err, lse_ok = None, True
    if lse is not None:
        a = lse.double()
        b = lse_ref.double().to(a.device)
        pattern = torch.equal(torch.isneginf(a), torch.isneginf(b))
        fin = ~torch.isneginf(b)
        d = (a[fin] - b[fin]).abs()
        lse_err = float(d.max()) if d.numel() else 0.0
        tol = OURS["lse"]
        lse_ok = pattern and bool(torch.isfinite(a[fin]).all()) and bool((d <= tol + tol * b[fin].abs()).all())
    peer = finite and cos >= PEER["cos"] and err <= PEER["atol"]
    ours = finite and cos >= OURS["cos"] and err <= OURS["atol"] and lse_ok
    return dict(cos=cos, max_abs=err, lse_err=lse_err, peer=peer, ours=ours)


def score_metrics(out, ref) -> dict:
    """fp32 block scores vs float64: -inf pattern exact, finite entries atol 0.1 / rtol 0.01 (ours);
    peer column: cosine >= 0.999 over the finite entries with the same -inf pattern."""
    a = out.double()
    b = ref.double().to(a.device)
    pattern = torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(b)
    af, bf = a[fin], b[fin]
    finite = bool(torch.isfinite(af).all())
    d = (af - bf).abs()
    err = float(d.max()) if d.numel() else 0.0
    cos = cosine(af, bf) if af.numel() else 1.0
    within = bool((d <= SCORE_TOL["atol"] + SCORE_TOL["rtol"] * bf.abs()).all())
    return dict(cos=cos, max_abs=err, lse_err=None, peer=pattern and finite and cos >= PEER["cos"],
                ours=pattern and finite and within,
                note=f"max rel {float((d / bf.abs().clamp_min(1e-30)).max()) if d.numel() else 0.0:.1e}")


def exact_metrics(mismatches: int, total: int) -> dict:
    ok = mismatches == 0
    return dict(cos=None, max_abs=None, lse_err=None, peer=ok, ours=ok, note=f"{mismatches}/{total} differ")


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------

def topk_ref(score: torch.Tensor, seq_lens: torch.Tensor, block_size: int, topk: int, force: int = 0) -> torch.Tensor:
    """Exact §6.3 / §11.3 selection on the given fp32 scores ``[H, R, NB]`` (``seq_lens [R]``).

    Forced blocks ``[n - force, n)`` first (ascending id), then candidates (``j < n``, score not -inf
    or NaN) by score descending with ties toward the lower id, then -1. Runs on the scores' device (two
    stable sorts); returns int32 ``[H, R, topk]`` on the CPU.
    """
    s = score.detach().float()
    dev = s.device
    H, R, NB = s.shape
    n = ((seq_lens.detach().to(dev).long().clamp(min=0) + block_size - 1) // block_size).clamp(max=NB)
    j = torch.arange(NB, device=dev)
    in_range = j.view(1, NB) < n.view(R, 1)
    forced = (in_range & (j.view(1, NB) >= (n - force).view(R, 1))) if force > 0 else torch.zeros_like(in_range)
    forced = forced.unsqueeze(0).expand(H, R, NB)
    cand = in_range.unsqueeze(0) & ~torch.isnan(s) & ~torch.isneginf(s)
    cls = torch.where(forced, 0, torch.where(cand, 1, 2))
    key = torch.where(cls == 1, -s.double() + 0.0, torch.zeros((), dtype=torch.float64, device=dev))  # -0.0 ties +0.0
    o1 = torch.sort(key, dim=-1, stable=True).indices            # score desc, equal keys keep id order
    o2 = torch.sort(cls.gather(-1, o1), dim=-1, stable=True).indices
    order = o1.gather(-1, o2)
    keep = cls.gather(-1, order) < 2
    out = torch.where(keep, order, torch.full_like(order, -1))[..., :topk]
    if out.shape[-1] < topk:
        out = torch.cat([out, torch.full((H, R, topk - out.shape[-1]), -1, dtype=out.dtype, device=dev)], -1)
    return out.to(torch.int32).cpu()


def decode_scores_ref(qi, kidx, r2t, lens, nb_cols: int, scale: float, chunk_tokens: int = 1 << 17):
    """Float64 decode block scores ``[Hi, B, NB]`` (§11.2 "max"): ``max_{x in block j, x < L_b}
    scale * <qi[b, h], kidx[r2t[b, x], 0]>``; blocks at or past ``ceil(L_b / 128)`` are -inf."""
    dev = kidx.device
    B, Hi, _ = qi.shape
    out = torch.full((Hi, B, nb_cols), -math.inf, dtype=torch.float64, device=dev)
    for b in range(B):
        L = int(lens[b])
        qb = qi[b].double().to(dev)
        for x0 in range(0, L, chunk_tokens):
            x1 = min(L, x0 + chunk_tokens)
            slots = r2t[b, x0:x1].long().to(dev)
            z = scale * (qb @ kidx[slots, 0].double().T)  # [Hi, n]
            nb = -(-(x1 - x0) // BS)
            pad = nb * BS - (x1 - x0)
            if pad:
                z = torch.cat([z, torch.full((Hi, pad), -math.inf, dtype=z.dtype, device=dev)], 1)
            out[:, b, x0 // BS:x0 // BS + nb] = z.view(Hi, nb, BS).amax(-1)
    return out


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _swizzle_off(r: torch.Tensor, c: torch.Tensor, cols: int = 8) -> torch.Tensor:
    """API.md §5.6 128x4 offset of logical scale entry (r, c) (``C' = round_up(cols, 4)``)."""
    cq = (cols + 3) // 4
    return ((r // 128) * cq + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def fp4_rows_f64(packed: torch.Tensor, scale_flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dequantise NVFP4 rows in float64 without the global scale: ``packed [N, 64]`` bytes (low nibble =
    even element), ``scale_flat`` the swizzled E4M3 scale bytes, ``rows [N]`` logical row ids -> ``[N, 128]``."""
    dev = packed.device
    lut = torch.tensor(_E2M1, dtype=torch.float64, device=dev)
    p = packed.to(torch.int64)
    codes = torch.stack([p & 15, p >> 4], -1).reshape(p.shape[0], 128)
    off = _swizzle_off(rows.view(-1, 1).to(dev), torch.arange(8, device=dev).view(1, -1))
    sc = scale_flat.view(torch.uint8)[off].view(F8).to(torch.float32).double()  # E4M3 decoded by torch
    return lut[codes] * sc.repeat_interleave(16, dim=1)


def fp4_chunk_scores_ref(qd: torch.Tensor, T: int, k_data, k_scale_flat, pt_row, lk: int, nb_cols: int,
                         *, budget_bytes: int = 256 << 20, progress=None) -> torch.Tensor:
    """Float64 §11.4 causal scores ``[Hi, NB, T]`` for queries at positions ``lk - T .. lk - 1``.

    ``qd [Hi, T, 128]`` float64 dequantised index queries; ``k_data [P, 1, 128, 64]`` packed index keys
    with swizzled scale bytes ``k_scale_flat`` (logical row ``page * 128 + slot``); ``pt_row`` the
    request's page table. Chunked over KV blocks so the float64 temporaries stay under ``budget_bytes``.
    """
    dev = k_data.device
    Hi = qd.shape[0]
    nbk = -(-lk // BS)
    out = torch.full((Hi, nb_cols, T), -math.inf, dtype=torch.float64, device=dev)
    lim = torch.arange(T, device=dev) + (lk - T)  # causal limit per query
    nj = max(1, budget_bytes // (Hi * T * BS * 8 * 2))
    kflat = k_data.reshape(-1, 64)
    ar = torch.arange(BS, device=dev)
    n_chunks = -(-nbk // nj)
    for ci, j0 in enumerate(range(0, nbk, nj)):
        js = torch.arange(j0, min(nbk, j0 + nj), device=dev)
        pages = pt_row.to(dev).long()[js]
        rows = (pages.view(-1, 1) * BS + ar).reshape(-1)
        kd = fp4_rows_f64(kflat[rows], k_scale_flat, rows).view(js.numel(), BS, 128)
        s = torch.einsum("htd,jsd->htjs", qd, kd)  # [Hi, T, nj, 128]
        x = js.view(-1, 1) * BS + ar  # [nj, 128]
        vis = (x < lk).unsqueeze(0) & (x.unsqueeze(0) <= lim.view(-1, 1, 1))  # [T, nj, 128]
        s = s.masked_fill(~vis.unsqueeze(0), -math.inf)
        out[:, j0:j0 + js.numel(), :] = s.amax(-1).permute(0, 2, 1)
        if progress and n_chunks >= 8 and (ci + 1) % max(1, n_chunks // 4) == 0:
            progress(f"    fp4 score reference: {ci + 1}/{n_chunks} block chunks")
    return out


def attention_ref_selected(q, k, v, pt_row, lk: int, idx, lim=None, *, scale: float = SCALE,
                           budget_bytes: int = 512 << 20, progress=None):
    """``msa.testing.attention_ref`` (float64) restricted to the tokens of the selected blocks.

    One request: ``q [n, Hq, D]`` rows, paged ``k, v [P, Hkv, 128, D]``, ``pt_row [W]``, KV length ``lk``,
    ``idx [Hkv, n, topk]`` block ids (negative / past ``lk`` / past the table: ignored; duplicates once),
    ``lim [n]`` causal limits (token ``x`` visible iff ``x <= lim[i]``) or None.
    Per KV group and chunk of rows the union of the chunk's blocks is gathered and attention_ref runs on
    it with the per-row block mask, which is exactly §11.1 over the selected set.
    Returns (O float64 [n, Hq, D], LSE float64 [n, Hq]) on k's device.
    """
    dev = k.device
    n, hq, d = q.shape
    hkv = k.shape[1]
    g_sz = hq // hkv
    W = pt_row.numel()
    topk = idx.shape[2]
    pt = pt_row.to(dev).long()
    O = torch.zeros(n, hq, d, dtype=torch.float64, device=dev)
    LSE = torch.full((n, hq), -math.inf, dtype=torch.float64, device=dev)
    ar = torch.arange(BS, device=dev)
    # bytes per row chunk ~ (K + V expanded to the group's heads + logits) for up to m*topk blocks
    per_row = topk * BS * (2 * g_sz * d + 4 * g_sz) * 8
    rows = max(1, min(n, budget_bytes // max(1, per_row)))
    steps = hkv * (-(-n // rows))
    done = 0
    for g in range(hkv):
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            ids = idx[g, r0:r1].to(dev).long()
            ok = (ids >= 0) & (ids < W) & (ids * BS < lk)
            blocks = torch.unique(ids[ok])
            done += 1
            U = blocks.numel()
            if U == 0:
                continue
            pages = pt[blocks]
            kg = k[pages, g].reshape(U * BS, 1, d)
            vg = v[pages, g].reshape(U * BS, 1, d)
            x = (blocks.view(-1, 1) * BS + ar).reshape(-1)
            pos = torch.searchsorted(blocks, ids.clamp(min=0))
            sel = torch.zeros(r1 - r0, U + 1, dtype=torch.bool, device=dev)
            sel.scatter_(1, torch.where(ok, pos, torch.full_like(pos, U)), True)
            vis = sel[:, :U].repeat_interleave(BS, dim=1) & (x < lk).view(1, -1)
            if lim is not None:
                vis &= x.view(1, -1) <= lim[r0:r1].to(dev).view(-1, 1)
            o, lse, _ = REFS.attention_ref(q[r0:r1, g * g_sz:(g + 1) * g_sz].to(dev), kg, vg, vis.unsqueeze(0), scale)
            O[r0:r1, g * g_sz:(g + 1) * g_sz] = o
            LSE[r0:r1, g * g_sz:(g + 1) * g_sz] = lse
            if progress and steps >= 64 and done % (steps // 4) == 0:
                progress(f"    attention reference: {done}/{steps} (group, row-chunk) steps")
    return O, LSE


# --------------------------------------------------------------------------------------------------
# the case: KV cache, index-K cache, page table, queries
# --------------------------------------------------------------------------------------------------

def make_case(msa, *, ctx: int, batch: int, chunk: int, device, dtype, seed: int = 0, lens=None):
    """Paged KV ``[B * W, 4, 128, 128]`` with a shuffled page table, ragged lengths (request 0 = ctx),
    a token-major bf16 index-K cache ``[B * W * 128, 1, 128]`` (decode indexer) and its NVFP4 paged copy
    (prefill indexer; storage = the ``preordered_mma`` scale layout), plus the prefill chunk metadata.
    """
    torch.manual_seed(seed)
    W = -(-ctx // BS)
    P = batch * W
    c = SimpleNamespace(ctx=ctx, B=batch, W=W, P=P, device=torch.device(device), dtype=dtype)
    c.k = torch.randn(P, HKV, BS, D, device=device, dtype=dtype)
    c.v = torch.randn_like(c.k)
    c.page_table = torch.randperm(P, device=device).to(torch.int32).view(batch, W)
    c.lens = list(lens) if lens is not None else [ctx - (b * 37) % BS for b in range(batch)]
    c.lens[0] = ctx
    c.seqused_k = torch.tensor(c.lens, device=device, dtype=torch.int32)
    c.slot_ids = torch.arange(batch, device=device, dtype=torch.int32)
    c.max_len = max(c.lens)
    x = torch.arange(W * BS, device=device)
    c.r2t = (c.page_table.long()[:, x // BS] * BS + x % BS).to(torch.int32)  # [B, W*128]
    c.kidx = torch.randn(P * BS, 1, D, device=device, dtype=dtype)
    qk = msa.quantize_bf16_to_nvfp4_128x4(c.kidx.view(P, BS, 1, D).permute(0, 2, 1, 3))
    c.kidx_fp4 = qk.data  # [P, 1, 128, 64]
    c.kidx_scale_flat = qk.scale_128x4.reshape(-1)
    c.kidx_scale = qk.scale_128x4.view(P, 1, 2, 32, 4, 4).view(F8)  # preordered_mma (L = P*1, mn = 128)
    # prefill chunk: the last T tokens of request 0
    L = c.lens[0]
    c.T = T = min(chunk, L)
    c.L = L
    c.nbk = -(-L // BS)
    c.cu_q = torch.tensor([0, T], device=device, dtype=torch.int32)
    c.cu_k = torch.tensor([0, L], device=device, dtype=torch.int32)
    c.cu_p = torch.tensor([0, c.nbk], device=device, dtype=torch.int32)
    c.kv_indices = c.page_table[0, :c.nbk].contiguous()
    c.row_lens = torch.arange(L - T + 1, L + 1, device=device, dtype=torch.int32)  # p_t + 1 per chunk row
    c.t_pad = -(-T // 128) * 128
    return c


def make_queries(c, seed: int):
    """One input set: decode q / index q and prefill-chunk q / index q (bf16 on GPU, fp16 on CPU)."""
    gen = torch.Generator(device=c.device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device=c.device, dtype=torch.float32, generator=gen).to(c.dtype)

    s = SimpleNamespace(q_dec=rnd(c.B, HQ, D), qi_dec=rnd(c.B, HIDX, D), q_pre=rnd(c.T, HQ, D))
    # index q of the chunk, head-major and zero-padded to a multiple of 128 rows, so the quantiser's
    # swizzled scales are the preordered_mma layout (L = head, mn = token) the FP4 indexer reads
    s.qi_pre_pad = torch.zeros(HIDX, c.t_pad, D, device=c.device, dtype=c.dtype)
    s.qi_pre_pad[:, :c.T] = rnd(HIDX, c.T, D)
    return s


# --------------------------------------------------------------------------------------------------
# pipeline stages (the public API calls; each returns what the next stage needs)
# --------------------------------------------------------------------------------------------------

def decode_indexer(msa, c, qi):
    """flash_decode_with_topk_idx (M3: init 0, local 1, max scores, no index value) -> int32 [4, B, 16]."""
    return msa.flash_decode_with_topk_idx(qi, None, c.kidx, None, c.r2t, c.seqused_k, c.max_len, c.slot_ids, BS, TOPK,
                                          0, 1, disable_index_value=True)[1]


def decode_scores(msa, c, qi):
    """decode_block_scores: the block scores the decode indexer ranks (same arguments) -> fp32 [4, B, NB]."""
    nb_cols = -(-min(c.max_len, c.r2t.shape[1]) // BS)
    return msa.decode_block_scores(qi, c.kidx, c.r2t, c.seqused_k, c.slot_ids, nb_cols, BS, sm_scale=SCALE)


def decode_attention(msa, c, q, idx):
    return msa.sparse_decode_atten_func(q, c.k, c.v, idx, page_table=c.page_table, seqused_k=c.seqused_k, seqlen_q=1,
                                        max_seqlen_k=c.max_len, blk_kv=BS, return_softmax_lse=True)


def quantize_index_q(msa, qi_pad):
    return msa.quantize_bf16_to_nvfp4_128x4(qi_pad)


def index_q_args(c, qq):
    """(q_fp4 [T, 4, 64] strided view, q_scale preordered (4, T'/128, 2, 32, 4, 4) e4m3)."""
    return qq.data[:, :c.T].permute(1, 0, 2), qq.scale_128x4.view(HIDX, c.t_pad // 128, 2, 32, 4, 4).view(F8)


def prefill_scores(msa, c, q_fp4, q_scale):
    return msa.fp4_indexer_block_scores(q_fp4, c.kidx_fp4, q_scale, c.kidx_scale, c.cu_q, c.cu_k, c.cu_p,
                                        max_seqlen_q=c.T, max_seqlen_k=c.L, kv_indices=c.kv_indices,
                                        fp4_format="nvfp4", causal=True)


def prefill_topk(msa, c, scores):
    """[4, NB, T] -> [4, T, NB] view -> top-16 with the local block (p_t // 128) forced -> int32 [4, T, 16]."""
    return msa.native_topk_from_scores(scores.permute(0, 2, 1), c.row_lens, BS, TOPK, force_local_blocks=1)


def prefill_csr(msa, c, q2k):
    return msa.build_k2q_csr(q2k, c.cu_q, c.cu_k, BS, total_k=c.L, max_seqlen_k=c.L, max_seqlen_q=c.T)


def prefill_attention(msa, c, q, rp, qi):
    return msa.sparse_atten_func(q, c.k, c.v, rp, qi, TOPK, cu_seqlens_q=c.cu_q, cu_seqlens_k=c.cu_k,
                                 max_seqlen_q=c.T, max_seqlen_k=c.L, blk_kv=BS, causal=True,
                                 page_table=c.page_table[:1], seqused_k=c.seqused_k[:1], return_softmax_lse=True)


def run_pipeline(msa, c, s):
    """All stages on input set ``s``; returns a namespace of every intermediate."""
    r = SimpleNamespace()
    r.idx_dec = decode_indexer(msa, c, s.qi_dec)
    r.out_dec, r.lse_dec = decode_attention(msa, c, s.q_dec, r.idx_dec)
    r.qq = quantize_index_q(msa, s.qi_pre_pad)
    r.q_fp4, r.q_scale = index_q_args(c, r.qq)
    r.scores = prefill_scores(msa, c, r.q_fp4, r.q_scale)
    r.q2k = prefill_topk(msa, c, r.scores)
    r.rp, r.qi = prefill_csr(msa, c, r.q2k)
    r.out_pre, r.lse_pre = prefill_attention(msa, c, s.q_pre, r.rp, r.qi)
    return r


# --------------------------------------------------------------------------------------------------
# the checked pipeline (one input set): rows of (stage, check, metrics, seconds)
# --------------------------------------------------------------------------------------------------

def _timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def checked_pipeline(msa, c, s, *, progress=log, wrapper=False):
    """Run the pipeline on set ``s`` stage by stage, checking each against float64 / exact references.

    Returns (rows, r): rows are dicts {stage, op, shape, cos, max_abs, lse_err, peer, ours, note,
    call_s (wall seconds of the first, checked call), ref_s}; r holds the intermediates.
    """
    rows = []
    r = SimpleNamespace()
    B, L, T = c.B, c.L, c.T

    dt = str(c.dtype).replace("torch.", "")

    def add(stage, op, shape, metrics, call_s, ref_s, dtype=dt):
        row = dict(stage=stage, op=op, shape=shape, dtype=dtype, call_s=call_s, ref_s=ref_s, **metrics)
        rows.append(row)
        progress(f"  {op}: {'PASS' if row['ours'] else 'FAIL'} (ours), {'PASS' if row['peer'] else 'FAIL'} (peer)"
                 f"{_metric_text(row)}  [call {call_s:.2f} s, reference {ref_s:.2f} s]")

    # ---- decode -------------------------------------------------------------------------------
    progress(f"[decode 1/3] indexer flash_decode_with_topk_idx: B={B}, index-K cache of {c.max_len} tokens")
    r.idx_dec, t_call = _timed(lambda: decode_indexer(msa, c, s.qi_dec))
    sc_k = decode_scores(msa, c, s.qi_dec)
    (sc_ref, t_ref) = _timed(lambda: decode_scores_ref(s.qi_dec, c.kidx, c.r2t, c.lens, sc_k.shape[2], SCALE))
    add("decode", "decode indexer block scores", f"[{HIDX}, {B}, {sc_k.shape[2]}]", score_metrics(sc_k, sc_ref),
        t_call, t_ref)
    progress("[decode 2/3] top-k selection vs an exact reference on the kernel's scores")
    t0 = time.perf_counter()
    want = topk_ref(sc_k, c.seqused_k, BS, TOPK, force=1)
    got = r.idx_dec.cpu()
    add("decode", "decode top-k selection (local forced)", f"[{HIDX}, {B}, {TOPK}]",
        exact_metrics(int((got != want).any(-1).sum()), HIDX * B), 0.0, time.perf_counter() - t0, "int32")
    progress("[decode 3/3] sparse_decode_atten_func over the selected blocks (paged, shuffled pages)")
    (out, lse), t_call = _timed(lambda: decode_attention(msa, c, s.q_dec, r.idx_dec))
    r.out_dec, r.lse_dec = out, lse
    t0 = time.perf_counter()
    o_ref = torch.zeros(B, HQ, D, dtype=torch.float64, device=c.device)
    l_ref = torch.zeros(B, HQ, dtype=torch.float64, device=c.device)
    for b in range(B):
        o_ref[b:b + 1], l_ref[b:b + 1] = attention_ref_selected(
            s.q_dec[b:b + 1], c.k, c.v, c.page_table[b], c.lens[b], r.idx_dec[:, b:b + 1])
    sync()
    add("decode", "sparse_decode_atten_func", f"B={B} Hq={HQ} top-{TOPK}", attn_metrics(out, o_ref, lse, l_ref),
        t_call, time.perf_counter() - t0)
    if wrapper:
        w = msa.SparseDecodePagedAttentionWrapper(blk_kv=BS)
        w.plan(page_table=c.page_table, seqused_k=c.seqused_k, seqlen_q=1, max_seqlen_k=c.max_len,
               q2k_indices=r.idx_dec, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D)
        (out_w, t_call) = _timed(lambda: w.run(s.q_dec, c.k, c.v))
        same = torch.equal(out_w, out)
        add("decode", "wrapper.run == functional (bitwise)", f"B={B}", exact_metrics(0 if same else 1, 1), t_call, 0.0)

    # ---- prefill chunk ------------------------------------------------------------------------
    progress(f"[prefill 1/5] quantise the index q to NVFP4, fp4_indexer_block_scores: T={T} queries at the end "
             f"of {L} tokens (causal)")
    r.qq, t_q = _timed(lambda: quantize_index_q(msa, s.qi_pre_pad))
    r.q_fp4, r.q_scale = index_q_args(c, r.qq)
    r.scores, t_call = _timed(lambda: prefill_scores(msa, c, r.q_fp4, r.q_scale))
    t0 = time.perf_counter()
    qd = fp4_rows_f64(r.qq.data.reshape(-1, 64), r.qq.scale_128x4.reshape(-1),
                      torch.arange(HIDX * c.t_pad, device=c.device)).view(HIDX, c.t_pad, 128)[:, :T]
    sc_ref = fp4_chunk_scores_ref(qd, T, c.kidx_fp4, c.kidx_scale_flat, c.page_table[0], L, r.scores.shape[1],
                                  progress=progress)
    sync()
    add("prefill", "fp4_indexer_block_scores (nvfp4, causal)", f"[{HIDX}, {r.scores.shape[1]}, {T}]",
        score_metrics(r.scores, sc_ref), t_q + t_call, time.perf_counter() - t0, "nvfp4")
    del sc_ref, qd
    progress("[prefill 2/5] native_topk_from_scores (local block forced) vs an exact reference on the kernel's scores")
    r.q2k, t_call = _timed(lambda: prefill_topk(msa, c, r.scores))
    t0 = time.perf_counter()
    want = topk_ref(r.scores.permute(0, 2, 1), c.row_lens, BS, TOPK, force=1)
    add("prefill", "native_topk_from_scores (local forced)", f"[{HIDX}, {T}, {r.scores.shape[1]}] -> top-{TOPK}",
        exact_metrics(int((r.q2k.cpu() != want).any(-1).sum()), HIDX * T), t_call, time.perf_counter() - t0, "fp32")
    progress("[prefill 3/5] build_k2q_csr vs msa.testing.build_k2q_csr_ref")
    (rp, qi), t_call = _timed(lambda: prefill_csr(msa, c, r.q2k))
    r.rp, r.qi = rp, qi
    t0 = time.perf_counter()
    rp_ref, qi_ref = REFS.build_k2q_csr_ref(r.q2k.cpu(), [0, T], [0, L], total_rows=rp.shape[1] - 1,
                                       max_kv_blocks=-(-max(L, BS) // BS))
    bad = int((rp.cpu() != rp_ref).sum()) + int((qi.cpu() != qi_ref).sum())
    add("prefill", "build_k2q_csr", f"rows {rp.shape[1] - 1}, entries {qi.shape[1]}",
        exact_metrics(bad, rp.numel() + qi.numel()), t_call, time.perf_counter() - t0, "int32")
    progress("[prefill 4/5] sparse_atten_func (paged, causal) over the CSR")
    (out, lse), t_call = _timed(lambda: prefill_attention(msa, c, s.q_pre, rp, qi))
    r.out_pre, r.lse_pre = out, lse
    progress("[prefill 5/5] float64 attention_ref over each query's selected blocks")
    t0 = time.perf_counter()
    lim = torch.arange(L - T, L, device=c.device)
    o_ref, l_ref = attention_ref_selected(s.q_pre, c.k, c.v, c.page_table[0], L, r.q2k, lim, progress=progress)
    sync()
    add("prefill", "sparse_atten_func (prefill chunk)", f"T={T} Lk={L} Hq={HQ} top-{TOPK}",
        attn_metrics(out, o_ref, lse, l_ref), t_call, time.perf_counter() - t0)
    return rows, r


def _metric_text(row):
    parts = []
    if row.get("cos") is not None:
        parts.append(f"cos {row['cos']:.6f}")
    if row.get("max_abs") is not None:
        parts.append(f"max-abs {row['max_abs']:.2e}")
    if row.get("lse_err") is not None:
        parts.append(f"LSE {row['lse_err']:.1e}")
    if row.get("note"):
        parts.append(row["note"])
    return (": " + ", ".join(parts)) if parts else ""


# --------------------------------------------------------------------------------------------------
# byte / FLOP model of each stage (for the roofline columns)
# --------------------------------------------------------------------------------------------------

def _block_tokens(ids: torch.Tensor, lk, lim=None) -> torch.Tensor:
    """Visible tokens of each distinct valid block id in ``ids [..., topk]`` -> [...] token counts."""
    ids = ids.long()
    big = 1 << 40
    srt = torch.sort(torch.where(ids < 0, torch.full_like(ids, big), ids), dim=-1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    lkv = torch.as_tensor(lk, device=ids.device).long()
    upper = lkv if lim is None else torch.minimum(lkv, lim.long() + 1)
    cnt = (upper.unsqueeze(-1) - BS * srt).clamp(0, BS) if torch.is_tensor(upper) and upper.dim() else \
        (upper - BS * srt).clamp(0, BS)
    return torch.where(first & (srt < big), cnt, torch.zeros_like(cnt)).sum(-1)


def stage_model(c, r, esize: int):
    """{stage: (bytes, flops)} for one input set (unique bytes a perfect kernel must move)."""
    B, T, L = c.B, c.T, c.L
    nb_dec = -(-min(c.max_len, c.r2t.shape[1]) // BS)
    sum_l = sum(c.lens)
    m = {}
    # decode indexer: index K (1 head) + req_to_token of every token, q, score matrix write + read, ids
    m["decode indexer"] = (sum_l * (D * esize + 4) + B * HIDX * D * esize + 2 * HIDX * B * nb_dec * 4
                           + HIDX * B * TOPK * 4, 2 * HIDX * sum_l * D)
    lens = c.seqused_k.view(1, B)
    tok = _block_tokens(r.idx_dec, lens)  # [4, B] selected tokens per (group, request)
    ids = r.idx_dec.long()
    srt = torch.sort(torch.where(ids < 0, torch.full_like(ids, 1 << 40), ids), -1).values
    distinct = ((srt < (1 << 40)) & torch.cat([torch.ones_like(srt[..., :1], dtype=torch.bool),
                                               srt[..., 1:] != srt[..., :-1]], -1)).sum()
    m["decode attention"] = (int(distinct) * BS * D * 2 * esize + 2 * B * HQ * D * esize + ids.numel() * 4,
                             4 * G * D * int(tok.sum()))
    n_in = HIDX * c.t_pad * D
    m["quantise index q"] = (n_in * esize + n_in // 2 + n_in // 16, 0)
    nb_s = r.scores.shape[1]
    vis_per_q = (torch.arange(L - T, L) + 1).clamp(max=L)
    m["fp4 indexer scores"] = (c.nbk * BS * (64 + 8) + T * HIDX * (64 + 8) + HIDX * nb_s * T * 4,
                               2 * HIDX * D * int(vis_per_q.sum()))
    m["top-k"] = (HIDX * T * nb_s * 4 + T * 4 + HIDX * T * TOPK * 4, 0)
    m["build_k2q_csr"] = (2 * HIDX * T * TOPK * 4 + r.rp.numel() * 4, 0)
    lim = torch.arange(L - T, L, device=r.q2k.device).view(1, T)
    tok_p = _block_tokens(r.q2k, L, lim)  # [4, T]
    ids = r.q2k.long()
    blocks_g = sum(int(torch.unique(ids[g][ids[g] >= 0]).numel()) for g in range(HKV))
    m["prefill attention"] = (blocks_g * BS * D * 2 * esize + 2 * T * HQ * D * esize + r.qi.numel() * 4,
                              4 * G * D * int(tok_p.sum()))
    return m


# --------------------------------------------------------------------------------------------------
# long-context rows (c)
# --------------------------------------------------------------------------------------------------

def _time_us(fn, gpu: bool, iters: int = 10):
    """Median µs of eager calls (CUDA events, after one warm call) on a GPU; wall µs of one call otherwise."""
    if not gpu:
        _, s = _timed(fn)
        return s * 1e6
    fn()
    torch.cuda.synchronize()
    return event_median_us(fn, iters)


def event_median_us(fn, iters: int) -> float:
    """Median µs of ``iters`` calls of ``fn``, each between two CUDA events (GPU only)."""
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def long_context_rows(msa, lengths, *, batch: int = 2, chunk: int = 512, device=None, dtype=None, progress=log,
                      iters: int = 10):
    """Rows at each KV length: the checked pipeline (decode B=``batch`` with lengths L and L-77; a causal
    prefill chunk of ``chunk`` queries at the end of request 0) plus an adversarial 2-request CSR, with
    the median eager time of each op. Returns a list of row dicts (``length`` set)."""
    gpu = torch.cuda.is_available()
    device = device or ("cuda" if gpu else "cpu")
    dtype = dtype or (torch.bfloat16 if gpu else torch.float16)
    out_rows = []
    for L in lengths:
        progress(f"== long context {L} tokens: B={batch} decode, prefill chunk {min(chunk, L)}, {dtype} ==")
        c = make_case(msa, ctx=L, batch=batch, chunk=chunk, device=device, dtype=dtype, seed=L % 9973,
                      lens=[L] + [L - 77 * b for b in range(1, batch)])
        s = make_queries(c, seed=1)
        rows, r = checked_pipeline(msa, c, s, progress=progress)
        progress("  timing each op (median of eager calls, CUDA events)")
        times = {
            "decode indexer block scores": lambda: decode_indexer(msa, c, s.qi_dec),
            "sparse_decode_atten_func": lambda: decode_attention(msa, c, s.q_dec, r.idx_dec),
            "fp4_indexer_block_scores (nvfp4, causal)": lambda: prefill_scores(msa, c, r.q_fp4, r.q_scale),
            "native_topk_from_scores (local forced)": lambda: prefill_topk(msa, c, r.scores),
            "build_k2q_csr": lambda: prefill_csr(msa, c, r.q2k),
            "sparse_atten_func (prefill chunk)": lambda: prefill_attention(msa, c, s.q_pre, r.rp, r.qi),
        }
        for row in rows:
            fn = times.get(row["op"])
            row["us"] = (_time_us(fn, gpu, iters) if gpu else row["call_s"] * 1e6) if fn else None
            if row["op"] == "decode top-k selection (local forced)":
                row["note"] += " (timed inside the indexer)"
        rows.append(_csr_adversarial_row(msa, c, gpu, iters))
        for row in rows:
            row["length"] = L
        out_rows += rows
        del c, s, r, times
        if gpu:
            torch.cuda.empty_cache()
    return out_rows


def _csr_adversarial_row(msa, c, gpu, iters):
    """build_k2q_csr on 2 requests (chunk at the end of L, and 300 queries at the end of L - 77) with
    adversarial ids (-1 anywhere, past the request, duplicates), exact vs build_k2q_csr_ref."""
    L = c.L
    L2 = max(1, L - 77)
    T1, T2 = c.T, min(300, L2) if gpu else min(24, L2)
    gen = torch.Generator().manual_seed(7)
    nb1, nb2 = -(-L // BS), -(-L2 // BS)
    q2k = torch.cat([torch.randint(-2, nb1 + 3, (HKV, T1, TOPK), generator=gen),
                     torch.randint(-2, nb2 + 3, (HKV, T2, TOPK), generator=gen)], 1).to(torch.int32)
    cu_q = [0, T1, T1 + T2]
    cu_k = [0, L, L + L2]
    dev = c.device
    args = (q2k.to(dev), torch.tensor(cu_q, dtype=torch.int32, device=dev), torch.tensor(cu_k, dtype=torch.int32,
                                                                                           device=dev))
    fn = lambda: msa.build_k2q_csr(*args, BS, total_k=L + L2, max_seqlen_k=L, max_seqlen_q=max(T1, T2))  # noqa: E731
    (rp, qi), t_call = _timed(fn)
    t0 = time.perf_counter()
    rp_ref, qi_ref = REFS.build_k2q_csr_ref(q2k, cu_q, cu_k, total_rows=rp.shape[1] - 1, max_kv_blocks=-(-max(L, BS) // BS))
    bad = int((rp.cpu() != rp_ref).sum()) + int((qi.cpu() != qi_ref).sum())
    row = dict(stage="prefill", op="build_k2q_csr (2 requests, adversarial ids)", dtype="int32",
               shape=f"q ({T1}, {T2}), k ({L}, {L2})", call_s=t_call, ref_s=time.perf_counter() - t0,
               **exact_metrics(bad, rp.numel() + qi.numel()))
    row["us"] = _time_us(fn, gpu, iters) if gpu else t_call * 1e6
    log(f"  {row['op']}: {'PASS' if row['ours'] else 'FAIL'}{_metric_text(row)}")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description="Long-context validation rows (decode, prefill chunk, CSR)")
    gpu = torch.cuda.is_available()
    ap.add_argument("--lengths", default="65536,131072,1048576" if gpu else "4096")
    ap.add_argument("--chunk", type=int, default=512 if gpu else 16)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    msa = load_msa()
    rows = long_context_rows(msa, [int(x) for x in args.lengths.split(",") if x], batch=args.batch, chunk=args.chunk)
    bad = [r for r in rows if not r["ours"]]
    log(f"{len(rows) - len(bad)}/{len(rows)} rows pass our gate")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
