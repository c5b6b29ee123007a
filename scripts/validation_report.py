#!/usr/bin/env python3
"""Regenerate the VALIDATION.md tables on any GPU (CPU: tiny shapes through the Triton interpreter).

Sections (``--sections``, default all three):

* ``correctness``: fresh random inputs, float64 references from ``msa.testing`` (dense masks),
  one row per check: official decode (messy ids, MTP, dense path), the decode wrapper, the direct
  token-major decode (with sink), prefill dense and paged (varlen, causal, LSE), NVFP4-KV prefill, the
  FP4 indexer and the decode indexer (scores and selection), top-k from scores, and the CSR builder;
* ``long``: the long-context rows of ``scripts/long_context.py`` (default 65536, 131072 and 1M tokens):
  decode (indexer -> top-k -> attention), a causal prefill chunk at the end of the context (FP4 indexer ->
  top-k -> CSR -> attention) and an adversarial 2-request CSR, each with its median eager time;
* ``bench``: ``benchmarks/benchmark.py``'s runner, one call per section (``--bench-sections``), with each
  section's returned rows recorded (``--bench-mode quick`` by default, ``full`` for the full sweep).

Every row reports both gates: peer (cos >= 0.999, max-abs <= 5e-2) and ours (cos >= 0.9999,
max-abs <= 1e-2, LSE atol = rtol = 1e-3); score rows use atol 0.1 / rtol 0.01 with the -inf pattern
exact; selection and CSR rows are exact. Every row names card, date and commit (``git rev-parse --short
HEAD``, ``+dirty`` with uncommitted changes; env ``MSA_COMMIT`` overrides it, e.g. where there is no git).
The markdown is rewritten after every section to ``--out`` (default ``$OUT/validation_tables.md``, else
``./validation_tables.md``) and printed at the end.

Usage: python scripts/validation_report.py [--quick] [--out FILE] [--sections correctness,long,bench]
       [--lengths 65536,131072,1048576] [--chunk 512] [--bench-sections topk,decode,prefill] [--bench-mode quick]
"""

import argparse
import importlib
import math
import os
import pathlib
import subprocess
import sys
import time
import traceback

import torch

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import long_context as lc  # noqa: E402

BS, D = 128, 128


# --------------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------------

def commit_id() -> str:
    env = os.environ.get("MSA_COMMIT")
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001 - no git (copied tree): say so
        return "unknown (set MSA_COMMIT)"
    try:
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, timeout=20).returncode != 0
    except Exception:  # noqa: BLE001
        dirty = False
    return sha + ("+dirty" if dirty else "")


def card_name() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} (sm_{p.major}{p.minor})"
    return "CPU (Triton interpreter)"


