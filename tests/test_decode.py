"""Official sparse decode: ``sparse_decode_atten_func`` and ``SparseDecodePagedAttentionWrapper`` (API.md 5.1, 5.2).

CPU tests run the Triton kernel through the interpreter (fp16, small shapes); GPU tests (bf16, long
contexts, CUDA graphs, torch.compile with inductor) are marked ``requires_cuda``.
"""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from .helpers import (assert_close_attn, assert_lse_close, capture_cuda_graph, msa, poison_like, random_index_row,
                      replay_steps, requires_cuda)
from .reference import paged_decode_ref

FP8 = torch.float8_e4m3fn
D = 128
BS = 128


def _atol(dtype):
    return 2e-3 if dtype == torch.float16 else 1e-2


def make_problem(lens, *, hkv=2, g=4, sq=1, topk=4, dtype=torch.float16, device="cpu", ids="messy", strided=False,
                 extra_pages=2, kv_dtype=None, page_cols=None):
    """Random paged decode inputs.

    lens: KV length per request. ids: "messy" (random ids in [-2, nb+2): -1 anywhere, out of range,
    duplicates), "valid" (distinct valid ids, shuffled), or "dense" (None). Page tables are shuffled.
    strided: K/V are the permuted view of a token-major NHD cache (read in place).
    """
    b = len(lens)
    maxp = page_cols or max(1, max(-(-L // BS) for L in lens))
    num_pages = b * maxp + extra_pages
    kv_dtype = kv_dtype or dtype
    gen_dtype = torch.float16 if kv_dtype == FP8 else kv_dtype
    if strided:
        kc = torch.randn(num_pages * BS, hkv, D, dtype=gen_dtype, device=device)
        vc = torch.randn(num_pages * BS, hkv, D, dtype=gen_dtype, device=device)
        k = kc.to(kv_dtype).view(num_pages, BS, hkv, D).permute(0, 2, 1, 3)
        v = vc.to(kv_dtype).view(num_pages, BS, hkv, D).permute(0, 2, 1, 3)
    else:
        k = torch.randn(num_pages, hkv, BS, D, dtype=gen_dtype, device=device).to(kv_dtype)
        v = torch.randn(num_pages, hkv, BS, D, dtype=gen_dtype, device=device).to(kv_dtype)
    perm = torch.randperm(num_pages)
    page_table = perm[: b * maxp].view(b, maxp).to(torch.int32).to(device)
    seqused_k = torch.tensor(lens, dtype=torch.int32, device=device)
    q_dtype = dtype
    q = torch.randn(b * sq, hkv * g, D, dtype=torch.float16 if q_dtype == FP8 else q_dtype, device=device).to(q_dtype)
    if ids == "dense":
        idx = None
    else:
        rows = []
        for bi, L in enumerate(lens):
            nb = -(-L // BS)
            for _ in range(sq):
                for _ in range(hkv):
                    rows.append(random_index_row(nb, topk, ids))
        idx = torch.stack(rows).view(b * sq, hkv, topk).permute(1, 0, 2).contiguous().to(torch.int32).to(device)
    return q, k, v, idx, page_table, seqused_k


def run_official(q, k, v, idx, pt, sk, sq, *, causal=True, lse=True, max_seqlen_k=None):
    max_seqlen_k = max_seqlen_k or max(1, int(sk.max()) if sk.numel() else 1)
    return msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=sq,
                                        max_seqlen_k=max_seqlen_k, causal=causal, return_softmax_lse=lse)


def check(out, lse, q, k, v, idx, pt, sk, sq, *, causal=True, atol=None):
    kr = k.float() if k.dtype == FP8 else k
    vr = v.float() if v.dtype == FP8 else v
    o_ref, lse_ref = paged_decode_ref(q.float() if q.dtype == FP8 else q, kr, vr, idx, pt, sk, sq, causal=causal)
    assert_close_attn(out, o_ref, atol=atol or _atol(q.dtype))
    if lse is not None:
        assert_lse_close(lse, lse_ref)
    empty = torch.isneginf(lse_ref)
    if empty.any():
        assert (out.float().cpu()[empty] == 0).all(), "empty rows must be exactly 0"


# ---------------------------------------------------------------------------------------------------
# CPU (interpreter) correctness
# ---------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("g", [1, 2, 4, 8, 16])
def test_gqa_messy_ids(device, g):
    hkv = 2 if g <= 4 else 1
    q, k, v, idx, pt, sk = make_problem([300, 129, 640], hkv=hkv, g=g, topk=5, device=device)
    out, lse = run_official(q, k, v, idx, pt, sk, 1)
    check(out, lse, q, k, v, idx, pt, sk, 1)


@pytest.mark.parametrize("ctx", [128, 2048, 4096])
def test_contexts(device, ctx):
    q, k, v, idx, pt, sk = make_problem([ctx, max(1, ctx // 3)], hkv=1, g=4, topk=6, device=device, ids="valid")
    out, lse = run_official(q, k, v, idx, pt, sk, 1)
    check(out, lse, q, k, v, idx, pt, sk, 1)


def test_ragged_batch(device):
    lens = [1, 127, 128, 129, 255, 256, 5, 700] * 2  # 16 requests, partial last pages
    q, k, v, idx, pt, sk = make_problem(lens, hkv=1, g=2, topk=3, device=device)
    out, lse = run_official(q, k, v, idx, pt, sk, 1)
    check(out, lse, q, k, v, idx, pt, sk, 1)


@pytest.mark.kernels_ci
def test_empty_rows_and_bad_ids(device):
    q, k, v, idx, pt, sk = make_problem([0, 300, 200, 256], hkv=2, g=2, topk=4, device=device)
    idx[:, 1] = -1  # request 1: all empty
    idx[0, 2] = torch.tensor([-5, 7, 2, 99], dtype=torch.int32)  # only 2 out of range (nb=2) -> empty
    idx[1, 2] = torch.tensor([1, -1, 1, 0], dtype=torch.int32)  # -1 in the middle, duplicate
    idx[:, 3] = torch.tensor([1, 1, 1, 1], dtype=torch.int32)  # one block, 4 times
    out, lse = run_official(q, k, v, idx, pt, sk, 1)
    check(out, lse, q, k, v, idx, pt, sk, 1)
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[1]).all()
    assert torch.isneginf(lse[2, :2]).all()


def test_duplicates_count_once_order_irrelevant(device):
    q, k, v, idx, pt, sk = make_problem([1024, 1024], hkv=2, g=4, topk=6, device=device, ids="valid")
    out1, lse1 = run_official(q, k, v, idx, pt, sk, 1)
    shuffled = idx[:, :, torch.randperm(idx.shape[2])].contiguous()
    dup = torch.cat([idx, idx[:, :, :3]], dim=2).contiguous()
    out2, lse2 = run_official(q, k, v, shuffled, pt, sk, 1)
    out3, lse3 = run_official(q, k, v, dup, pt, sk, 1)
    for o, l in ((out2, lse2), (out3, lse3)):
        torch.testing.assert_close(o.float(), out1.float(), atol=2e-3, rtol=0)
        torch.testing.assert_close(l, lse1, atol=1e-4, rtol=0)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("causal", [True, False])
def test_multi_token_causal(device, causal):
    sq = 3
    q, k, v, idx, pt, sk = make_problem([2, 300, 129], hkv=2, g=4, sq=sq, topk=3, device=device)
    out, lse = run_official(q, k, v, idx, pt, sk, sq, causal=causal)
    check(out, lse, q, k, v, idx, pt, sk, sq, causal=causal)


def test_multi_token_m_tiles(device):
    # G * seqlen_q = 80 rows > 64: two M tiles; per-token index rows differ
    sq = 5
    q, k, v, idx, pt, sk = make_problem([700, 400], hkv=1, g=16, sq=sq, topk=3, device=device)
    out, lse = run_official(q, k, v, idx, pt, sk, sq)
    check(out, lse, q, k, v, idx, pt, sk, sq)


@pytest.mark.kernels_ci
def test_dense_path(device):
    q, k, v, idx, pt, sk = make_problem([900, 1, 256], hkv=2, g=4, sq=2, device=device, ids="dense")
    out, lse = run_official(q, k, v, None, pt, sk, 2)
    check(out, lse, q, k, v, None, pt, sk, 2)
    # sizing hint smaller than a real length: still correct (last split covers the rest)
    out, lse = run_official(q, k, v, None, pt, sk, 2, max_seqlen_k=100)
    check(out, lse, q, k, v, None, pt, sk, 2)


def test_dense_equals_all_blocks_sparse(device):
    q, k, v, _, pt, sk = make_problem([512, 300], hkv=1, g=4, device=device, ids="dense")
    idx = torch.arange(4, dtype=torch.int32, device=device).view(1, 1, 4).expand(1, 2, 4).contiguous()
    out_d, lse_d = run_official(q, k, v, None, pt, sk, 1)
    out_s, lse_s = run_official(q, k, v, idx, pt, sk, 1)
    torch.testing.assert_close(out_d.float(), out_s.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(lse_d, lse_s, atol=1e-4, rtol=0)


def test_strided_permuted_nhd_cache(device):
    q, k, v, idx, pt, sk = make_problem([300, 520], hkv=2, g=4, topk=4, device=device, strided=True)
    assert not k.is_contiguous()
    out, lse = run_official(q, k, v, idx, pt, sk, 1)
    check(out, lse, q, k, v, idx, pt, sk, 1)
    out2, lse2 = run_official(q, k.contiguous(), v.contiguous(), idx, pt, sk, 1)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_strided_index_tensors(device):
    q, k, v, idx, pt, sk = make_problem([300, 520], hkv=2, g=4, topk=4, device=device)
    idx_t = idx.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # [Hkv, T, K] view of a [T, Hkv, K] tensor
    pt_t = pt.t().contiguous().t()
    out, lse = run_official(q, k, v, idx_t, pt_t, sk, 1)
    check(out, lse, q, k, v, idx, pt, sk, 1)


def test_no_lse_and_scale(device):
    q, k, v, idx, pt, sk = make_problem([400], hkv=2, g=2, topk=3, device=device)
    out = msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=400,
                                       softmax_scale=0.05, schedule=object(), O_partial=1, LSE_partial=2)
    assert isinstance(out, torch.Tensor)
    o_ref, _ = paged_decode_ref(q, k, v, idx, pt, sk, 1, scale=0.05)
    assert_close_attn(out, o_ref, atol=2e-3)


def test_fp8_qkv(device):
    q, k, v, idx, pt, sk = make_problem([300, 700], hkv=2, g=4, topk=4, dtype=FP8, device=device)
    out, lse = run_official(q, k, v, idx, pt, sk, 1)
    assert out.dtype == torch.bfloat16
    o_ref, lse_ref = paged_decode_ref(q.float(), k.float(), v.float(), idx, pt, sk, 1)
    assert (out.double().cpu() - o_ref.to(torch.bfloat16).double()).abs().max() <= 0.125
    assert_lse_close(lse, lse_ref, atol=2e-3, rtol=2e-3)


def test_empty_batch(device):
    q, k, v, idx, pt, sk = make_problem([300], hkv=2, g=2, device=device)
    out, lse = msa.sparse_decode_atten_func(q[:0], k, v, idx[:, :0], page_table=pt[:0], seqused_k=sk[:0], seqlen_q=1,
                                            max_seqlen_k=1, return_softmax_lse=True)
    assert out.shape == (0, 4, D) and lse.shape == (0, 4)


# ---------------------------------------------------------------------------------------------------
# Wrapper
# ---------------------------------------------------------------------------------------------------


def plan_decode(pt, sk, sq, idx, hq, hkv, *, causal=True, **kw):
    """A ``SparseDecodePagedAttentionWrapper`` planned for these tensors (``max_seqlen_k`` = the longest length);
    ``kw``: the other ``plan`` arguments (split hints, ``enable_cuda_graph``)."""
    w = msa.SparseDecodePagedAttentionWrapper(causal=causal)
    return w.plan(page_table=pt, seqused_k=sk, seqlen_q=sq, max_seqlen_k=max(1, int(sk.max())), q2k_indices=idx,
                  num_qo_heads=hq, num_kv_heads=hkv, head_dim=D, **kw)


def rewrite_plan_inputs(pt, sk, idx, lens):
    """In-place updates a planned wrapper must see on its next run: KV lengths ``lens``, every page-table row
    reversed, new random ids in [-1, 6)."""
    sk.copy_(torch.tensor(lens, dtype=torch.int32))
    pt.copy_(pt.flip(1))
    idx.copy_(torch.randint(-1, 6, idx.shape, dtype=torch.int32))


@pytest.mark.kernels_ci
def test_wrapper_matches_functional_bitwise(device):
    q, k, v, idx, pt, sk = make_problem([300, 700, 1], hkv=2, g=4, topk=4, device=device)
    w = plan_decode(pt, sk, 1, idx, 8, 2)
    for attr in ("blk_kv", "causal", "batch", "num_qo_heads", "num_kv_heads", "head_dim", "page_table", "seqused_k",
                 "q2k_indices", "seqlen_q", "max_seqlen_k", "is_sparse"):
        assert hasattr(w, attr), attr
    assert w.is_sparse and w.batch == 3 and w.page_table is pt
    out_w, lse_w = w.run(q, k, v, return_softmax_lse=True)
    out_f, lse_f = run_official(q, k, v, idx, pt, sk, 1)
    assert torch.equal(out_w, out_f) and torch.equal(lse_w, lse_f)
    # out= / lse= are written in place and returned as the same objects
    out = poison_like(torch.empty_like(out_f))
    lse = poison_like(torch.empty_like(lse_f))
    r_out, r_lse = w.run(q, k, v, return_softmax_lse=True, out=out, lse=lse)
    assert r_out is out and r_lse is lse
    assert torch.equal(out, out_f) and torch.equal(lse, lse_f)
    out2 = poison_like(torch.empty_like(out_f))
    assert w.run(q, k, v, out=out2) is out2 and torch.equal(out2, out_f)


def test_wrapper_dense_and_reference_semantics(device):
    q, k, v, idx, pt, sk = make_problem([300, 700], hkv=2, g=4, topk=4, device=device)
    w = plan_decode(pt, sk, 1, None, 8, 2)
    assert not w.is_sparse
    out = w.run(q, k, v)
    check(out, None, q, k, v, None, pt, sk, 1)
    # plan stores references: in-place updates are seen by the next run
    ws = plan_decode(pt, sk, 1, idx, 8, 2)
    ws.run(q, k, v)
    rewrite_plan_inputs(pt, sk, idx, [640, 200])
    out, lse = ws.run(q, k, v, return_softmax_lse=True)
    check(out, lse, q, k, v, idx, pt, sk, 1)


def test_wrapper_split_hints(device):
    q, k, v, idx, pt, sk = make_problem([1024, 900], hkv=1, g=8, topk=8, device=device, ids="valid")
    ref = None
    for kw in ({}, {"disable_split_kv": True}, {"fixed_split_size": 1}, {"fixed_split_size": 3}, {"max_grid_size": 3}):
        w = plan_decode(pt, sk, 1, idx, 8, 1, **kw)
        out, lse = w.run(q, k, v, return_softmax_lse=True)
        check(out, lse, q, k, v, idx, pt, sk, 1)
        if kw.get("fixed_split_size") == 1:
            assert w.num_splits >= 8
        if ref is not None:
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=0)
        ref = out


@pytest.mark.kernels_ci
def test_wrapper_errors(device):
    q, k, v, idx, pt, sk = make_problem([300], hkv=2, g=4, topk=4, device=device)
    w = msa.SparseDecodePagedAttentionWrapper()
    with pytest.raises(RuntimeError, match="decode wrapper must be planned before run"):
        w.run(q, k, v)
    base = dict(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=300, q2k_indices=idx, num_qo_heads=8,
                num_kv_heads=2, head_dim=128)
    cases = [
        (dict(page_table=pt[0]), ValueError),
        (dict(page_table=pt.long()), TypeError),
        (dict(seqused_k=sk.long()), TypeError),
        (dict(seqused_k=torch.zeros(2, dtype=torch.int32, device=device)), ValueError),
        (dict(q2k_indices=idx.long()), TypeError),
        (dict(q2k_indices=idx[:1]), ValueError),
        (dict(seqlen_q=0), ValueError),
        (dict(max_seqlen_k=0), ValueError),
        (dict(num_qo_heads=None), ValueError),
        (dict(num_kv_heads=None), ValueError),
        (dict(head_dim=None), ValueError),
        (dict(head_dim=64), msa.MsaUnsupportedError),
        (dict(num_qo_heads=7), ValueError),
        (dict(num_qo_heads=6, num_kv_heads=2, q2k_indices=None), msa.MsaUnsupportedError),
    ]
    for over, exc in cases:
        with pytest.raises(exc):
            msa.SparseDecodePagedAttentionWrapper().plan(**{**base, **over})
    w.plan(**base)
    with pytest.raises(ValueError):
        w.run(q[:, :4], k, v)
    with pytest.raises(ValueError):
        w.run(q, k[:, :1], v[:, :1])
    with pytest.raises(TypeError):
        w.run(q, k, v, out=torch.empty(q.shape, dtype=torch.float32, device=device))
    with pytest.raises(ValueError):
        w.run(q, k, v, out=torch.empty(q.shape[0], 8, 64, dtype=q.dtype, device=device))
    with pytest.raises(TypeError):
        w.run(q, k, v, return_softmax_lse=True, lse=torch.empty(1, 8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError):
        w.run(q, k, v, return_softmax_lse=True, lse=torch.empty(2, 8, dtype=torch.float32, device=device))


# ---------------------------------------------------------------------------------------------------
# Errors of the functional API (API.md 5.1 table)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
def test_functional_errors(device):
    q, k, v, idx, pt, sk = make_problem([300, 200], hkv=2, g=4, topk=4, device=device)
    U = msa.MsaUnsupportedError

    def call(q=q, k=k, v=v, idx=idx, **kw):
        args = dict(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=300)
        args.update(kw)
        return msa.sparse_decode_atten_func(q, k, v, idx, **args)

    cases = [
        (dict(q=q[0]), ValueError),
        (dict(k=k[0]), ValueError),
        (dict(v=v[:, :, :, :64]), ValueError),
        (dict(q=q[:, :, :64]), U),
        (dict(k=k[..., :64], v=v[..., :64]), U),
        (dict(k=k[:, :, :64], v=v[:, :, :64], blk_kv=64), U),
        (dict(k=k[:, :, :64], v=v[:, :, :64]), ValueError),
        (dict(q=q.float()), TypeError),
        (dict(k=k.to(FP8), v=v.to(FP8)), TypeError),  # fp16 q + fp8 kv
        (dict(v=v.to(torch.bfloat16)), TypeError),
        (dict(page_table=pt.long()), TypeError),
        (dict(seqused_k=sk.long()), TypeError),
        (dict(page_table=pt[0]), ValueError),
        (dict(seqused_k=sk[:1]), ValueError),
        (dict(seqlen_q=0), ValueError),
        (dict(max_seqlen_k=0), ValueError),
        (dict(seqlen_q=2), ValueError),
        (dict(idx=idx.long()), TypeError),
        (dict(idx=idx[:1]), ValueError),
        (dict(idx=idx[:, :1]), ValueError),
        (dict(idx=torch.zeros(2, 2, 65, dtype=torch.int32, device=device)), ValueError),
        (dict(q=q[:, :7]), ValueError),
        (dict(q=q[:, :6]), U),
        (dict(softmax_scale=float("nan")), ValueError),
    ]
    for kw, exc in cases:
        with pytest.raises(exc):
            call(**kw)
    if device.type == "cpu":
        return
    with pytest.raises(ValueError):
        call(seqused_k=sk.cpu())


# ---------------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# ---------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
def test_opcheck(device):
    q, k, v, idx, pt, sk = make_problem([300, 129], hkv=2, g=4, topk=4, device=device)
    from torch.library import opcheck

    dec = msa.decode
    opcheck(dec._sparse_decode_fwd, (q, k, v, idx, pt, sk, None, None, 0, 128, 1, True, D ** -0.5, 3, True))
    opcheck(dec._sparse_decode_fwd, (q, k, v, None, pt, sk, None, None, 0, 128, 1, True, D ** -0.5, 3, False))
    w = plan_decode(pt, sk, 1, idx, 8, 2)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=device)
    opcheck(dec._sparse_decode_fwd_out, (q, k, v, idx, pt, sk, out, lse, w.O_partial, w._ml_partial, w._counter, 1,
                                         True, D ** -0.5, w._hint_blocks, True, 0, 0))


def test_compile_fullgraph(device):
    q, k, v, idx, pt, sk = make_problem([300, 700], hkv=2, g=4, topk=4, device=device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"

    def f(q, k, v, idx, pt, sk):
        o, l = msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=700,
                                            return_softmax_lse=True)
        return o * 2, l

    cf = torch.compile(f, fullgraph=True, backend=backend)
    o, l = cf(q, k, v, idx, pt, sk)
    o_e, l_e = f(q, k, v, idx, pt, sk)
    assert torch.equal(o, o_e) and torch.equal(l, l_e)


# ---------------------------------------------------------------------------------------------------
# GPU: bf16, long contexts, fp8, CUDA graphs
# ---------------------------------------------------------------------------------------------------


def sparse_ref_compact(q, k, v, idx, pt, sk, sq, *, causal=True, scale=None):
    """Float64 reference on the device that only gathers the selected blocks (long contexts)."""
    hkv = k.shape[1]
    t, hq, d = q.shape
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    o = torch.zeros(t, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.full((t, hq), -math.inf, dtype=torch.float64, device=q.device)
    sk_h = sk.cpu().tolist()
    idx_h = idx.cpu()
    for row in range(t):
        b, i = divmod(row, sq)
        lk = sk_h[b]
        nb = min(-(-lk // BS), pt.shape[1])
        lim = lk - sq + i if causal else lk - 1
        for gi in range(hkv):
            ids = sorted({int(j) for j in idx_h[gi, row].tolist() if 0 <= j < nb})
            if not ids:
                continue
            ids_t = torch.tensor(ids, device=q.device)
            pages = pt[b, ids_t].long()
            kk = k[pages, gi].double().reshape(-1, d)  # [n*128, D]
            vv = v[pages, gi].double().reshape(-1, d)
            x = (ids_t[:, None] * BS + torch.arange(BS, device=q.device)[None]).reshape(-1)
            ok = (x < lk) & (x <= lim)
            if not ok.any():
                continue
            qq = q[row, gi * g:(gi + 1) * g].double()
            s = scale * qq @ kk.t()
            s = s.masked_fill(~ok[None], -math.inf)
            m = s.amax(-1, keepdim=True)
            p = torch.exp(s - m)
            o[row, gi * g:(gi + 1) * g] = (p @ vv) / p.sum(-1, keepdim=True)
            lse[row, gi * g:(gi + 1) * g] = (m + torch.log(p.sum(-1, keepdim=True))).squeeze(-1)
    return o, lse


def check_compact(out, lse, q, k, v, idx, pt, sk, *, what="output"):
    """``out`` / ``lse`` of a one-token decode against ``sparse_ref_compact`` (the project thresholds)."""
    o_ref, lse_ref = sparse_ref_compact(q, k, v, idx, pt, sk, 1)
    assert_close_attn(out, o_ref, what=what)
    assert_lse_close(lse, lse_ref)


def gpu_generic_cases(*, empty_request=False):
    """The generic GPU sweep, as ``(lens, problem kwargs, seqlen_q, causal)``: every GQA ratio over ragged
    lengths (plus a zero-length request with ``empty_request``), multi-token causal and non-causal, and a dense
    70K-token problem (``ids="dense"``)."""
    ragged = [300, 4096, 1, 2000] + ([0] if empty_request else [])
    return ([(ragged, dict(hkv=2, g=g, topk=8), 1, True) for g in (1, 2, 4, 8, 16)]
            + [([3, 4096, 700], dict(hkv=4, g=16, sq=4, topk=16), 4, causal) for causal in (True, False)]
            + [([70000, 30], dict(hkv=4, g=16, ids="dense"), 1, True)])


def _gpu_problem(b, ctx, *, hkv=4, g=16, topk=16, sq=1, dtype=torch.bfloat16, pool_pages=None):
    """M3-shaped problem with a (possibly small, aliased) physical page pool and distinct valid ids."""
    dev = "cuda"
    maxp = -(-ctx // BS)
    pool = pool_pages or min(b * maxp + 4, 4096)
    k = torch.randn(pool, hkv, BS, D, dtype=dtype, device=dev)
    v = torch.randn(pool, hkv, BS, D, dtype=dtype, device=dev)
    pt = torch.randint(0, pool, (b, maxp), dtype=torch.int32, device=dev)
    lens = [ctx - (i * 37) % 200 for i in range(b)]
    sk = torch.tensor(lens, dtype=torch.int32, device=dev)
    rows = []
    for L in lens:
        nb = -(-L // BS)
        for _ in range(sq * hkv):
            r = torch.randperm(nb - 1)[: topk - 1] if nb > 1 else torch.empty(0, dtype=torch.long)
            r = torch.cat([r, torch.tensor([nb - 1])])  # local block last (M3 convention)
            r = torch.cat([r, torch.full((topk - r.numel(),), -1)])
            rows.append(r)
    idx = torch.stack(rows).view(b, sq, hkv, topk).permute(2, 0, 1, 3).reshape(hkv, b * sq, topk)
    idx = idx.contiguous().to(torch.int32).to(dev)
    q = torch.randn(b * sq, hkv * g, D, dtype=dtype, device=dev)
    return q, k, v, idx, pt, sk


@requires_cuda
@pytest.mark.parametrize("ctx", [32768, 65536, 131072])
@pytest.mark.parametrize("b", [1, 8, 64])
def test_gpu_bf16_long_context(b, ctx):
    if b == 64 and ctx > 32768:
        pytest.skip("covered by smaller batch")
    q, k, v, idx, pt, sk = _gpu_problem(b, ctx)
    out, lse = run_official(q, k, v, idx, pt, sk, 1)
    check_compact(out, lse, q, k, v, idx, pt, sk)


@requires_cuda
def test_gpu_one_million_tokens():
    q, k, v, idx, pt, sk = _gpu_problem(1, 1 << 20, pool_pages=1024)
    out, lse = run_official(q, k, v, idx, pt, sk, 1)
    check_compact(out, lse, q, k, v, idx, pt, sk)


@requires_cuda
def test_gpu_generic_cases_bf16():
    for lens, kw, sq, causal in gpu_generic_cases():
        q, k, v, idx, pt, sk = make_problem(lens, dtype=torch.bfloat16, device=torch.device("cuda"),
                                            strided=(kw["g"] == 8), **kw)
        out, lse = run_official(q, k, v, idx, pt, sk, sq, causal=causal)
        check(out, lse, q, k, v, idx, pt, sk, sq, causal=causal)


@requires_cuda
def test_gpu_fp8_kv_matches_widened():
    q, k, v, idx, pt, sk = _gpu_problem(8, 8192)
    k8, v8 = k.to(FP8), v.to(FP8)
    out8, lse8 = run_official(q, k8, v8, idx, pt, sk, 1)
    outw, lsew = run_official(q, k8.to(torch.bfloat16), v8.to(torch.bfloat16), idx, pt, sk, 1)
    # API: SHOULD be bitwise, MUST be within bf16 tolerance of the widened run (see decode.py docstring)
    if not (torch.equal(out8, outw) and torch.equal(lse8, lsew)):
        warnings.warn(f"fp8 KV not bitwise equal to widened bf16: max |dO| = "
                      f"{(out8.float() - outw.float()).abs().max().item():.3g}, max |dLSE| = "
                      f"{(lse8 - lsew).abs().max().item():.3g}")
    assert_close_attn(out8, outw.double(), what="fp8 vs widened")
    assert_lse_close(lse8, lsew.double())
    o_ref, lse_ref = sparse_ref_compact(q, k8.float(), v8.float(), idx, pt, sk, 1)
    assert_close_attn(out8, o_ref)
    # fp8 q/k/v -> bf16
    q8 = q.to(FP8)
    out, lse = run_official(q8, k8, v8, idx, pt, sk, 1)
    assert out.dtype == torch.bfloat16
    o_ref, lse_ref = sparse_ref_compact(q8.float(), k8.float(), v8.float(), idx, pt, sk, 1)
    assert (out.double() - o_ref.to(torch.bfloat16).double()).abs().max() <= 0.125
    assert_lse_close(lse, lse_ref, atol=2e-3, rtol=2e-3)


@requires_cuda
@pytest.mark.parametrize("b", [1, 8, 64])
def test_gpu_deterministic(b):
    q, k, v, idx, pt, sk = _gpu_problem(b, 16384)
    outs = [run_official(q, k, v, idx, pt, sk, 1) for _ in range(3)]
    for o, l in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(l, outs[0][1])


def replay_check(make_call, q, k, v, idx, pt, sk, b):
    """Capture ``make_call`` (returns ``(out, lse)``; after a warm-up) in a CUDA graph, then for 3 steps write a
    new ``_gpu_problem`` (8K, 12K, 16K tokens) into q / idx / pt / sk in place, poison the outputs, replay, and
    check against ``sparse_ref_compact`` on ``k`` / ``v`` (the caches, or their float dequantisation: pages
    ``[P, Hkv, 128, 128]``) and bit for bit against an eager call."""
    graph, res = capture_cuda_graph(make_call)

    def refill(step):
        new = _gpu_problem(b, 8192 + 4096 * step)
        maxp = new[4].shape[1]
        pt.zero_()
        pt[:, :maxp].copy_(new[4] % k.shape[0])
        sk.copy_(new[5])
        idx.copy_(new[3])
        q.copy_(new[0])

    replay_steps(graph, res, refill, lambda what: check_compact(*res, q, k, v, idx, pt, sk, what=what), make_call,
                 steps=range(3))


def wrapper_replay_check(q, k, v, idx, pt, sk, b, k_ref, v_ref):
    """``replay_check`` of ``SparseDecodePagedAttentionWrapper.run(out=, lse=)`` (planned once with
    ``enable_cuda_graph``) on the caches k / v; ``k_ref`` / ``v_ref``: their float values for the reference."""
    w = plan_decode(pt, sk, 1, idx, q.shape[1], k_ref.shape[1], enable_cuda_graph=True)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device="cuda")
    replay_check(lambda: w.run(q, k, v, return_softmax_lse=True, out=out, lse=lse), q, k_ref, v_ref, idx, pt, sk, b)


@requires_cuda
@pytest.mark.parametrize("b", [1, 8])
def test_gpu_cuda_graph_functional(b):
    q, k, v, idx, pt, sk = _gpu_problem(b, 16384)
    replay_check(lambda: run_official(q, k, v, idx, pt, sk, 1, max_seqlen_k=16384), q, k, v, idx, pt, sk, b)


@requires_cuda
@pytest.mark.parametrize("b", [1, 8])
def test_gpu_cuda_graph_wrapper(b):
    q, k, v, idx, pt, sk = _gpu_problem(b, 16384)
    wrapper_replay_check(q, k, v, idx, pt, sk, b, k, v)


@requires_cuda
def test_gpu_wrapper_out_lse_bitwise():
    q, k, v, idx, pt, sk = _gpu_problem(8, 32768)
    w = plan_decode(pt, sk, 1, idx, 64, 4)
    out_f, lse_f = run_official(q, k, v, idx, pt, sk, 1)
    out_w, lse_w = w.run(q, k, v, return_softmax_lse=True)
    assert torch.equal(out_f, out_w) and torch.equal(lse_f, lse_w)


def fuzz_configs(seed, trials, *, max_topk, max_len, max_batch, max_split):
    """``trials`` random small decode configurations from a generator seeded with ``seed``: namespaces with
    ``g`` (GQA ratio), ``hkv``, ``sq`` (seqlen_q, 1..3), ``topk`` (1..max_topk), ``lens`` (1..max_batch KV lengths
    in [0, max_len]), ``causal`` and ``split`` (``fixed_split_size``, 1..max_split)."""
    gen = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for _ in range(trials):
        g = [1, 2, 4, 8, 16][r(0, 4)]
        hkv = r(1, 2)
        sq = r(1, 3)
        topk = r(1, max_topk)
        lens = [r(0, max_len) for _ in range(r(1, max_batch))]
        causal = bool(r(0, 1))
        yield SimpleNamespace(g=g, hkv=hkv, sq=sq, topk=topk, lens=lens, causal=causal, split=r(1, max_split))


def test_fuzz_small(device):
    """Random small configurations (G, seqlen_q, causal, topK, lengths, split counts) vs the reference."""
    for trial, c in enumerate(fuzz_configs(1234, 6, max_topk=7, max_len=700, max_batch=3, max_split=3)):
        q, k, v, idx, pt, sk = make_problem(c.lens, hkv=c.hkv, g=c.g, sq=c.sq, topk=c.topk, device=device,
                                            ids="dense" if trial == 5 else "messy", strided=bool(trial % 2))
        w = plan_decode(pt, sk, c.sq, idx, c.hkv * c.g, c.hkv, causal=c.causal, fixed_split_size=c.split)
        out, lse = w.run(q, k, v, return_softmax_lse=True)
        check(out, lse, q, k, v, idx, pt, sk, c.sq, causal=c.causal)
