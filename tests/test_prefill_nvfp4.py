"""sparse_atten_nvfp4_kv_func (docs/API.md §5.13): the fused NVFP4-K/V prefill kernel.

Every case is checked twice:

* against ``sparse_atten_func`` on ``dequantize_nvfp4_128x4_to_bf16`` K/V (the spec's acceptance
  construction, §3.5: atol = rtol = 2e-2 on O and LSE, identical -inf pattern), and
* against the float64 reference (tests/reference.py ``attention_ref``) of the exactly decoded values
  ``(e2m1 * E4M3 scale) * global`` with the project gates (cosine >= 0.9999, max-abs <= 1e-2, LSE 1e-3;
  empty rows O == 0 exactly and LSE == -inf).

K/V come in three flavours: ``quant`` (bf16/fp16 N(0,1) data through ``quantize_bf16_to_nvfp4_128x4``:
global scales ~ amax/2688, far from 1), ``raw`` (random codes and E4M3 scale bytes, global scales
``None`` = 1.0) and ``raw_gs`` (random codes, explicit global scales 0.6 (K) and 1.25 (V)). Lengths are
ragged (an empty request, Lq < Lk, a request with Lk a multiple of 128), block ids include -1 anywhere,
out-of-range ids and tokens with no ids at all (empty output rows); unselected blocks give empty CSR rows.
CPU (interpreter): fp16 Q, tiny shapes. GPU only: bf16 and fp8 Q at 6-7K tokens (Hq 64, Hkv 4, topK 16),
the no-bf16-K/V-allocation check, CUDA-graph replay.
"""

import importlib
import math

import pytest
import torch

from .helpers import assert_close_attn, assert_lse_close, msa, owner_ref, poison_like, requires_cuda
from .reference import attention_ref, gather_paged, q2k_block_mask, visible_from_blocks

FP8 = torch.float8_e4m3fn
D = 128


# ------------------------------------------------------------------------------------------------
# input builders
# ------------------------------------------------------------------------------------------------

