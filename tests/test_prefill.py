"""sparse_atten_func (API.md 5.5) against the float64 reference (tests/reference.py)."""

import math

import pytest
import torch

from .helpers import assert_close_attn, assert_lse_close, msa, owner_ref, poison_like, requires_cuda
from .reference import attention_ref, csr_block_mask, q2k_block_mask, visible_from_blocks

FP8 = torch.float8_e4m3fn


def cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def random_q2k(lq, lk, hkv, topk, kind="random", run=64):
    """[Hkv, total_q, topK] int32 batch-local ids. 'random': ids in [-1, nb+1]; 'm3': local block + random
    earlier blocks constant over runs of ``run`` tokens."""
    rows = []
    for lq_b, lk_b in zip(lq, lk):
        nb = -(-lk_b // 128)
        if kind == "random":
            rows.append(torch.randint(-1, nb + 2, (hkv, lq_b, topk), dtype=torch.int32))
            continue
        r = torch.full((hkv, lq_b, topk), -1, dtype=torch.int32)
        local = ((torch.arange(lq_b) + lk_b - lq_b).clamp_min(0) // 128).to(torch.int32)
        for g in range(hkv):
            for s in range(0, lq_b, run):
                e = min(s + run, lq_b)
                loc = int(local[s])
                cand = torch.randperm(loc)[:topk - 1].to(torch.int32) if loc > 0 else torch.empty(0, dtype=torch.int32)
                r[g, s:e, 0] = local[s:e]
                r[g, s:e, 1:1 + cand.numel()] = cand
        rows.append(r)
    return torch.cat(rows, 1) if rows else torch.zeros((hkv, 0, topk), dtype=torch.int32)


def make_inputs(lq, lk, hq, hkv, topk, dtype, device, *, kind="random", kv_dtype=None):
    total_q, total_k = sum(lq), sum(lk)
    q = torch.randn(total_q, hq, 128, device=device).to(dtype)
    kvd = kv_dtype or dtype
    k = torch.randn(total_k, hkv, 128, device=device).to(kvd)
    v = torch.randn(total_k, hkv, 128, device=device).to(kvd)
    q2k = random_q2k(lq, lk, hkv, topk, kind).to(device)
    cu_q, cu_k = cu(lq, device), cu(lk, device)
    rp, qi = msa.build_k2q_csr(q2k, cu_q, cu_k, 128, total_k=total_k)
    return dict(q=q, k=k, v=v, q2k=q2k, cu_q=cu_q, cu_k=cu_k, rp=rp, qi=qi, lq=lq, lk=lk, topk=topk)


def to_paged(k, v, lk, cu_k, *, extra_pages=2, extra_cols=1):
    """Scatter dense varlen K/V into a shuffled NHD page pool; return the permuted HND views + page table."""
    B = len(lk)
    mp = max([-(-x // 128) for x in lk] + [1]) + extra_cols
    P = B * mp + extra_pages
    hkv = k.shape[1]
    perm = torch.randperm(P, device=k.device)[:B * mp].view(B, mp).to(torch.int32)
    kc = torch.randn(P * 128, hkv, 128, device=k.device).to(k.dtype)
    vc = torch.randn(P * 128, hkv, 128, device=k.device).to(v.dtype)
    cks = cu_k.tolist()
    for b in range(B):
        for p in range(-(-lk[b] // 128)):
            n = min(128, lk[b] - 128 * p)
            dst = int(perm[b, p]) * 128
            kc[dst:dst + n] = k[cks[b] + 128 * p: cks[b] + 128 * p + n]
            vc[dst:dst + n] = v[cks[b] + 128 * p: cks[b] + 128 * p + n]
    kp = kc.view(P, 128, hkv, 128).permute(0, 2, 1, 3)
    vp = vc.view(P, 128, hkv, 128).permute(0, 2, 1, 3)
    return kp, vp, perm


def call(inp, *, causal=True, paged=None, **kw):
    args = dict(cu_seqlens_q=inp["cu_q"], cu_seqlens_k=inp["cu_k"], max_seqlen_q=max(inp["lq"] + [1]),
                max_seqlen_k=max(inp["lk"] + [1]), causal=causal, return_softmax_lse=True)
    args.update(kw)
    k, v = inp["k"], inp["v"]
    if paged is not None:
        k, v, args["page_table"] = paged[0], paged[1], paged[2]
        if len(paged) > 3:
            args["seqused_k"] = paged[3]
    return msa.sparse_atten_func(inp["q"], k, v, inp["rp"], inp["qi"], inp["topk"], **args)


def reference(inp, *, causal=True, scale=None, tau=None, rows=None, from_csr=False, lk_override=None):
    """Per-request float64 reference; ``rows`` = optional global token subset (sorted list)."""
    cq, ck = inp["cu_q"].tolist(), inp["cu_k"].tolist()
    scale = 128 ** -0.5 if scale is None else scale
    outs, lses, lsets, idx = [], [], [], []
    for b in range(len(inp["lq"])):
        qs, qe, ks = cq[b], cq[b + 1], ck[b]
        lk = inp["lk"][b] if lk_override is None else lk_override[b]
        nb = -(-lk // 128)
        loc = list(range(qe - qs)) if rows is None else [t - qs for t in rows if qs <= t < qe]
        if not loc:
            continue
        if from_csr:
            bm = csr_block_mask(inp["rp"], inp["qi"], cq, ck, b, nb)
        else:
            bm = q2k_block_mask(inp["q2k"][:, qs:qe].cpu(), nb)
        vis = visible_from_blocks(bm, qe - qs, lk, causal=causal)[:, loc]
        li = torch.tensor(loc)
        o, lse, lse_t = attention_ref(inp["q"][qs:qe][li.to(inp["q"].device)], inp["k"][ks:ks + lk],
                                      inp["v"][ks:ks + lk], vis, scale, tau=tau)
        outs.append(o.cpu())
        lses.append(lse.cpu())
        if tau is not None:
            lsets.append(lse_t.cpu())
        idx += [qs + i for i in loc]
    hq = inp["q"].shape[1]
    if not outs:
        return torch.zeros(0, hq, 128, dtype=torch.float64), torch.zeros(0, hq, dtype=torch.float64), None, []
    return torch.cat(outs), torch.cat(lses), (torch.cat(lsets) if tau is not None else None), idx


def check(out, lse, inp, *, atol, causal=True, rows=None, from_csr=False, lse_atol=1e-3, **kw):
    o_ref, l_ref, _, idx = reference(inp, causal=causal, rows=rows, from_csr=from_csr, **kw)
    if not idx:
        return
    o = out.cpu()[idx]
    l_ = lse.cpu()[idx]
    empty = torch.isneginf(l_ref)
    if empty.any():
        assert (o.double()[empty] == 0).all(), "empty rows must give O == 0"
    assert_close_attn(o, o_ref, atol=atol)
    assert_lse_close(l_, l_ref, atol=lse_atol, rtol=lse_atol)


FP16_ATOL = 2e-3
BF16_ATOL = 1e-2


# ------------------------------------------------------------------------------------------------
# CPU / interpreter (fp16) and any device
# ------------------------------------------------------------------------------------------------

@pytest.mark.kernels_ci
@pytest.mark.parametrize("lq,lk,hq,hkv,topk,causal", [
    ([1], [128], 2, 1, 2, True),
    ([37], [300], 4, 2, 3, False),
    ([37], [300], 4, 2, 3, True),
    ([130], [260], 2, 2, 2, True),
    ([5, 0, 20, 50], [300, 100, 40, 30], 2, 1, 3, True),   # empty request, Lq > Lk (causal rows see nothing)
    ([5, 20], [0, 200], 4, 4, 2, False),                   # request without KV
])
def test_prefill_dense_small(device, lq, lk, hq, hkv, topk, causal):
    inp = make_inputs(lq, lk, hq, hkv, topk, torch.float16, device)
    out, lse = call(inp, causal=causal)
    assert out.dtype == torch.float16 and out.shape == inp["q"].shape and lse.dtype == torch.float32
    check(out, lse, inp, atol=FP16_ATOL, causal=causal)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_paged_equals_dense(device, causal):
    lq, lk = [9, 30], [300, 200]
    inp = make_inputs(lq, lk, 4, 2, 3, torch.float16, device)
    dense = call(inp, causal=causal)
    kp, vp, pt = to_paged(inp["k"], inp["v"], lk, inp["cu_k"])
    assert not kp.is_contiguous()
    paged = call(inp, causal=causal, paged=(kp, vp, pt, torch.tensor(lk, dtype=torch.int32, device=device)))
    assert torch.equal(dense[0], paged[0]) and torch.equal(dense[1], paged[1])
    check(paged[0], paged[1], inp, atol=FP16_ATOL, causal=causal)


@pytest.mark.kernels_ci
def test_prefill_paged_without_seqused_and_page_bound(device):
    # Lk_b = max_pages*128 without seqused_k; ids >= max_pages are masked
    lq, lk = [6, 7], [256, 256]
    inp = make_inputs(lq, lk, 2, 1, 3, torch.float16, device)
    kp, vp, pt = to_paged(inp["k"], inp["v"], lk, inp["cu_k"], extra_cols=0)
    out, lse = call(inp, causal=False, paged=(kp, vp, pt))
    check(out, lse, inp, atol=FP16_ATOL, causal=False)
    # a wider table: Lk_b = 3*128 tokens (the third page is real memory, not the dense K/V)
    inp3 = make_inputs([5], [384], 2, 1, 4, torch.float16, device)
    kp3, vp3, pt3 = to_paged(inp3["k"], inp3["v"], [384], inp3["cu_k"], extra_cols=0)
    out3, lse3 = call(inp3, causal=True, paged=(kp3, vp3, pt3[:, :2]))  # only 2 pages: block 2 masked
    check(out3, lse3, inp3, atol=FP16_ATOL, causal=True, lk_override=[256])


@pytest.mark.kernels_ci
@pytest.mark.parametrize("G", [1, 2, 4, 8, 16])
def test_prefill_gqa(device, G):
    inp = make_inputs([6, 3], [200, 140], G, 1, 2, torch.float16, device)
    out, lse = call(inp, causal=True)
    check(out, lse, inp, atol=FP16_ATOL)


@pytest.mark.kernels_ci
def test_prefill_csr_set_semantics(device):
    lq, lk = [5, 4], [300, 200]   # R = (3, 2): rows (0,0)0 (1,0)1 (0,1)2 (1,1)3 (0,2)4
    inp = make_inputs(lq, lk, 2, 1, 4, torch.float16, device)
    # hand-made CSR for one KV head: duplicates, unsorted rows, negative / >= Lq entries,
    # row pointer beyond the array (clamped) and rows >= T
    qi = torch.tensor([[3, 0, 3, 3, -1, 7, 1, 1, 2, 0, 4, 0, 2, 5, 2, 9, 4, 4, -5, 1] + [-1] * 14 + [2, 3]],
                      dtype=torch.int32)  # 36 = total_q*topK columns; row 4 reaches the (clamped) end
    rp = torch.tensor([[0, 6, 9, 13, 17, 999]], dtype=torch.int32)
    inp.update(rp=rp.to(device), qi=qi.to(device), topk=4)
    out, lse = call(inp, causal=False)
    check(out, lse, inp, atol=FP16_ATOL, causal=False, from_csr=True)
    # fewer rows than requests have (T = 2): rows >= T are simply absent
    inp.update(rp=rp[:, :3].contiguous().to(device))
    out, lse = call(inp, causal=True)
    check(out, lse, inp, atol=FP16_ATOL, causal=True, from_csr=True)


@pytest.mark.kernels_ci
def test_prefill_empty_rows(device):
    inp = make_inputs([7, 3], [300, 130], 4, 2, 2, torch.float16, device)
    inp["q2k"].fill_(-1)
    inp["q2k"][:, 2, 0] = 0     # a single token with one block
    inp["rp"], inp["qi"] = msa.build_k2q_csr(inp["q2k"], inp["cu_q"], inp["cu_k"], 128, total_k=430)
    out, lse = call(inp, causal=True)
    empty = torch.ones(10, dtype=torch.bool)
    empty[2] = False
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    check(out, lse, inp, atol=FP16_ATOL)


@pytest.mark.kernels_ci
def test_prefill_temperature_lse_and_scale(device):
    inp = make_inputs([9], [300], 4, 2, 3, torch.float16, device)
    out, lse, lse_t = call(inp, causal=True, return_temperature_lse=True, lse_temperature_scale=0.7,
                           softmax_scale=0.05)
    o_ref, l_ref, lt_ref, _ = reference(inp, causal=True, scale=0.05, tau=0.7)
    assert_close_attn(out.cpu(), o_ref, atol=FP16_ATOL)
    assert_lse_close(lse.cpu(), l_ref)
    assert_lse_close(lse_t.cpu(), lt_ref)
    o1, l1, lt1 = call(inp, causal=True, return_temperature_lse=True, lse_temperature_scale=1.0 + 1e-13)
    assert lt1 is l1
    o2 = call(inp, causal=True, return_softmax_lse=False)
    assert isinstance(o2, torch.Tensor) and torch.equal(o2, o1)


@pytest.mark.kernels_ci
def test_prefill_default_noncausal_and_advisory_args(device):
    inp = make_inputs([8], [256], 2, 2, 2, torch.float16, device)
    a = msa.sparse_atten_func(inp["q"], inp["k"], inp["v"], inp["rp"], inp["qi"], 2, cu_seqlens_q=inp["cu_q"],
                              cu_seqlens_k=inp["cu_k"], max_seqlen_q=8, max_seqlen_k=256)
    b = call(inp, causal=False, partial_dtype=torch.float32, schedule=object(), usable_SM_count=7,
             qk_dtype=torch.float16, pv_dtype=torch.float16)[0]
    assert torch.equal(a, b)
    check(a, call(inp, causal=False)[1], inp, atol=FP16_ATOL, causal=False)


@pytest.mark.kernels_ci
def test_prefill_empty_batch(device):
    inp = make_inputs([], [], 2, 1, 2, torch.float16, device)
    out, lse = call(inp)
    assert out.shape == (0, 2, 128) and lse.shape == (0, 2)


@pytest.mark.kernels_ci
def test_prefill_noncontiguous_q(device):
    inp = make_inputs([12], [260], 4, 2, 3, torch.float16, device)
    qt = inp["q"].transpose(0, 1).contiguous().transpose(0, 1)
    ref = call(inp)
    inp2 = dict(inp, q=qt)
    got = call(inp2)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.kernels_ci
def test_prefill_errors(device):
    inp = make_inputs([4], [256], 4, 2, 2, torch.float16, device)
    q, k, v, rp, qi, cq, ck = (inp[n] for n in ("q", "k", "v", "rp", "qi", "cu_q", "cu_k"))

    def f(q=q, k=k, v=v, rp=rp, qi=qi, topk=2, **kw):
        a = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=256)
        a.update(kw)
        return msa.sparse_atten_func(q, k, v, rp, qi, topk, **a)

    with pytest.raises(ValueError):
        f(q=q[0])
    with pytest.raises(TypeError):
        f(q=q.float())
    with pytest.raises(TypeError):
        f(k=k.float(), v=v.float())
    with pytest.raises(TypeError):
        f(v=v.to(torch.bfloat16))
    with pytest.raises(TypeError):          # fp16 q with fp8 kv
        f(k=k.to(FP8), v=v.to(FP8))
    with pytest.raises(ValueError):
        f(k=k[..., :64], v=v[..., :64])
    with pytest.raises(msa.MsaUnsupportedError):
        f(q=q[..., :64], k=k[..., :64], v=v[..., :64])
    with pytest.raises(ValueError):
        f(q=q[:, :3])                         # Hq % Hkv
    with pytest.raises(msa.MsaUnsupportedError):
        f(q=torch.zeros(4, 64, 128, dtype=q.dtype, device=q.device))   # G = 32
    with pytest.raises(TypeError):
        f(rp=rp.long())
    with pytest.raises(TypeError):
        f(qi=qi.long())
    with pytest.raises(ValueError):
        f(rp=rp[0])
    with pytest.raises(ValueError):
        f(qi=qi[:1])                          # head dim != Hkv
    with pytest.raises(ValueError):
        f(qi=qi[:, :7])                       # < total_q*topK
    with pytest.raises(ValueError):
        f(rp=rp[:, :0])
    with pytest.raises(TypeError):
        f(cu_seqlens_q=cq.long())
    with pytest.raises(ValueError):
        f(cu_seqlens_q=cq[:0], cu_seqlens_k=ck[:0])
    with pytest.raises(ValueError):
        f(cu_seqlens_k=torch.zeros(3, dtype=torch.int32, device=q.device))
    with pytest.raises(ValueError, match="seqused_k is only supported together with page_table"):
        f(seqused_k=torch.tensor([256], dtype=torch.int32, device=q.device))
    with pytest.raises(ValueError):
        f(k=k[:, :1], v=v[:, :1].contiguous())   # k shape != [total_k, Hkv, 128] vs q heads -> Hkv mismatch
    with pytest.raises(ValueError):
        f(v=v[:100])
    with pytest.raises(msa.MsaUnsupportedError):
        f(blk_kv=64)
    kp, vp, pt = to_paged(k, v, [256], ck)
    with pytest.raises(TypeError):
        f(k=kp, v=vp, page_table=pt.long())
    with pytest.raises(ValueError):
        f(k=kp, v=vp, page_table=pt[0])
    with pytest.raises(ValueError):
        f(k=kp, v=vp, page_table=torch.cat([pt, pt]))
    with pytest.raises(ValueError):
        f(k=kp[0], v=vp[0], page_table=pt)
    with pytest.raises(ValueError):
        f(k=kp, v=vp[:-1], page_table=pt)
    with pytest.raises(ValueError):
        f(k=kp[:, :, :64], v=vp[:, :, :64], page_table=pt)
    with pytest.raises(msa.MsaUnsupportedError):
        f(k=kp[:, :, :64], v=vp[:, :, :64], page_table=pt, blk_kv=64)
    with pytest.raises(TypeError):
        f(k=kp, v=vp, page_table=pt, seqused_k=torch.tensor([256], device=q.device))
    with pytest.raises(ValueError):
        f(k=kp, v=vp, page_table=pt, seqused_k=torch.tensor([256, 1], dtype=torch.int32, device=q.device))
    for bad in (0, 65):
        with pytest.raises(ValueError):
            f(topk=bad)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            f(lse_temperature_scale=bad)
    with pytest.raises(ValueError):
        f(return_temperature_lse=True)
    with pytest.raises(TypeError):
        f(partial_dtype=torch.int32)
    with pytest.raises(TypeError):
        f(qk_dtype=torch.float32)
    with pytest.raises(ValueError):
        f(qk_dtype=torch.bfloat16)
    with pytest.raises(TypeError):
        f(pv_dtype=torch.float32)
    with pytest.raises(ValueError):
        f(pv_dtype=torch.bfloat16)
    if torch.cuda.is_available():
        with pytest.raises(ValueError):
            f(rp=rp.cpu())


# ------------------------------------------------------------------------------------------------
# Query rows outside cu_seqlens_q / odd cu_seqlens_q (docs/POLICIES.md): O = 0, LSE = -inf, never
# uninitialised; rows computed from their owner request only
# ------------------------------------------------------------------------------------------------


def odd_inputs(cuq, lk, total_q, hq, hkv, topk, dtype, device, *, kind="random", kv_dtype=None):
    """Inputs with an arbitrary ``cu_seqlens_q`` (gaps, overlaps, out of range) and dense KV of lengths ``lk``;
    the CSR is ``build_k2q_csr`` of random per-token ids (ids in [-1, max nb + 1])."""
    cu_k = cu(lk, device)
    total_k = sum(lk)
    nbmax = max([-(-x // 128) for x in lk] + [1])
    q = torch.randn(total_q, hq, 128, device=device).to(dtype)
    k = torch.randn(total_k, hkv, 128, device=device).to(kv_dtype or dtype)
    v = torch.randn(total_k, hkv, 128, device=device).to(kv_dtype or dtype)
    if kind == "random":
        q2k = torch.randint(-1, nbmax + 2, (hkv, total_q, topk), dtype=torch.int32)
    else:  # every token selects blocks 0 .. topK-1 (dense-ish: most rows non-empty)
        q2k = torch.arange(topk, dtype=torch.int32).view(1, 1, -1).expand(hkv, total_q, topk).contiguous()
    cu_q = torch.tensor(cuq, dtype=torch.int32, device=device)
    rp, qi = msa.build_k2q_csr(q2k.to(device), cu_q, cu_k, 128, total_k=total_k)
    return dict(q=q, k=k, v=v, q2k=q2k, cu_q=cu_q, cu_k=cu_k, rp=rp, qi=qi, lq=None, lk=list(lk), topk=topk,
                cuq=list(cuq))


def owner_reference(inp, *, causal, scale=None, tau=None, rows=None):
    """float64 reference for any cu_seqlens_q: row t from its owner request b (local i = t - cu_q[b], Lq_b =
    cu_q[b+1] - cu_q[b], the CSR set semantics of b, Lk_b from cu_seqlens_k); rows without owner O = 0,
    LSE = LSE_T = -inf. ``rows``: compute only these owned rows (the others stay 0 / -inf). Returns
    (O, LSE, LSE_T, owned row list)."""
    cq, ck = inp["cuq"], inp["cu_k"].tolist()
    scale = 128 ** -0.5 if scale is None else scale
    total_q, hq, _ = inp["q"].shape
    o = torch.zeros(total_q, hq, 128, dtype=torch.float64)
    lse = torch.full((total_q, hq), -math.inf, dtype=torch.float64)
    lset = torch.full((total_q, hq), -math.inf, dtype=torch.float64)
    vis_of, owned = {}, []
    for t in range(total_q):
        b = owner_ref(cq, t)
        if b is None:
            continue
        owned.append(t)
        if rows is not None and t not in rows:
            continue
        lq, lk, ks = cq[b + 1] - cq[b], ck[b + 1] - ck[b], ck[b]
        if b not in vis_of:
            bm = csr_block_mask(inp["rp"], inp["qi"], cq, ck, b, -(-lk // 128))
            vis_of[b] = visible_from_blocks(bm, lq, lk, causal=causal)
        i = t - cq[b]
        ot, lt, ltt = attention_ref(inp["q"][t:t + 1], inp["k"][ks:ks + lk], inp["v"][ks:ks + lk],
                                    vis_of[b][:, i:i + 1], scale, tau=tau)
        o[t], lse[t] = ot[0].cpu(), lt[0].cpu()
        if tau is not None:
            lset[t] = ltt[0].cpu()
    return o, lse, lset, owned


def check_all_rows(out, lse, inp, *, causal, atol, lse_atol=1e-3, lse_t=None, tau=None, scale=None):
    """Every row: owned rows against the reference, the others exactly O = 0 and LSE (LSE_T) = -inf."""
    o_ref, l_ref, lt_ref, owned = owner_reference(inp, causal=causal, tau=tau, scale=scale)
    out, lse = out.cpu(), lse.cpu()
    unowned = [t for t in range(out.shape[0]) if t not in set(owned)]
    if unowned:
        assert (out[unowned] == 0).all(), "rows without a request must be exactly 0"
        assert torch.isneginf(lse[unowned]).all(), "rows without a request must have LSE = -inf"
        if lse_t is not None:
            assert torch.isneginf(lse_t.cpu()[unowned]).all(), "rows without a request must have LSE_T = -inf"
    assert_close_attn(out, o_ref, atol=atol)  # all rows (unowned: 0 vs 0); also checks every value is finite
    assert_lse_close(lse, l_ref, atol=lse_atol, rtol=lse_atol)
    if lse_t is not None:
        assert_lse_close(lse_t.cpu(), lt_ref, atol=lse_atol, rtol=lse_atol)
    return owned, unowned


def call_odd(inp, *, causal, paged=None, **kw):
    args = dict(cu_seqlens_q=inp["cu_q"], cu_seqlens_k=inp["cu_k"], max_seqlen_q=inp["q"].shape[0],
                max_seqlen_k=max(inp["lk"] + [1]), causal=causal, return_softmax_lse=True)
    args.update(kw)
    k, v = inp["k"], inp["v"]
    if paged is not None:
        k, v, args["page_table"], args["seqused_k"] = paged
    return msa.sparse_atten_func(inp["q"], k, v, inp["rp"], inp["qi"], inp["topk"], **args)


ODD_CU_Q = [
    # (cu_seqlens_q, KV lengths, total_q)
    ([3, 9, 14], [300, 200], 18),            # rows before cu_q[0] and after cu_q[-1]
    ([0, 6], [260], 11),                     # cu_q[-1] < total_q
    ([0, 8, 4, 12], [300, 200, 200], 14),    # decreasing step: overlapping ranges (+ rows after the end)
    ([5, 2, 9, 9, 13], [200, 140, 0, 300], 15),  # negative first length, empty request, gap at 0..1
    ([-5, 6, 10], [200, 300], 12),           # negative start (rows 0..5 are tokens 5..10 of request 0)
    ([0, 7, 30], [150, 300], 10),            # cu_q[-1] > total_q
]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("cuq,lk,total_q", ODD_CU_Q)
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_rows_outside_requests(device, cuq, lk, total_q, causal):
    """Rows outside cu_seqlens_q (and rows an overlapping request does not own) give O = 0, LSE = -inf; owned
    rows equal the float64 reference of their owner request (they used to be uninitialised memory)."""
    inp = odd_inputs(cuq, lk, total_q, 4, 2, 3, torch.float16, device)
    out, lse = call_odd(inp, causal=causal)
    check_all_rows(out, lse, inp, causal=causal, atol=FP16_ATOL)


@pytest.mark.kernels_ci
def test_prefill_rows_outside_requests_paged_tau_gqa(device):
    """Paged KV, temperature LSE and G = 8: the same rows are zero / -inf (LSE_T too), owned rows exact."""
    cuq, lk, total_q = [2, 7, 5, 12], [300, 130, 250], 15
    inp = odd_inputs(cuq, lk, total_q, 8, 1, 3, torch.float16, device)
    kp, vp, pt = to_paged(inp["k"], inp["v"], lk, inp["cu_k"])
    sequ = torch.tensor(lk, dtype=torch.int32, device=device)
    out, lse, lse_t = call_odd(inp, causal=True, paged=(kp, vp, pt, sequ), return_temperature_lse=True,
                               lse_temperature_scale=0.6)
    check_all_rows(out, lse, inp, causal=True, atol=FP16_ATOL, lse_t=lse_t, tau=0.6)
    dense = call_odd(inp, causal=True, return_temperature_lse=True, lse_temperature_scale=0.6)
    assert all(torch.equal(a, b) for a, b in zip(dense, (out, lse, lse_t)))


@pytest.mark.kernels_ci
def test_prefill_whole_batch_outside_and_empty_requests(device):
    """cu_seqlens_q entirely past total_q, or all requests empty: every row is 0 / -inf."""
    for cuq in ([20, 30], [0, 0, 0], [4, 4]):
        inp = odd_inputs(cuq, [200] * (len(cuq) - 1), 9, 2, 1, 2, torch.float16, device, kind="dense")
        out, lse = call_odd(inp, causal=False)
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.kernels_ci
def test_prefill_opcheck_and_compile(device):
    inp = make_inputs([3], [200], 2, 1, 2, torch.float16, device)
    op = msa.prefill._sparse_prefill_op
    args = (inp["q"], inp["k"], inp["v"], inp["rp"], inp["qi"], inp["cu_q"], inp["cu_k"], None, None, 2, True,
            0.08, 0.5, True)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def fn(q, k, v, rp, qi, cq, ck):
        return msa.sparse_atten_func(q, k, v, rp, qi, 2, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=3,
                                     max_seqlen_k=200, causal=True, return_softmax_lse=True)

    a = (inp["q"], inp["k"], inp["v"], inp["rp"], inp["qi"], inp["cu_q"], inp["cu_k"])
    got = torch.compile(fn, fullgraph=True, backend="eager")(*a)
    ref = fn(*a)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ------------------------------------------------------------------------------------------------
# GPU (bf16, big shapes)
# ------------------------------------------------------------------------------------------------

def subset_rows(total, n, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return sorted(torch.randperm(total, generator=g)[:n].tolist())


@requires_cuda
@pytest.mark.parametrize("sq,sk", [(8192, 8192), (4096, 8192), (8192, 4096)])
@pytest.mark.parametrize("kind", ["m3", "random"])
def test_prefill_gpu_big(cuda_device, sq, sk, kind):
    inp = make_inputs([sq], [sk], 64, 4, 16, torch.bfloat16, cuda_device, kind=kind)
    out, lse = call(inp, causal=True)
    rows = subset_rows(sq, 96) + [0, sq - 1]
    check(out, lse, inp, atol=BF16_ATOL, rows=sorted(set(rows)))


@requires_cuda
@pytest.mark.parametrize("G", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_gpu_ragged_gqa_paged(cuda_device, G, causal):
    lq, lk = [300, 0, 1000, 77, 512], [700, 50, 1000, 2000, 512]
    hkv = 2
    inp = make_inputs(lq, lk, G * hkv, hkv, 8, torch.bfloat16, cuda_device, kind="m3")
    dense = call(inp, causal=causal)
    kp, vp, pt = to_paged(inp["k"], inp["v"], lk, inp["cu_k"])
    paged = call(inp, causal=causal, paged=(kp, vp, pt, torch.tensor(lk, dtype=torch.int32, device=cuda_device)))
    assert torch.equal(dense[0], paged[0]) and torch.equal(dense[1], paged[1])
    rows = subset_rows(sum(lq), 128)
    check(dense[0], dense[1], inp, atol=BF16_ATOL, causal=causal, rows=rows)


@requires_cuda
@pytest.mark.parametrize("topk", [1, 4, 64])
def test_prefill_gpu_topk(cuda_device, topk):
    inp = make_inputs([2000], [9000], 16, 2, topk, torch.bfloat16, cuda_device, kind="random")
    out, lse = call(inp, causal=True)
    check(out, lse, inp, atol=BF16_ATOL, rows=subset_rows(2000, 64))


@requires_cuda
def test_prefill_gpu_fp8_kv_equals_widened(cuda_device):
    inp = make_inputs([1500, 700], [3000, 700], 32, 4, 16, torch.bfloat16, cuda_device, kind="m3",
                      kv_dtype=FP8)
    out8 = call(inp, causal=True)
    wide = dict(inp, k=inp["k"].to(torch.bfloat16), v=inp["v"].to(torch.bfloat16))
    outw = call(wide, causal=True)
    assert torch.equal(out8[0], outw[0]) and torch.equal(out8[1], outw[1])
    check(outw[0], outw[1], wide, atol=BF16_ATOL, rows=subset_rows(2200, 64))


@requires_cuda
def test_prefill_gpu_fp8_qkv(cuda_device):
    inp = make_inputs([1024], [2048], 16, 2, 8, FP8, cuda_device, kind="m3")
    out, lse = call(inp, causal=True)
    assert out.dtype == torch.bfloat16
    o_ref, l_ref, _, idx = reference(inp, causal=True, rows=subset_rows(1024, 64))
    err = (out.cpu()[idx].double() - o_ref.to(torch.bfloat16).double()).abs().max().item()
    assert err <= 0.125
    assert_lse_close(lse.cpu()[idx], l_ref, atol=2e-3, rtol=2e-3)


@requires_cuda
def test_prefill_gpu_temperature(cuda_device):
    inp = make_inputs([3000], [3000], 16, 2, 16, torch.bfloat16, cuda_device, kind="m3")
    out, lse, lse_t = call(inp, causal=True, return_temperature_lse=True, lse_temperature_scale=1.7)
    rows = subset_rows(3000, 64)
    _, l_ref, lt_ref, idx = reference(inp, causal=True, tau=1.7, rows=rows)
    assert_lse_close(lse.cpu()[idx], l_ref)
    assert_lse_close(lse_t.cpu()[idx], lt_ref)


@requires_cuda
def test_prefill_gpu_graph_and_determinism(cuda_device):
    lq = lk = [4096]
    inp = make_inputs(lq, lk, 64, 4, 16, torch.bfloat16, cuda_device, kind="m3")
    first = call(inp, causal=True)
    second = call(inp, causal=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    q2k = inp["q2k"]

    def step():
        rp, qi = msa.build_k2q_csr(q2k, inp["cu_q"], inp["cu_k"], 128, total_k=4096, max_seqlen_k=4096)
        return msa.sparse_atten_func(inp["q"], inp["k"], inp["v"], rp, qi, 16, cu_seqlens_q=inp["cu_q"],
                                     cu_seqlens_k=inp["cu_k"], max_seqlen_q=4096, max_seqlen_k=4096, causal=True,
                                     return_softmax_lse=True)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = step()
    new = random_q2k(lq, lk, 4, 16, "m3").to(cuda_device)
    q2k.copy_(new)
    poison_like(g_out)
    graph.replay()
    inp["rp"], inp["qi"] = msa.build_k2q_csr(q2k, inp["cu_q"], inp["cu_k"], 128, total_k=4096)
    ref = call(inp, causal=True)
    assert torch.equal(g_out, ref[0]) and torch.equal(g_lse, ref[1])
    check(g_out, g_lse, inp, atol=BF16_ATOL, rows=subset_rows(4096, 48))


@requires_cuda
@pytest.mark.parametrize("dt", ["bf16", "bf16_fp8kv", "fp8"])
@pytest.mark.parametrize("paged", [False, True])
def test_prefill_gpu_rows_outside_requests(cuda_device, dt, paged):
    """GPU tiles (M up to 128 rows), ragged odd cu_seqlens_q and a poisoned allocator: rows without a request are
    exactly 0 / -inf on the bf16, bf16 + fp8 KV and fp8 paths; sampled owned rows match the reference."""
    qd, kvd = {"bf16": (torch.bfloat16, None), "bf16_fp8kv": (torch.bfloat16, FP8), "fp8": (FP8, None)}[dt]
    cuq, lk, total_q = [37, 1100, 900, 2500, 2501], [2000, 700, 2600, 300], 2700
    inp = odd_inputs(cuq, lk, total_q, 16, 2, 16, qd, cuda_device, kv_dtype=kvd)
    pg = None
    if paged:
        kp, vp, pt = to_paged(inp["k"], inp["v"], lk, inp["cu_k"])
        pg = (kp, vp, pt, torch.tensor(lk, dtype=torch.int32, device=cuda_device))
    junk = torch.full((256 << 20,), float("nan"), dtype=torch.float32, device=cuda_device)  # reused by O / LSE
    del junk
    out, lse = call_odd(inp, causal=True, paged=pg)
    torch.cuda.synchronize()
    rows = subset_rows(total_q, 48) + [36, 37, 899, 900, 1099, 1100, 2499, 2500, 2501, 2699]
    o_ref, l_ref, _, owned = owner_reference(inp, causal=True, rows=set(rows))
    unowned = sorted(set(range(total_q)) - set(owned))
    # owners: rows 0..36 none, 37..899 request 0, 900..2499 request 2 (overlapping request 0), 2500 request 3
    assert unowned == list(range(37)) + list(range(2501, total_q))
    out_c, lse_c = out.cpu(), lse.cpu()
    assert (out_c[unowned] == 0).all() and torch.isneginf(lse_c[unowned]).all()
    assert torch.isfinite(out_c.float()).all()
    sel = sorted(set(rows) & set(owned))
    if dt == "fp8":  # API.md 3.5 FP8 criterion
        assert (out_c[sel].double() - o_ref[sel].to(torch.bfloat16).double()).abs().max().item() <= 0.125
        assert_lse_close(lse_c[sel], l_ref[sel], atol=2e-3, rtol=2e-3)
    else:
        assert_close_attn(out_c[sel], o_ref[sel], atol=BF16_ATOL)
        assert_lse_close(lse_c[sel], l_ref[sel])