def software() -> str:
    import triton

    parts = [f"torch {torch.__version__}", f"Triton {triton.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        import kernels

        parts.append(f"kernels {kernels.__version__}")
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            if drv:
                parts.append(f"driver {drv[0]}")
        except Exception:  # noqa: BLE001
            pass
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

class Ctx:
    """Shapes and dtype of the correctness section (GPU: M3 shapes, bf16; CPU: tiny, fp16)."""

    def __init__(self, quick: bool):
        self.gpu = torch.cuda.is_available()
        self.dev = torch.device("cuda" if self.gpu else "cpu")
        self.dtype = torch.bfloat16 if self.gpu else torch.float16
        if self.gpu:
            self.hq, self.hkv, self.topk = 64, 4, 16
            self.dec_lens = [8192, 4097, 129, 1, 2000] if quick else [8192, 8100, 4097, 3000, 129, 128, 1, 2000]
            self.pre_reqs = [(300, 1000), (512, 512), (64, 4096)] if quick else [(300, 1000), (512, 512), (64, 4096),
                                                                                  (1000, 2500)]
            self.nv_T, self.nv_hq, self.nv_hkv = 1000, 64, 4
            self.idx_ctx, self.idx_chunk, self.idx_b = 8192, 256, 4
            self.topk_shape = (4, 64, 1024)
            self.csr_reqs = [(700, 5000), (1, 1), (1300, 1300), (0, 300)]
        else:
            self.hq, self.hkv, self.topk = 8, 2, 4
            self.dec_lens = [300, 129, 1]
            self.pre_reqs = [(20, 300), (16, 16)]
            self.nv_T, self.nv_hq, self.nv_hkv = 150, 4, 2
            self.idx_ctx, self.idx_chunk, self.idx_b = 640, 16, 2
            self.topk_shape = (4, 8, 64)
            self.csr_reqs = [(30, 500), (1, 1), (40, 40), (0, 100)]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _call(fn, ctx: Ctx, iters: int = 10):
    """(result of the first call, µs): median of ``iters`` further eager calls (CUDA events) on a GPU,
    wall-clock of the first call on the CPU."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    first = (time.perf_counter() - t0) * 1e6
    if not ctx.gpu:
        return out, first
    return out, lc.event_median_us(fn, iters)


def _index_row(nb: int, topk: int, messy: bool, gen) -> torch.Tensor:
    if messy:
        return torch.randint(-2, nb + 3, (topk,), generator=gen)
    r = torch.randperm(max(nb, 1), generator=gen)[:topk]
    return torch.cat([r, torch.full((topk - r.numel(),), -1, dtype=r.dtype)]) if r.numel() < topk else r


def _paged_problem(ctx: Ctx, lens, sq=1, messy=True, seed=0):
    """Paged decode inputs: q [B*sq, Hq, D], k/v [P, Hkv, 128, D] (shuffled pages, 2 spare), idx [Hkv, B*sq, topk]."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lens)
    maxp = max(1, max(-(-L // BS) for L in lens))
    P = B * maxp + 2
    k = torch.randn(P, ctx.hkv, BS, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    v = torch.randn(P, ctx.hkv, BS, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    pt = torch.randperm(P, generator=gen)[:B * maxp].view(B, maxp).to(torch.int32).to(ctx.dev)
    sk = torch.tensor(lens, dtype=torch.int32, device=ctx.dev)
    q = torch.randn(B * sq, ctx.hq, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    rows = [_index_row(-(-L // BS), ctx.topk, messy, gen) for L in lens for _ in range(sq) for _ in range(ctx.hkv)]
    idx = torch.stack(rows).view(B * sq, ctx.hkv, ctx.topk).permute(1, 0, 2).contiguous().to(torch.int32).to(ctx.dev)
    return q, k, v, idx, pt, sk


def _row(name, shape, metrics, us, dtype):
    return dict(op=name, shape=shape, dtype=str(dtype).replace("torch.", ""), us=us, **metrics)


# --------------------------------------------------------------------------------------------------
# correctness checks (one or more rows each)
# --------------------------------------------------------------------------------------------------

def chk_decode(msa, ctx: Ctx):
    rows = []
    lens = ctx.dec_lens
    for label, sq, messy, dense in (("sparse_decode_atten_func (messy ids: -1, out of range, duplicates)", 1, True,
                                     False),
                                    ("sparse_decode_atten_func (MTP seqlen_q=3, causal)", 3, False, False),
                                    ("sparse_decode_atten_func (dense path, q2k=None)", 1, False, True)):
        q, k, v, idx, pt, sk = _paged_problem(ctx, lens, sq=sq, messy=messy, seed=len(rows))
        if dense:
            idx = None
        (out, lse), us = _call(lambda: msa.sparse_decode_atten_func(
            q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=sq, max_seqlen_k=max(lens),
            return_softmax_lse=True), ctx)
        o_ref, l_ref = lc.REFS.paged_decode_ref(q, k, v, idx, pt, sk, sq)
        rows.append(_row(label, f"B={len(lens)} Hq={ctx.hq} Hkv={ctx.hkv} L<={max(lens)} top-{ctx.topk}",
                         lc.attn_metrics(out, o_ref, lse, l_ref), us, ctx.dtype))
    return rows


def chk_wrapper(msa, ctx: Ctx):
    lens = ctx.dec_lens
    q, k, v, idx, pt, sk = _paged_problem(ctx, lens, messy=True, seed=11)
    w = msa.SparseDecodePagedAttentionWrapper(blk_kv=BS)
    w.plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=max(lens), q2k_indices=idx, num_qo_heads=ctx.hq,
           num_kv_heads=ctx.hkv, head_dim=D)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], ctx.hq, dtype=torch.float32, device=ctx.dev)
    (o, l), us = _call(lambda: w.run(q, k, v, return_softmax_lse=True, out=out, lse=lse), ctx)
    o_ref, l_ref = lc.REFS.paged_decode_ref(q, k, v, idx, pt, sk, 1)
    rows = [_row("SparseDecodePagedAttentionWrapper.run(out=, lse=)", f"B={len(lens)} Hq={ctx.hq} top-{ctx.topk}",
                 lc.attn_metrics(o, o_ref, l, l_ref), us, ctx.dtype)]
    f = msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=max(lens))
    same = torch.equal(f, o)
    rows.append(_row("wrapper == functional (bitwise)", f"B={len(lens)}", lc.exact_metrics(0 if same else 1, 1),
                     None, ctx.dtype))
    return rows


def chk_direct(msa, ctx: Ctx):
    gen = torch.Generator().manual_seed(21)
    lens = ctx.dec_lens
    B = len(lens)
    width = max(lens) + 5
    slots = (B + 1) * width + 7
    kc = torch.randn(slots, ctx.hkv, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    vc = torch.randn(slots, ctx.hkv, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    r2t = torch.randperm(slots, generator=gen)[:(B + 1) * width].view(B + 1, width).to(torch.int32).to(ctx.dev)
    slot_ids = torch.randperm(B + 1, generator=gen)[:B].to(torch.int32).to(ctx.dev)
    seq = torch.tensor(lens, dtype=torch.int32, device=ctx.dev)
    q = torch.randn(B, ctx.hq, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    sink = torch.randn(ctx.hq, D, generator=gen).to(ctx.dev)
    rows = [_index_row(-(-L // BS), ctx.topk, True, gen) for L in lens for _ in range(ctx.hkv)]
    idx = torch.stack(rows).view(B, ctx.hkv, ctx.topk).permute(1, 0, 2).contiguous().to(torch.int32).to(ctx.dev)
    o, us = _call(lambda: msa.flash_decode_with_gqa_share_sparse(q, sink, kc, vc, r2t, seq, slot_ids, BS, idx), ctx)
    o_ref, _ = lc.REFS.token_major_decode_ref(q, kc, vc, r2t, seq, slot_ids, BS, idx, sink=sink)
    return [_row("flash_decode_with_gqa_share_sparse (token-major, sink, messy ids)",
                 f"B={B} Hq={ctx.hq} top-{ctx.topk}", lc.attn_metrics(o, o_ref), us, ctx.dtype)]


def _prefill_problem(ctx: Ctx, reqs, seed):
    """Paged cache + the same tokens as a dense varlen cache, q, q2k (valid ids with -1 and duplicates), CSR."""
    gen = torch.Generator().manual_seed(seed)
    B = len(reqs)
    lq = [a for a, _ in reqs]
    lk = [b for _, b in reqs]
    maxp = max(1, max(-(-L // BS) for L in lk))
    P = B * maxp + 1
    kp = torch.randn(P, ctx.hkv, BS, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    vp = torch.randn(P, ctx.hkv, BS, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    pt = torch.randperm(P, generator=gen)[:B * maxp].view(B, maxp).to(torch.int32).to(ctx.dev)
    kd = torch.cat([lc.REFS.gather_paged(kp, pt[b], lk[b]) for b in range(B)])
    vd = torch.cat([lc.REFS.gather_paged(vp, pt[b], lk[b]) for b in range(B)])
    cu_q = [0]
    cu_k = [0]
    for a, b in reqs:
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    total_q = cu_q[-1]
    q = torch.randn(total_q, ctx.hq, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    parts = []
    for b in range(B):
        nb = -(-lk[b] // BS)
        for i in range(lq[b]):
            loc = (i + lk[b] - lq[b]) // BS  # the local block (causal), always selected as in M3
            for _ in range(ctx.hkv):
                r = _index_row(nb, ctx.topk, False, gen)
                if torch.rand((), generator=gen) < 0.2:
                    r[torch.randint(0, ctx.topk, (), generator=gen)] = -1
                r[0] = loc
                if ctx.topk > 2 and torch.rand((), generator=gen) < 0.1:
                    r[1] = r[2]  # duplicate
                parts.append(r)
    q2k = torch.stack(parts).view(total_q, ctx.hkv, ctx.topk).permute(1, 0, 2).contiguous().to(torch.int32).to(ctx.dev)
    return dict(q=q, kp=kp, vp=vp, pt=pt, kd=kd, vd=vd, cu_q=cu_q, cu_k=cu_k, lq=lq, lk=lk, q2k=q2k,
                cu_qt=torch.tensor(cu_q, dtype=torch.int32, device=ctx.dev),
                cu_kt=torch.tensor(cu_k, dtype=torch.int32, device=ctx.dev),
                sk=torch.tensor(lk, dtype=torch.int32, device=ctx.dev))


def _prefill_ref(ctx, p, kd, vd):
    """Per request attention_ref (float64, dense mask of the request's q2k rows, causal)."""
    outs, lses = [], []
    for b in range(len(p["lq"])):
        q0, q1 = p["cu_q"][b], p["cu_q"][b + 1]
        k0, k1 = p["cu_k"][b], p["cu_k"][b + 1]
        nb = -(-p["lk"][b] // BS)
        vis = lc.REFS.visible_from_blocks(lc.REFS.q2k_block_mask(p["q2k"][:, q0:q1], nb), q1 - q0, k1 - k0, causal=True)
        o, lse, _ = lc.REFS.attention_ref(p["q"][q0:q1], kd[k0:k1], vd[k0:k1], vis, D ** -0.5)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def chk_prefill(msa, ctx: Ctx):
    p = _prefill_problem(ctx, ctx.pre_reqs, seed=31)
    Lq, Lk = max(p["lq"]), max(p["lk"])
    rp, qi = msa.build_k2q_csr(p["q2k"], p["cu_qt"], p["cu_kt"], BS, total_k=p["cu_k"][-1], max_seqlen_k=Lk,
                               max_seqlen_q=Lq)
    o_ref, l_ref = _prefill_ref(ctx, p, p["kd"], p["vd"])
    shape = f"(Lq, Lk) {ctx.pre_reqs} Hq={ctx.hq} Hkv={ctx.hkv} top-{ctx.topk}"
    rows = []
    kw = dict(cu_seqlens_q=p["cu_qt"], cu_seqlens_k=p["cu_kt"], max_seqlen_q=Lq, max_seqlen_k=Lk, causal=True,
              return_softmax_lse=True)
    (o, l), us = _call(lambda: msa.sparse_atten_func(p["q"], p["kd"], p["vd"], rp, qi, ctx.topk, **kw), ctx)
    rows.append(_row("sparse_atten_func dense varlen (causal, LSE)", shape, lc.attn_metrics(o, o_ref, l, l_ref), us,
                     ctx.dtype))
    (o2, l2), us = _call(lambda: msa.sparse_atten_func(p["q"], p["kp"], p["vp"], rp, qi, ctx.topk, page_table=p["pt"],
                                                       seqused_k=p["sk"], **kw), ctx)
    rows.append(_row("sparse_atten_func paged (shuffled pages, seqused_k)", shape,
                     lc.attn_metrics(o2, o_ref, l2, l_ref), us, ctx.dtype))
    return rows


def chk_nvfp4(msa, ctx: Ctx):
    gen = torch.Generator().manual_seed(41)
    T, hq, hkv = ctx.nv_T, ctx.nv_hq, ctx.nv_hkv
    q = torch.randn(T, hq, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    kf = torch.randn(T, hkv, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    vf = torch.randn(T, hkv, D, generator=gen).to(ctx.dtype).to(ctx.dev)
    nb = -(-T // BS)
    topk = min(ctx.topk, nb)
    loc = (torch.arange(T) // BS).view(1, T, 1).expand(hkv, T, 1)
    rnd = torch.randint(-1, nb + 1, (hkv, T, topk - 1), generator=gen) if topk > 1 else loc[..., :0]
    q2k = torch.cat([loc, rnd], -1).to(torch.int32).contiguous().to(ctx.dev)
    cu = torch.tensor([0, T], dtype=torch.int32, device=ctx.dev)
    rp, qi = msa.build_k2q_csr(q2k, cu, cu, BS, total_k=T)
    qk, qv = msa.quantize_kv_bf16_to_nvfp4_128x4(kf, vf)
    # exactly decoded values (e2m1 * E4M3 scale) * global scale, in float64 (no bf16 rounding)
    kd = msa.dequantize_nvfp4_128x4_to_bf16(qk, include_global_scale=False).double() * qk.global_scale.double()[0]
    vd = msa.dequantize_nvfp4_128x4_to_bf16(qv, include_global_scale=False).double() * qv.global_scale.double()[0]
    (o, l), us = _call(lambda: msa.sparse_atten_nvfp4_kv_func(
        q, qk.data, qv.data, qk.scale_128x4, qv.scale_128x4, qk.global_scale, qv.global_scale, rp, qi, topk,
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T, causal=True, return_softmax_lse=True), ctx)
    vis = lc.REFS.visible_from_blocks(lc.REFS.q2k_block_mask(q2k.cpu(), nb), T, T, causal=True)
    o_ref, l_ref, _ = lc.REFS.attention_ref(q, kd.to(ctx.dev), vd.to(ctx.dev), vis, D ** -0.5)
    # NVFP4 V spans |e2m1*scale*global| up to ~6 here, so rows attending to few keys have |O| of that size and
    # their bf16 rounding alone is |O|*2^-9: the max-abs gate is taken on O / max(1, max|O_ref| of the row)
    # (as in tests/test_prefill_nvfp4.py; identical for unit-scale rows).
    s = o_ref.double().abs().amax(dim=-1, keepdim=True).clamp(min=1.0).to(o.device)
    m = lc.attn_metrics(o.double() / s, o_ref.double().to(o.device) / s, l, l_ref)
    return [_row("sparse_atten_nvfp4_kv_func (dense, causal; ref on the exactly decoded K/V; O / row scale)",
                 f"T={T} Hq={hq} Hkv={hkv} top-{topk}", m, us, ctx.dtype)]


def chk_indexers(msa, ctx: Ctx):
    """M3 indexer shapes (4 index-Q heads, 1 index-K head): FP4 prefill scores + top-k, decode indexer."""
    c = lc.make_case(msa, ctx=ctx.idx_ctx, batch=ctx.idx_b, chunk=ctx.idx_chunk, device=ctx.dev, dtype=ctx.dtype,
                     seed=51)
    s = lc.make_queries(c, seed=52)
    rows = []
    qq = lc.quantize_index_q(msa, s.qi_pre_pad)
    q_fp4, q_scale = lc.index_q_args(c, qq)
    sc, us = _call(lambda: lc.prefill_scores(msa, c, q_fp4, q_scale), ctx)
    qd = lc.fp4_rows_f64(qq.data.reshape(-1, 64), qq.scale_128x4.reshape(-1),
                         torch.arange(lc.HIDX * c.t_pad, device=c.device)).view(lc.HIDX, c.t_pad, 128)[:, :c.T]
    ref = lc.fp4_chunk_scores_ref(qd, c.T, c.kidx_fp4, c.kidx_scale_flat, c.page_table[0], c.L, sc.shape[1])
    rows.append(_row("fp4_indexer_block_scores (nvfp4, preordered_mma, causal chunk)",
                     f"[4, {sc.shape[1]}, {c.T}] Lk={c.L}", lc.score_metrics(sc, ref), us, "nvfp4"))
    q2k, us = _call(lambda: lc.prefill_topk(msa, c, sc), ctx)
    want = lc.topk_ref(sc.permute(0, 2, 1), c.row_lens, BS, lc.TOPK, force=1)
    rows.append(_row("native_topk_from_scores on the FP4 scores (local forced)", f"[4, {c.T}, {sc.shape[1]}]",
                     lc.exact_metrics(int((q2k.cpu() != want).any(-1).sum()), 4 * c.T), us, "fp32"))
    idx, us = _call(lambda: lc.decode_indexer(msa, c, s.qi_dec), ctx)
    sk = lc.decode_scores(msa, c, s.qi_dec)
    ref = lc.decode_scores_ref(s.qi_dec, c.kidx, c.r2t, c.lens, sk.shape[2], lc.SCALE)
    rows.append(_row("flash_decode_with_topk_idx block scores (M3: init 0, local 1)", f"[4, {c.B}, {sk.shape[2]}]",
                     lc.score_metrics(sk, ref), us, ctx.dtype))
    want = lc.topk_ref(sk, c.seqused_k, BS, lc.TOPK, force=1)
    rows.append(_row("flash_decode_with_topk_idx selection (exact on its scores)", f"[4, {c.B}, {lc.TOPK}]",
                     lc.exact_metrics(int((idx.cpu() != want).any(-1).sum()), 4 * c.B), None, "int32"))
    return rows


def chk_topk(msa, ctx: Ctx):
    gen = torch.Generator().manual_seed(61)
    H, B, NB = ctx.topk_shape
    score = torch.randint(-8, 8, (H, B, NB), generator=gen).float()
    r = torch.rand(H, B, NB, generator=gen)
    score = torch.where(r < 0.05, torch.tensor(-math.inf), score)
    score = torch.where((r >= 0.05) & (r < 0.08), torch.tensor(math.nan), score)
    score = torch.where((r >= 0.08) & (r < 0.09), torch.tensor(math.inf), score)
    score = torch.where((r >= 0.09) & (r < 0.11), torch.tensor(-0.0), score)
    lens = torch.randint(-3, NB * BS + 2 * BS, (B,), generator=gen, dtype=torch.int32)
    lens[0], lens[1] = 0, NB * BS + 7
    score, lens = score.to(ctx.dev), lens.to(ctx.dev)
    rows = []
    for force in (0, 1):
        out, us = _call(lambda: msa.native_topk_from_scores(score, lens, BS, 16, force_local_blocks=force), ctx)
        want = lc.topk_ref(score, lens, BS, 16, force=force)
        rows.append(_row(f"native_topk_from_scores (ties, ±inf, NaN, -0.0; force_local_blocks={force})",
                         f"[{H}, {B}, {NB}] k=16", lc.exact_metrics(int((out.cpu() != want).any(-1).sum()), H * B),
                         us, "fp32"))
    return rows


def chk_csr(msa, ctx: Ctx):
    gen = torch.Generator().manual_seed(71)
    reqs = ctx.csr_reqs
    cu_q, cu_k = [0], [0]
    for a, b in reqs:
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    total_q = cu_q[-1]
    parts = [torch.randint(-2, -(-b // BS) + 3, (ctx.hkv, a, 16), generator=gen) for a, b in reqs]
    q2k = torch.cat(parts, 1).to(torch.int32)
    cq = torch.tensor(cu_q, dtype=torch.int32, device=ctx.dev)
    ck = torch.tensor(cu_k, dtype=torch.int32, device=ctx.dev)
    max_lk = max(b for _, b in reqs)
    max_kvb = -(-max(max_lk, BS) // BS)
    rows = []
    for label, tr in (("default total_rows", None), ("total_rows = sum R_b", sum(-(-b // BS) for _, b in reqs))):
        (rp, qi), us = _call(lambda: msa.build_k2q_csr(q2k.to(ctx.dev), cq, ck, BS, total_k=cu_k[-1],
                                                       max_seqlen_k=max_lk, max_seqlen_q=max(a for a, _ in reqs),
                                                       total_rows=tr), ctx)
        rp_ref, qi_ref = lc.REFS.build_k2q_csr_ref(q2k, cu_q, cu_k, total_rows=rp.shape[1] - 1, max_kv_blocks=max_kvb)
        bad = (int((rp.cpu() != rp_ref).sum()) + int((qi.cpu() != qi_ref).sum())) if rp.shape == rp_ref.shape \
            and qi.shape == qi_ref.shape else rp.numel() + qi.numel()
        rows.append(_row(f"build_k2q_csr (ragged, adversarial ids; {label})",
                         f"(Lq, Lk) {reqs} Hkv={ctx.hkv} topK=16, total_q={total_q}",
                         lc.exact_metrics(bad, rp.numel() + qi.numel()), us, "int32"))
    return rows


CHECKS = [("decode", chk_decode), ("wrapper", chk_wrapper), ("direct", chk_direct), ("prefill", chk_prefill),
          ("nvfp4 kv attention", chk_nvfp4), ("indexer", chk_indexers), ("topk", chk_topk), ("csr", chk_csr)]


def run_correctness(msa, quick: bool):
    ctx = Ctx(quick)
    rows = []
    for name, fn in CHECKS:
        lc.log(f"correctness: {name}")
        try:
            got = fn(msa, ctx)
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            traceback.print_exc()
            got = [dict(op=f"{name}: ERROR {type(e).__name__}: {str(e)[:160]}", shape="-", dtype="-", us=None,
                        cos=None, max_abs=None, lse_err=None, peer=False, ours=False, note="exception")]
        for r in got:
            lc.log(f"  {r['op']}: ours {'PASS' if r['ours'] else 'FAIL'}, peer {'PASS' if r['peer'] else 'FAIL'}"
                   f"{lc._metric_text(r)}")
        rows += got
        if ctx.gpu:
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------
# benchmarks: benchmarks/benchmark.py's runner, one section per call, returned rows recorded
# --------------------------------------------------------------------------------------------------

def run_benchmarks(sections, mode: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    bm = importlib.import_module("benchmark")
    timing = importlib.import_module("timing")
    out = {}
    for name in sections:
        lc.log(f"benchmarks: section {name} ({mode})")
        try:
            mod = importlib.import_module(getattr(bm, "SECTION_MODULES", {}).get(name, f"bench_{name}"))
        except ImportError as e:
            out[name] = f"section not available ({e})"
            continue
        orig = mod.run
        captured = {}

        def recorder(msa, tm, _orig=orig, _cap=captured):
            _cap["rows"] = _orig(msa, tm)
            return _cap["rows"]

        mod.run = recorder
        try:
            bm.main(["--sections", name] + (["--quick"] if mode == "quick" else []))
            out[name] = captured.get("rows") or "section returned no rows (see its printed table)"
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out[name] = f"ERROR {type(e).__name__}: {str(e)[:200]}"
        finally:
            mod.run = orig
        torch.cuda.empty_cache()
    meas = dict(copy_bw=getattr(timing, "COPY_BW", None), tflops=getattr(timing, "MATMUL_TFLOPS", None))
    return out, meas


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------

def _f(v, kind=None):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if kind == "cos":
            return f"{v:.6f}"
        if kind == "err":
            return f"{v:.2e}"
        if math.isnan(v):
            return "nan"
        a = abs(v)
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v).replace("|", "/")


def _gate(ok):
    return "**PASS**" if ok else "**FAIL**"


def check_table(rows, meta, with_length=False):
    head = (["length"] if with_length else []) + ["check", "shape", "dtype", "cos", "max-abs", "LSE err", "note",
                                                 "peer gate", "ours gate", "µs", "card", "date", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = ([str(r.get("length", ""))] if with_length else []) + [
            _f(r["op"]), _f(r.get("shape")), _f(r.get("dtype", meta["dtype"])), _f(r.get("cos"), "cos"),
            _f(r.get("max_abs"), "err"), _f(r.get("lse_err"), "err"), _f(r.get("note") or ""), _gate(r["peer"]),
            _gate(r["ours"]), _f(r.get("us")), meta["card"], meta["date"], meta["commit"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_table(rows, meta):
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        return f"_{rows}_"
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    head = keys + ["card", "date", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([_f(r.get(k)) for k in keys] + [meta["card"], meta["date"], meta["commit"]])
                     + " |")
    return "\n".join(lines)


def render(meta, sections):
    out = [f"# Validation tables — {meta['card']}, {meta['date']}, commit {meta['commit']}", "",
           f"Generated by `python scripts/validation_report.py {meta['argv']}` ({meta['software']}). "
           f"Measured on this card in this run: {meta.get('measured', 'n/a')}.", "",
           "Gates per row — **peer**: cos ≥ 0.999 and max-abs ≤ 5e-2; **ours**: cos ≥ 0.9999, max-abs ≤ 1e-2 and LSE "
           "within atol = rtol = 1e-3 (-inf pattern exact). Block-score rows: finite entries within atol 0.1 / "
           "rtol 0.01 and the -inf pattern exact (ours), cosine over the finite entries (peer). Top-k and CSR rows: "
           "exact equality (both). References are float64 (`msa.testing`, `scripts/long_context.py`); "
           "inputs are fresh random values. µs: median of eager calls timed with CUDA events (GPU) or the "
           "wall-clock of one interpreted call (CPU).", ""]
    if "correctness" in sections:
        rows = sections["correctness"]
        npass = sum(r["ours"] for r in rows)
        out += [f"## Correctness ({npass}/{len(rows)} rows pass our gate, "
                f"{sum(r['peer'] for r in rows)}/{len(rows)} the peer gate)", "", check_table(rows, meta), ""]
    if "long" in sections:
        rows = sections["long"]
        npass = sum(r["ours"] for r in rows)
        out += [f"## Long context ({npass}/{len(rows)} rows pass our gate)", "",
                "M3 shape (Hq 64, Hkv 4, D 128, top-16 of 128-token blocks), paged KV with a shuffled page table. "
                "Decode: B = 2 (lengths L and L − 77), `flash_decode_with_topk_idx` → `sparse_decode_atten_func`. "
                "Prefill: a causal chunk of the last T tokens of request 0 against its whole KV length, NVFP4 index q/k "
                "→ `fp4_indexer_block_scores` → `native_topk_from_scores` (local forced) → `build_k2q_csr` → "
                "`sparse_atten_func`. Attention references: float64 `attention_ref` over each query's selected blocks "
                "(chunked). CSR: exact vs `build_k2q_csr_ref`.", "", check_table(rows, meta, with_length=True), ""]
    if "bench" in sections:
        res = sections["bench"]
        out += ["## Benchmarks (`benchmarks/benchmark.py` runner, " + meta.get("bench_mode", "") + ")", ""]
        if isinstance(res, str):
            out += [f"_{res}_", ""]
        else:
            for name, rows in res.items():
                out += [f"### {name}", "", bench_table(rows, meta), ""]
    return "\n".join(out)


def main(argv=None):
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description="Regenerate the VALIDATION.md tables")
    ap.add_argument("--quick", action="store_true", help="smaller correctness shapes, long rows at 65536 only")
    ap.add_argument("--out", default=None, help="markdown output (default $OUT/validation_tables.md)")
    ap.add_argument("--sections", default="correctness,long,bench")
    ap.add_argument("--lengths", default=None, help="long-context KV lengths (default 65536,131072,1048576; "
                                                    "--quick: 65536; CPU: 4096)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk of the long rows (default 512; CPU 8)")
    ap.add_argument("--bench-sections", default="topk,decode,prefill")
    ap.add_argument("--bench-mode", choices=("quick", "full"), default="quick")
    args = ap.parse_args(argv)
    out_path = pathlib.Path(args.out or os.path.join(os.environ.get("OUT", "."), "validation_tables.md"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    msa = lc.load_msa()
    meta = dict(card=card_name(), date=time.strftime("%Y-%m-%d"), commit=commit_id(), software=software(),
                dtype="bf16" if gpu else "fp16", argv=" ".join(sys.argv[1:] if argv is None else argv),
                bench_mode=args.bench_mode)
    lc.log(f"validation report on {meta['card']}, commit {meta['commit']}; {meta['software']}; -> {out_path}")
    if gpu:
        sys.path.insert(0, str(REPO / "benchmarks"))
        timing = importlib.import_module("timing")
        bw, tf = timing.measure_copy_bandwidth(), timing.measure_matmul_tflops()
        meta["measured"] = f"device-to-device copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {tf:.0f} TFLOP/s"
    sections = {}
    failed = False

    def flush():
        out_path.write_text(render(meta, sections) + "\n")

    if "correctness" in wanted:
        sections["correctness"] = run_correctness(msa, args.quick)
        failed |= not all(r["ours"] for r in sections["correctness"])
        flush()
    if "long" in wanted:
        if args.lengths:
            lengths = [int(x) for x in args.lengths.split(",") if x]
        else:
            lengths = ([65536] if args.quick else [65536, 131072, 1048576]) if gpu else [4096]
        chunk = args.chunk or (512 if gpu else 8)
        try:
            sections["long"] = lc.long_context_rows(msa, lengths, batch=2, chunk=chunk)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            sections["long"] = [dict(op=f"ERROR {type(e).__name__}: {str(e)[:200]}", shape="-", dtype="-", us=None,
                                     cos=None, max_abs=None, lse_err=None, peer=False, ours=False, note="exception")]
        failed |= not all(r["ours"] for r in sections["long"])
        flush()
    if "bench" in wanted:
        if not gpu:
            lc.log("benchmarks need a CUDA GPU; skipped")
            sections["bench"] = "benchmarks need a CUDA GPU; skipped on this machine"
        else:
            res, meas = run_benchmarks([s.strip() for s in args.bench_sections.split(",") if s.strip()],
                                       args.bench_mode)
            sections["bench"] = res
            if meas["copy_bw"]:
                meta["measured"] = (f"device-to-device copy {meas['copy_bw'] / 1e12:.2f} TB/s (read + write), bf16 "
                                    f"matmul {meas['tflops']:.0f} TFLOP/s")
        flush()
    flush()
    print("\n" + out_path.read_text(), flush=True)
    lc.log(f"wrote {out_path}; {'all checked rows pass our gate' if not failed else 'SOME ROWS FAIL our gate'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