def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _q2k(lq, lk, hkv, topk, run=16):
    """[Hkv, total_q, topK] int32 batch-local ids: the local block first (M3-like), then ids drawn in
    [-1, nb + 1] (so -1 anywhere and out-of-range ids), shared by runs of ``run`` tokens; ~4% of the tokens
    get no id at all (empty rows; at least the middle token of every request with > 1 token)."""
    parts = []
    for lq_b, lk_b in zip(lq, lk):
        nb = -(-lk_b // 128)
        nruns = -(-lq_b // run) if lq_b else 0
        ids = torch.randint(-1, nb + 2, (hkv, nruns, topk), dtype=torch.int32)
        ids = ids.repeat_interleave(run, dim=1)[:, :lq_b]
        loc = ((torch.arange(lq_b) + lk_b - lq_b).clamp_min(0) // 128).to(torch.int32)
        if nb > 0:
            ids[:, :, 0] = loc.clamp_max(nb - 1)
        empty = torch.rand(lq_b) < 0.04
        if lq_b > 1:
            empty[lq_b // 2] = True
        ids[:, empty] = -1
        parts.append(ids)
    return torch.cat(parts, 1).contiguous() if parts else torch.zeros(hkv, 0, topk, dtype=torch.int32)


def _raw_nvfp4(lead, device, global_scale):
    """Random NVFP4 tensor of logical shape ``lead + (128,)``: random E2M1 codes, scale bytes mostly in
    [0.125, 0.5] (so ``e2m1*scale`` is O(1)) with some subnormal and zero scales."""
    R = 1
    for s in lead:
        R *= s
    data = torch.randint(0, 256, (*lead, 64), dtype=torch.uint8)
    sc = torch.randint(0x20, 0x31, (R, 8), dtype=torch.uint8)
    tiny = torch.rand(R, 8) < 0.05
    sc[tiny] = torch.randint(0, 8, (int(tiny.sum()),), dtype=torch.uint8)
    sw = msa.swizzle_nvfp4_scale_to_128x4(sc, rows=R, cols=8)
    gs = torch.tensor([1.0 if global_scale is None else global_scale], dtype=torch.float32)
    return msa.Nvfp4QuantizedTensor(data.to(device), sw.to(device), gs.to(device), (R, 8), (*lead, D))


def _make_kv(lead, device, mode, data_dtype):
    """(qk, qv, k_global_arg, v_global_arg) for ``mode`` in quant / raw / raw_gs."""
    if mode == "quant":
        k = torch.randn(*lead, D, device=device).to(data_dtype)
        v = torch.randn(*lead, D, device=device).to(data_dtype)
        qk, qv = msa.quantize_kv_bf16_to_nvfp4_128x4(k, v)
        return qk, qv, qk.global_scale, qv.global_scale
    if mode == "raw":
        return _raw_nvfp4(lead, device, None), _raw_nvfp4(lead, device, None), None, None
    qk, qv = _raw_nvfp4(lead, device, 0.6), _raw_nvfp4(lead, device, 1.25)
    return qk, qv, qk.global_scale, qv.global_scale


def _exact(qx):
    """float64 decoded values ``(e2m1 * scale) * global`` (the global scale read as fp32)."""
    g = qx.global_scale.reshape(-1)[0].double()
    return msa.dequantize_nvfp4_128x4_to_bf16(qx, include_global_scale=False).double() * g


def build(device, *, lq, lk, hq, hkv, topk, qdtype, paged, mode, extra_pages=3):
    """Inputs of one case. Paged: a shuffled page pool with ``extra_pages`` unused pages and one unused
    page-table column per request."""
    total_q, total_k = sum(lq), sum(lk)
    q = torch.randn(total_q, hq, D, device=device).to(qdtype)
    data_dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    q2k = _q2k(lq, lk, hkv, topk).to(device)
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    rp, qi = msa.build_k2q_csr(q2k, cu_q, cu_k, 128, total_k=total_k)
    inp = dict(q=q, q2k=q2k, cu_q=cu_q, cu_k=cu_k, rp=rp, qi=qi, lq=lq, lk=lk, topk=topk, paged=paged)
    if paged:
        B = len(lk)
        mp = max([-(-x // 128) for x in lk] + [1]) + 1
        P = B * mp + extra_pages
        pt = torch.randperm(P)[:B * mp].view(B, mp).to(torch.int32).to(device)
        qk, qv, kg, vg = _make_kv((P, hkv, 128), device, mode, data_dtype)
        inp.update(page_table=pt, seqused_k=torch.tensor(lk, dtype=torch.int32, device=device))
    else:
        qk, qv, kg, vg = _make_kv((total_k, hkv), device, mode, data_dtype)
    inp.update(qk=qk, qv=qv, kg=kg, vg=vg)
    return inp


@pytest.fixture(params=["staged", "fused"])
def nvfp4_path(request):
    """Both execution paths of sparse_atten_nvfp4_kv_func (docs/API.md §5.13): staged (K/V decoded once into
    element tiles, then the element kernel) and fused (decoded inside the attention kernel)."""
    with msa.tuning.override(prefill_nvfp4_stage_bytes=(1 << 40) if request.param == "staged" else 0):
        yield request.param


def run_fused(inp, *, causal, **kw):
    extra = dict(page_table=inp["page_table"], seqused_k=inp["seqused_k"]) if inp["paged"] else {}
    extra.update(kw)
    qk, qv = inp["qk"], inp["qv"]
    return msa.sparse_atten_nvfp4_kv_func(
        inp["q"], qk.data, qv.data, qk.scale_128x4, qv.scale_128x4, inp["kg"], inp["vg"], inp["rp"], inp["qi"],
        inp["topk"], cu_seqlens_q=inp["cu_q"], cu_seqlens_k=inp["cu_k"], max_seqlen_q=max(inp["lq"] + [1]),
        max_seqlen_k=max(inp["lk"] + [1]), causal=causal, return_softmax_lse=True, **extra)


def run_dequantised(inp, *, causal, **kw):
    """The §3.5 construction: ``sparse_atten_func`` on ``dequantize_nvfp4_128x4_to_bf16`` K/V (fp16 Q: the
    bf16 values converted to fp16, as the fp16 Q/K/V path requires; fp8 Q: widened to bf16, exact)."""
    q = inp["q"]
    kb = msa.dequantize_nvfp4_128x4_to_bf16(inp["qk"])
    vb = msa.dequantize_nvfp4_128x4_to_bf16(inp["qv"])
    if q.dtype == torch.float16:
        kb, vb = kb.half(), vb.half()
    if q.dtype == FP8:
        q = q.to(torch.bfloat16)
    extra = dict(page_table=inp["page_table"], seqused_k=inp["seqused_k"]) if inp["paged"] else {}
    extra.update(kw)
    return msa.sparse_atten_func(q, kb, vb, inp["rp"], inp["qi"], inp["topk"], cu_seqlens_q=inp["cu_q"],
                                 cu_seqlens_k=inp["cu_k"], max_seqlen_q=max(inp["lq"] + [1]),
                                 max_seqlen_k=max(inp["lk"] + [1]), causal=causal, return_softmax_lse=True, **extra)


def reference(inp, *, causal, scale=None, tau=None, rows=None, chunk=256):
    """float64 reference of the exactly decoded K/V for the global token rows ``rows`` (all when None).
    Returns (O [n, Hq, D], LSE [n, Hq], LSE_T or None, rows) on the CPU."""
    scale = D ** -0.5 if scale is None else scale
    kx, vx = _exact(inp["qk"]), _exact(inp["qv"])
    dev = inp["q"].device
    cq = inp["cu_q"].tolist()
    ck = inp["cu_k"].tolist()
    outs, lses, lsets, idx = [], [], [], []
    for b in range(len(inp["lq"])):
        qs, qe = cq[b], cq[b + 1]
        lq_b, lk_b = qe - qs, inp["lk"][b]
        loc = list(range(lq_b)) if rows is None else [t - qs for t in rows if qs <= t < qe]
        if not loc:
            continue
        nb = -(-lk_b // 128)
        vis = visible_from_blocks(q2k_block_mask(inp["q2k"][:, qs:qe].cpu(), nb), lq_b, lk_b, causal=causal)
        if inp["paged"]:
            kb, vb = gather_paged(kx, inp["page_table"][b], lk_b), gather_paged(vx, inp["page_table"][b], lk_b)
        else:
            kb, vb = kx[ck[b]:ck[b] + lk_b], vx[ck[b]:ck[b] + lk_b]
        for c0 in range(0, len(loc), chunk):
            li = torch.tensor(loc[c0:c0 + chunk])
            o, lse, lse_t = attention_ref(inp["q"][qs:qe][li.to(dev)].double(), kb, vb, vis[:, li], scale, tau=tau)
            outs.append(o.cpu())
            lses.append(lse.cpu())
            if tau is not None:
                lsets.append(lse_t.cpu())
        idx += [qs + i for i in loc]
    return torch.cat(outs), torch.cat(lses), (torch.cat(lsets) if tau is not None else None), idx


def check_vs_dequantised(got, ref):
    """§3.5 NVFP4 criterion: atol = rtol = 2e-2 on O and finite LSE; identical -inf pattern."""
    o, lse = got[0], got[1]
    o_r, lse_r = ref[0], ref[1]
    assert o.dtype == o_r.dtype and o.shape == o_r.shape
    torch.testing.assert_close(o.float(), o_r.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_r))
    fin = torch.isfinite(lse_r)
    torch.testing.assert_close(lse[fin], lse_r[fin], atol=2e-2, rtol=2e-2)


def check_vs_float64(out, lse, inp, *, causal, rows=None, lse_t=None, **kw):
    o_ref, l_ref, lt_ref, idx = reference(inp, causal=causal, rows=rows, **kw)
    o = out.cpu()[idx]
    l_ = lse.cpu()[idx]
    empty = torch.isneginf(l_ref)
    assert (o.double()[empty] == 0).all(), "empty rows must give O == 0"
    # NVFP4 V spans up to |e2m1*scale*global| ~ 4-6 here (vs ~1 for the randn V of the bf16 tests), and a
    # row attending to a handful of keys has |O| of that size, where the bf16 output rounding alone is
    # |O|*2^-9. The 1e-2 gate is therefore applied to O / max(1, max|O_ref| of the row) (identical for
    # unit-scale rows).
    s = o_ref.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    assert_close_attn(o.double() / s, o_ref.double() / s, atol=1e-2)
    assert_lse_close(l_, l_ref, atol=1e-3, rtol=1e-3)
    if lse_t is not None:
        assert_lse_close(lse_t.cpu()[idx], lt_ref, atol=1e-3, rtol=1e-3)
    return empty


def _poison_pool(inp):
    """CUDA: hand NaN-filled blocks of the outputs' sizes to the caching allocator, so outputs the kernel
    fails to write are caught (``torch.empty`` reuses them). No effect on the CPU."""
    if inp["q"].device.type != "cuda":
        return
    total_q, hq, _ = inp["q"].shape
    for shape, dt in (((total_q, hq, D), torch.bfloat16), ((total_q, hq, D), torch.float16),
                      ((total_q, hq), torch.float32)):
        poison_like(torch.empty(shape, dtype=dt, device=inp["q"].device))


# ------------------------------------------------------------------------------------------------
# CPU / interpreter (fp16 Q; on a GPU machine the same cases run on the GPU)
# ------------------------------------------------------------------------------------------------

SMALL = dict(lq=[24, 0, 1, 33], lk=[200, 30, 100, 128], hq=2, hkv=2, topk=3)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("paged,causal,mode", [
    (False, True, "quant"),
    (True, False, "raw"),
    (False, False, "raw_gs"),
    (True, True, "raw_gs"),
])
def test_fused_small_fp16(device, paged, causal, mode, nvfp4_path):
    inp = build(device, qdtype=torch.float16, paged=paged, mode=mode, **SMALL)
    _poison_pool(inp)
    got = run_fused(inp, causal=causal)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float32
    check_vs_dequantised(got, run_dequantised(inp, causal=causal))
    empty = check_vs_float64(got[0], got[1], inp, causal=causal)
    assert empty.any(), "the case should contain empty rows"


@pytest.mark.kernels_ci
def test_fused_temperature_scale_and_identity(device, nvfp4_path):
    """k_global enters LSE and LSE_T (through the logits); v_global only O; LSE_T is LSE at tau = 1."""
    inp = build(device, qdtype=torch.float16, paged=False, mode="raw_gs", lq=[24], lk=[150], hq=2, hkv=1, topk=2)
    out, lse, lse_t = run_fused(inp, causal=True, softmax_scale=0.05, return_temperature_lse=True,
                                lse_temperature_scale=0.7)
    check_vs_float64(out, lse, inp, causal=True, scale=0.05, tau=0.7, lse_t=lse_t)
    ref = run_dequantised(inp, causal=True, softmax_scale=0.05, return_temperature_lse=True, lse_temperature_scale=0.7)
    check_vs_dequantised((out, lse_t), (ref[0], ref[2]))
    o1, l1, lt1 = run_fused(inp, causal=True, softmax_scale=0.05, return_temperature_lse=True)
    assert lt1 is l1
    # v_global scales O only; k_global changes the LSE
    vg2 = inp["vg"] * 2
    o2, l2 = run_fused(dict(inp, vg=vg2), causal=True, softmax_scale=0.05)
    torch.testing.assert_close(o2.float(), (o1.float() * 2), atol=2e-3, rtol=2e-3)
    assert torch.equal(l2, l1)


@pytest.mark.kernels_ci
def test_fused_noncontiguous_inputs(device, nvfp4_path):
    """Strided q, packed K/V views with a non-unit head stride, and a non-contiguous scale tensor."""
    inp = build(device, qdtype=torch.float16, paged=False, mode="raw_gs", lq=[20], lk=[140], hq=2, hkv=1, topk=2)
    ref = run_fused(inp, causal=True)
    qk, qv = inp["qk"], inp["qv"]
    T = qk.data.shape[0]
    big = torch.zeros(T, 3, 64, dtype=torch.uint8, device=device)
    big[:, 1] = qk.data[:, 0]
    bigv = torch.zeros(T, 3, 64, dtype=torch.uint8, device=device)
    bigv[:, 2] = qv.data[:, 0]
    sc = torch.zeros(qk.scale_128x4.shape[0], 16, dtype=torch.uint8, device=device)
    sc[:, :8] = qk.scale_128x4
    qwide = torch.zeros(inp["q"].shape[0], 4, D, dtype=inp["q"].dtype, device=device)
    qwide[:, ::2] = inp["q"]
    got = msa.sparse_atten_nvfp4_kv_func(
        qwide[:, ::2], big[:, 1:2], bigv[:, 2:3], sc[:, :8], qv.scale_128x4, inp["kg"], inp["vg"], inp["rp"],
        inp["qi"], 2, cu_seqlens_q=inp["cu_q"], cu_seqlens_k=inp["cu_k"], max_seqlen_q=20, max_seqlen_k=140,
        causal=True, return_softmax_lse=True)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.kernels_ci
def test_fused_opcheck_and_compile(device):
    inp = build(device, qdtype=torch.float16, paged=False, mode="raw_gs", lq=[3], lk=[130], hq=2, hkv=1, topk=2)
    qk, qv = inp["qk"], inp["qv"]
    op = msa.prefill._sparse_prefill_nvfp4_op
    args = (inp["q"], qk.data, qv.data, qk.scale_128x4, qv.scale_128x4, inp["kg"], None, inp["rp"], inp["qi"],
            inp["cu_q"], inp["cu_k"], None, None, 2, True, 0.08, 0.5, True)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def fn(q, kd, vd, ks, vs, kg, rp, qi, cq, ck):
        return msa.sparse_atten_nvfp4_kv_func(q, kd, vd, ks, vs, kg, None, rp, qi, 2, cu_seqlens_q=cq,
                                              cu_seqlens_k=ck, max_seqlen_q=3, max_seqlen_k=130, causal=True,
                                              return_softmax_lse=True)

    a = (inp["q"], qk.data, qv.data, qk.scale_128x4, qv.scale_128x4, inp["kg"], inp["rp"], inp["qi"], inp["cu_q"],
         inp["cu_k"])
    got = torch.compile(fn, fullgraph=True, backend="eager")(*a)
    ref = fn(*a)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def with_cu_q(inp, cuq):
    """The same tokens / K/V with another cu_seqlens_q (and the CSR rebuilt for it)."""
    dev = inp["q"].device
    cu_q = torch.tensor(cuq, dtype=torch.int32, device=dev)
    rp, qi = msa.build_k2q_csr(inp["q2k"], cu_q, inp["cu_k"], 128, total_k=int(inp["cu_k"][-1]))
    return dict(inp, cu_q=cu_q, rp=rp, qi=qi)


@pytest.mark.kernels_ci
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_fused_rows_outside_requests(device, paged, nvfp4_path):
    """Rows outside cu_seqlens_q (or not owned under a decreasing cu_seqlens_q) give O = 0, LSE = -inf on the
    NVFP4 path too (they used to be uninitialised); owned rows match the dequantised bf16 path and float64."""
    inp = build(device, qdtype=torch.float16, paged=paged, mode="raw_gs", lq=[10, 6, 8], lk=[200, 130, 300], hq=4,
                hkv=2, topk=3)
    total_q = inp["q"].shape[0]
    for cuq, monotone in (([3, 12, 17, 20], True), ([0, 14, 6, 20], False)):
        odd = with_cu_q(inp, cuq)
        _poison_pool(odd)
        got = run_fused(odd, causal=True)
        check_vs_dequantised(got, run_dequantised(odd, causal=True))
        owned = [t for t in range(total_q) if owner_ref(cuq, t) is not None]
        unowned = [t for t in range(total_q) if t not in owned]
        assert unowned
        o, lse = got[0].cpu(), got[1].cpu()
        assert (o[unowned] == 0).all() and torch.isneginf(lse[unowned]).all()
        if monotone:  # per-request float64 reference (no overlaps)
            check_vs_float64(got[0], got[1], dict(odd, lq=[cuq[b + 1] - cuq[b] for b in range(3)]), causal=True,
                             rows=owned)
    # empty and unowned rows stay exactly 0 even when v_global is inf (0 * inf would be NaN)
    odd = with_cu_q(inp, [3, 12, 17, 20])
    out, lse = run_fused(dict(odd, vg=torch.full((1,), math.inf, device=device)), causal=True)
    empty = torch.isneginf(lse)
    assert empty.any() and (out[empty] == 0).all()


@pytest.mark.kernels_ci
@pytest.mark.parametrize("extra_pages", [0, 5], ids=["pool_staged", "table_gathered"])
def test_staged_pages_and_bad_entries(device, extra_pages):
    """Paged staging decodes the pool (pool pages <= page-table entries) or gathers the page table's pages (the
    staged table then marks entries outside the pool -1): page-table entries -1 and past the pool select nothing on
    both paths; staged == fused within bf16/fp16 rounding of the reassociated sums, both against float64."""
    inp = build(device, qdtype=torch.float16, paged=True, mode="raw_gs", lq=[20, 9], lk=[300, 200], hq=4, hkv=2,
                topk=3, extra_pages=extra_pages)
    pt = inp["page_table"].clone()
    pt[0, 1] = -1
    pt[1, 0] = pt.new_tensor(10 ** 6)
    inp["page_table"] = pt
    got = {}
    for path, lim in (("staged", 1 << 40), ("fused", 0)):
        with msa.tuning.override(prefill_nvfp4_stage_bytes=lim):
            _poison_pool(inp)
            got[path] = run_fused(inp, causal=True)
    check_vs_dequantised(got["staged"], run_dequantised(inp, causal=True))
    check_vs_dequantised(got["staged"], got["fused"])
    assert torch.equal(torch.isneginf(got["staged"][1]), torch.isneginf(got["fused"][1]))


@pytest.mark.kernels_ci
def test_stage_limit_selects_path(device, monkeypatch):
    """The workspace limit picks the path: at the plan's byte count the call stages K and V, one byte below it
    nothing is staged (fused); both give the same result within rounding."""
    pk = importlib.import_module(msa.__name__ + ".prefill_kernel")
    prefill_mod = importlib.import_module(msa.__name__ + ".prefill")
    inp = build(device, qdtype=torch.float16, paged=False, mode="raw", lq=[8], lk=[130], hq=2, hkv=1, topk=2)
    n, gather, nbytes = pk.nvfp4_stage_plan(inp["qk"].data, None, torch.float16)
    assert (n, gather, nbytes) == (130, False, 2 * 130 * 1 * 128 * 2)
    staged_dtypes = []

    def spy(*a, **k):
        staged_dtypes.append(a[3])
        return pk.nvfp4_stage(*a, **k)

    monkeypatch.setattr(prefill_mod, "nvfp4_stage", spy)
    with msa.tuning.override(prefill_nvfp4_stage_bytes=nbytes):
        staged = run_fused(inp, causal=True)
    assert staged_dtypes == [torch.float16, torch.float16]
    with msa.tuning.override(prefill_nvfp4_stage_bytes=nbytes - 1):
        fused = run_fused(inp, causal=True)
    assert len(staged_dtypes) == 2
    check_vs_dequantised(staged, fused)
    with pytest.raises(ValueError, match="prefill_nvfp4_stage_bytes"):
        with msa.tuning.override(prefill_nvfp4_stage_bytes=-1):
            pass


@pytest.mark.kernels_ci
def test_nvfp4_kv_errors(device):
    T, Hkv = 128, 1
    q = torch.randn(T, 2, 128, device=device, dtype=torch.float16)
    k = torch.zeros(T, Hkv, 64, device=device, dtype=torch.uint8)
    sc = torch.zeros(128, 8, device=device, dtype=torch.uint8)
    gs = torch.ones(1, device=device)
    cu = torch.tensor([0, T], device=device, dtype=torch.int32)
    rp = torch.zeros(Hkv, 2, device=device, dtype=torch.int32)
    qi = torch.full((Hkv, T * 4), -1, device=device, dtype=torch.int32)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T)
    f = msa.sparse_atten_nvfp4_kv_func
    with pytest.raises(TypeError, match="q"):
        f(q.float(), k, k, sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(TypeError, match="k"):
        f(q, k.float(), k, sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(TypeError, match="v"):
        f(q, k, k.to(torch.int8), sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(TypeError, match="k_scale"):
        f(q, k, k, sc.float(), sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(TypeError, match="v_scale"):
        f(q, k, k, sc, sc.view(torch.int8), gs, gs, rp, qi, 4, **kw)
    with pytest.raises(TypeError, match="global"):
        f(q, k, k, sc, sc, gs.double(), gs, rp, qi, 4, **kw)
    with pytest.raises(TypeError, match="v_global"):
        f(q, k, k, sc, sc, gs, gs.half(), rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="global"):
        f(q, k, k, sc, sc, gs[:0], gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="64"):
        f(q, k[..., :32], k[..., :32], sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="same shape"):
        f(q, k, k[:64], sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="k_scale"):
        f(q, k, k, sc[:64], sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="v_scale"):
        f(q, k, k, sc, sc[:, :4], gs, gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="k_scale"):
        f(q, k, k, sc.view(-1), sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError, match="rank|3-D"):
        f(q[0], k, k, sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(msa.MsaUnsupportedError):
        f(q[..., :64], k, k, sc, sc, gs, gs, rp, qi, 4, **kw)
    with pytest.raises(ValueError):  # Hq % Hkv
        f(q[:, :1], torch.zeros(T, 2, 64, device=device, dtype=torch.uint8),
          torch.zeros(T, 2, 64, device=device, dtype=torch.uint8), torch.zeros(256, 8, device=device, dtype=torch.uint8),
          torch.zeros(256, 8, device=device, dtype=torch.uint8), gs, gs, rp, qi, 4, **kw)
    with pytest.raises(msa.MsaUnsupportedError):  # G = 32
        f(torch.zeros(T, 32, 128, device=device, dtype=torch.float16), k, k, sc, sc, gs, gs, rp, qi, 4, **kw)
    # rank / paging
    kp = torch.zeros(1, Hkv, 128, 64, device=device, dtype=torch.uint8)
    pt = torch.zeros(1, 1, device=device, dtype=torch.int32)
    with pytest.raises(ValueError, match="total_k"):
        f(q, kp, kp, sc, sc, gs, gs, rp, qi, 4, **kw)  # 4-D without page_table
    with pytest.raises(ValueError, match="num_pages"):
        f(q, k, k, sc, sc, gs, gs, rp, qi, 4, page_table=pt, **kw)  # 3-D with page_table
    with pytest.raises(ValueError, match="blk_kv"):
        f(q, kp[:, :, :64], kp[:, :, :64], sc, sc, gs, gs, rp, qi, 4, page_table=pt, **kw)
    with pytest.raises(msa.MsaUnsupportedError):
        f(q, kp[:, :, :64], kp[:, :, :64], sc, sc, gs, gs, rp, qi, 4, page_table=pt, blk_kv=64, **kw)
    with pytest.raises(msa.MsaUnsupportedError):
        f(q, k, k, sc, sc, gs, gs, rp, qi, 4, blk_kv=64, **kw)
    with pytest.raises(TypeError):
        f(q, kp, kp, sc, sc, gs, gs, rp, qi, 4, page_table=pt.long(), **kw)
    with pytest.raises(ValueError):
        f(q, kp, kp, sc, sc, gs, gs, rp, qi, 4, page_table=pt[0], **kw)
    with pytest.raises(TypeError):
        f(q, kp, kp, sc, sc, gs, gs, rp, qi, 4, page_table=pt, seqused_k=torch.ones(1, device=device), **kw)
    with pytest.raises(ValueError, match="seqused_k is only supported together with page_table"):
        f(q, k, k, sc, sc, gs, gs, rp, qi, 4, seqused_k=torch.ones(1, device=device, dtype=torch.int32), **kw)
    # CSR / lengths / scalars as in sparse_atten_func
    with pytest.raises(TypeError):
        f(q, k, k, sc, sc, gs, gs, rp.long(), qi, 4, **kw)
    with pytest.raises(ValueError):
        f(q, k, k, sc, sc, gs, gs, rp, qi[:, :7], 4, **kw)
    with pytest.raises(ValueError):
        f(q, k, k, sc, sc, gs, gs, rp, qi, 0, **kw)
    with pytest.raises(TypeError):
        f(q, k, k, sc, sc, gs, gs, rp, qi, 4, **dict(kw, cu_seqlens_q=cu.long()))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            f(q, k, k, sc, sc, gs, gs, rp, qi, 4, lse_temperature_scale=bad, **kw)
    with pytest.raises(ValueError):
        f(q, k, k, sc, sc, gs, gs, rp, qi, 4, return_temperature_lse=True, **kw)
    with pytest.raises(TypeError):
        f(q, k, k, sc, sc, gs, gs, rp, qi, 4, partial_dtype=torch.int32, **kw)
    # accepted and ignored
    out = f(q, k, k, sc, sc, None, None, rp, qi, 4, schedule="x", usable_SM_count=3, qk_dtype=torch.float32,
            pv_dtype=torch.int8, **kw)  # None global scale = 1.0; no entries -> zeros
    assert out.shape == q.shape and out.dtype == q.dtype and (out == 0).all()


# ------------------------------------------------------------------------------------------------
# GPU only: bf16 / fp8 Q at realistic sizes
# ------------------------------------------------------------------------------------------------

BIG = dict(lq=[4173, 1, 1500, 0, 300], lk=[4173, 700, 2000, 128, 300], hq=64, hkv=4, topk=16)


def _rows(total, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sorted(set(torch.randperm(total, generator=g)[:n].tolist()) | {0, total - 1})


@requires_cuda
@pytest.mark.parametrize("qdtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("mode,causal", [("quant", True), ("raw", False), ("raw_gs", True), ("quant", False)])
def test_fused_gpu(cuda_device, qdtype, paged, mode, causal, nvfp4_path):
    inp = build(cuda_device, qdtype=qdtype, paged=paged, mode=mode, **BIG)
    _poison_pool(inp)
    got = run_fused(inp, causal=causal)
    assert got[0].dtype == (torch.float16 if qdtype == torch.float16 else torch.bfloat16)
    check_vs_dequantised(got, run_dequantised(inp, causal=causal))
    total_q = inp["q"].shape[0]
    check_vs_float64(got[0], got[1], inp, causal=causal, rows=_rows(total_q, 256))
    # every empty (token, head) of the whole output (LSE -inf) has O == 0 exactly
    e = torch.isneginf(got[1])
    assert e.any() and (got[0][e] == 0).all()


@requires_cuda
def test_fused_gpu_fp16(cuda_device, nvfp4_path):
    inp = build(cuda_device, qdtype=torch.float16, paged=True, mode="quant", **BIG)
    _poison_pool(inp)
    got = run_fused(inp, causal=True)
    check_vs_dequantised(got, run_dequantised(inp, causal=True))
    check_vs_float64(got[0], got[1], inp, causal=True, rows=_rows(inp["q"].shape[0], 256))


def _peak_delta(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del res
    return peak


@requires_cuda
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_fused_gpu_allocates_no_bf16_kv(cuda_device, paged):
    """With staging off, the op's peak memory equals the bf16 op's (O, LSE, CSR-inversion workspace): no K/V copy.

    topK = 4 keeps the workspace (slots + block lists, ~2 * Hkv * total_q * 8 * 4 B) at 1/4 of one bf16 K."""
    S, hq, hkv, topk = 16384, 64, 4, 4
    inp = build(cuda_device, qdtype=torch.bfloat16, paged=paged, mode="raw_gs", lq=[S], lk=[S], hq=hq, hkv=hkv,
                topk=topk)
    k_bf16_bytes = S * hkv * D * 2
    lead = inp["qk"].original_shape
    kb = torch.zeros(lead, dtype=torch.bfloat16, device=cuda_device)  # native baseline inputs (same workspace)
    extra = dict(page_table=inp["page_table"], seqused_k=inp["seqused_k"]) if paged else {}

    def native():
        return msa.sparse_atten_func(inp["q"], kb, kb, inp["rp"], inp["qi"], topk, cu_seqlens_q=inp["cu_q"],
                                     cu_seqlens_k=inp["cu_k"], max_seqlen_q=S, max_seqlen_k=S, causal=True,
                                     return_softmax_lse=True, **extra)

    def fused():
        with msa.tuning.override(prefill_nvfp4_stage_bytes=0):
            return run_fused(inp, causal=True)

    fused()
    native()  # compile both first
    p_native = _peak_delta(native)
    p_fused = _peak_delta(fused)
    out_bytes = S * hq * D * 2 + S * hq * 4
    assert p_fused <= p_native + k_bf16_bytes // 8, (p_fused, p_native, k_bf16_bytes)
    assert p_fused - out_bytes < k_bf16_bytes, (p_fused, out_bytes, k_bf16_bytes)


@requires_cuda
def test_fused_gpu_graph_and_determinism(cuda_device, nvfp4_path):
    inp = build(cuda_device, qdtype=torch.bfloat16, paged=True, mode="quant", lq=[4096], lk=[4096], hq=64, hkv=4,
                topk=16)
    first = run_fused(inp, causal=True)
    second = run_fused(inp, causal=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = run_fused(inp, causal=True)
    inp["q"].copy_(torch.randn_like(inp["q"], dtype=torch.float32).to(torch.bfloat16))
    inp["kg"].mul_(1.5)  # global scales are read on the device at replay
    inp["vg"].mul_(0.5)
    poison_like(g_out)
    poison_like(g_lse)
    graph.replay()
    ref = run_fused(inp, causal=True)
    assert torch.equal(g_out, ref[0]) and torch.equal(g_lse, ref[1])
    check_vs_float64(g_out, g_lse, inp, causal=True, rows=_rows(4096, 128))


@requires_cuda
@pytest.mark.parametrize("qdtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_fused_gpu_rows_outside_requests(cuda_device, qdtype, paged, nvfp4_path):
    """GPU tiles: a gap before the first request, a decreasing step and rows after the last request."""
    inp = build(cuda_device, qdtype=qdtype, paged=paged, mode="quant", lq=[1200, 900, 700], lk=[3000, 900, 2000],
                hq=32, hkv=4, topk=16)
    total_q = inp["q"].shape[0]
    cuq = [45, 1500, 1100, 2650]
    odd = with_cu_q(inp, cuq)
    _poison_pool(odd)
    got = run_fused(odd, causal=True)
    check_vs_dequantised(got, run_dequantised(odd, causal=True))
    owners = [owner_ref(cuq, t) for t in range(total_q)]
    unowned = [t for t, b in enumerate(owners) if b is None]
    assert unowned == list(range(45)) + list(range(2650, total_q))
    o, lse = got[0].cpu(), got[1].cpu()
    assert (o[unowned] == 0).all() and torch.isneginf(lse[unowned]).all()
    assert torch.isfinite(o.float()).all()
