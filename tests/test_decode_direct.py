"""Direct token-major decode ``flash_decode_with_gqa_share_sparse`` and its naive reference (API.md 6.2, 6.6)."""

import warnings

import pytest
import torch

from .helpers import assert_close_attn, msa, random_index_row, requires_cuda
from .reference import token_major_decode_ref

FP8 = torch.float8_e4m3fn


def _atol(dtype):
    return 2e-3 if dtype == torch.float16 else 1e-2


def make_direct(lens, *, hkv=2, g=4, d=64, bs=128, topk=4, dtype=torch.float16, device="cpu", idx_dtype=torch.int32,
                ids="messy", extra_slots=37, kv_dtype=None, max_reqs=None, width=None, packed=False):
    """Token-major problem: shuffled slots per request, req_to_token rows permuted over max_reqs.

    Returns q, k_cache, v_cache, req_to_token, seq_lens, slot_ids, topk_idx (all on ``device``).
    """
    b = len(lens)
    width = width or max(1, max(lens))
    max_reqs = max_reqs or b + 2
    max_slots = sum(lens) + extra_slots
    kv_dtype = kv_dtype or dtype
    gen = torch.float16 if kv_dtype == FP8 else kv_dtype
    if packed:  # K|V packed per token: k/v are strided views with token stride 2*D
        kv = torch.randn(max_slots, hkv, 2 * d, dtype=gen, device=device).to(kv_dtype)
        k, v = kv[..., :d], kv[..., d:]
    else:
        k = torch.randn(max_slots, hkv, d, dtype=gen, device=device).to(kv_dtype)
        v = torch.randn(max_slots, hkv, d, dtype=gen, device=device).to(kv_dtype)
    perm = torch.randperm(max_slots)
    req_to_token = torch.randint(0, max_slots, (max_reqs, width), dtype=idx_dtype)
    slot_ids = torch.randperm(max_reqs)[:b].to(idx_dtype)
    off = 0
    for i, L in enumerate(lens):
        req_to_token[slot_ids[i], :L] = perm[off:off + L].to(idx_dtype)
        off += L
    q = torch.randn(b, hkv * g, d, dtype=dtype, device=device)
    rows = []
    for L in lens:
        nb = -(-L // bs)
        for _ in range(hkv):
            rows.append(random_index_row(nb, topk, ids))
    topk_idx = torch.stack(rows).view(b, hkv, topk).permute(1, 0, 2).contiguous().to(idx_dtype)
    seq_lens = torch.tensor(lens, dtype=idx_dtype)
    return (q, k, v, req_to_token.to(device), seq_lens.to(device), slot_ids.to(device), topk_idx.to(device))


def run_direct(prob, bs, sink=None, sm_scale=None):
    q, k, v, r2t, sl, sid, idx = prob
    return msa.flash_decode_with_gqa_share_sparse(q, sink, k, v, r2t, sl, sid, bs, idx, sm_scale)


def check_direct(out, prob, bs, sink=None, sm_scale=None):
    q, k, v, r2t, sl, sid, idx = prob
    kr = k.float() if k.dtype == FP8 else k
    vr = v.float() if v.dtype == FP8 else v
    o_ref, lse_ref = token_major_decode_ref(q, kr, vr, r2t, sl, sid, bs, idx, scale=sm_scale, sink=sink)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert_close_attn(out, o_ref, atol=_atol(q.dtype))
    empty = torch.isneginf(lse_ref)
    assert (out.float().cpu()[empty] == 0).all()


@pytest.mark.kernels_ci
@pytest.mark.parametrize("g", [1, 3, 4, 16, 32])
def test_gqa(device, g):
    hkv = 2 if g <= 4 else 1
    prob = make_direct([300, 129, 70], hkv=hkv, g=g, topk=5, device=device)
    check_direct(run_direct(prob, 128), prob, 128)


@pytest.mark.parametrize("bs", [16, 64, 256, 512])
def test_block_sizes(device, bs):
    prob = make_direct([700, 33, 1], hkv=2, g=2, bs=bs, topk=4, device=device)
    check_direct(run_direct(prob, bs), prob, bs)


@pytest.mark.parametrize("d", [128, 256])
def test_head_dims(device, d):
    prob = make_direct([200, 90], hkv=1, g=4, d=d, topk=3, device=device)
    check_direct(run_direct(prob, 64), prob, 64)


@pytest.mark.kernels_ci
def test_int64_indices_sink_scale(device):
    prob = make_direct([300, 0, 129, 50], hkv=2, g=4, topk=4, device=device, idx_dtype=torch.int64)
    sink = torch.randn(8, 64, device=device)
    out = run_direct(prob, 64, sink=sink, sm_scale=0.2)
    check_direct(out, prob, 64, sink=sink, sm_scale=0.2)
    assert (out[1] == 0).all()
    # a bf16/fp16 sink gives the same result as its fp32 value
    out2 = run_direct(prob, 64, sink=sink.half(), sm_scale=0.2)
    check_direct(out2, prob, 64, sink=sink.half().float(), sm_scale=0.2)


@pytest.mark.parametrize("ctx", [128, 2048, 4096])
def test_contexts(device, ctx):
    prob = make_direct([ctx, ctx // 2 + 1], hkv=1, g=4, topk=8, device=device, ids="valid")
    check_direct(run_direct(prob, 128), prob, 128)


def test_ragged_batch_64(device):
    lens = [(i * 53) % 300 for i in range(64)]
    prob = make_direct(lens, hkv=1, g=1, topk=2, bs=64, device=device)
    check_direct(run_direct(prob, 64), prob, 64)


@pytest.mark.kernels_ci
def test_indirection_edge_cases(device):
    q, k, v, r2t, sl, sid, idx = make_direct([300, 200, 150], hkv=2, g=2, topk=4, device=device, width=320)
    r2t[sid[0], 5] = -1  # python modulo: the last slot
    r2t[sid[0], 6] = -3
    r2t[sid[1], 7] = k.shape[0] + 4  # wraps around
    sl[2] = 10_000  # longer than req_to_token: clamped to its width
    r2t[sid[2], 150:] = torch.randint(0, k.shape[0], (320 - 150,), dtype=r2t.dtype)
    idx[:, 2] = torch.tensor([0, 1, 2, 5], dtype=idx.dtype)  # block 2 (x in [256, 320)) is valid, 5 is not
    prob = (q, k, v, r2t, sl, sid, idx)
    check_direct(run_direct(prob, 128), prob, 128)


def test_packed_strided_cache(device):
    prob = make_direct([300, 257], hkv=2, g=4, topk=4, device=device, packed=True)
    assert not prob[1].is_contiguous()
    out = run_direct(prob, 128)
    check_direct(out, prob, 128)
    q, k, v, *rest = prob
    assert torch.equal(out, run_direct((q, k.contiguous(), v.contiguous(), *rest), 128))


@pytest.mark.kernels_ci
def test_matches_official_bitwise(device):
    """Token-major cache + req_to_token built from a paged HND cache: identical bits."""
    b, hkv, g, d, topk = 3, 2, 4, 128, 4
    lens = [300, 129, 640]
    maxp = 5
    num_pages = b * maxp + 1
    kc = torch.randn(num_pages * 128, hkv, d, dtype=torch.float16, device=device)
    vc = torch.randn_like(kc)
    k_hnd = kc.view(num_pages, 128, hkv, d).permute(0, 2, 1, 3)
    v_hnd = vc.view(num_pages, 128, hkv, d).permute(0, 2, 1, 3)
    pt = torch.randperm(num_pages)[: b * maxp].view(b, maxp).to(torch.int32).to(device)
    x = torch.arange(maxp * 128, device=device)
    r2t = (pt.long()[:, x // 128] * 128 + x % 128).to(torch.int32)
    sk = torch.tensor(lens, dtype=torch.int32, device=device)
    idx = torch.randint(-1, 6, (hkv, b, topk), dtype=torch.int32, device=device)
    q = torch.randn(b, hkv * g, d, dtype=torch.float16, device=device)
    o_off = msa.sparse_decode_atten_func(q, k_hnd, v_hnd, idx, page_table=pt, seqused_k=sk, seqlen_q=1,
                                         max_seqlen_k=640)
    o_dir = msa.flash_decode_with_gqa_share_sparse(q, None, kc, vc, r2t, sk, torch.arange(b, device=device), 128,
                                                   idx)
    assert (o_off.float() - o_dir.float()).abs().max().item() == 0
    w = msa.SparseDecodePagedAttentionWrapper().plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=640,
                                                     q2k_indices=idx, num_qo_heads=hkv * g, num_kv_heads=hkv)
    assert torch.equal(w.run(q, k_hnd, v_hnd), o_dir)


# ---------------------------------------------------------------------------------------------------
# naive reference (6.6)
# ---------------------------------------------------------------------------------------------------


def _to_5d(prob, max_len):
    """Contiguous 5-D cache [B, 2, max_len, Hkv, D] holding each request's logical tokens (slot b)."""
    q, k, v, r2t, sl, sid, idx = prob
    b = q.shape[0]
    cache = torch.zeros(b, 2, max_len, k.shape[1], k.shape[2], dtype=k.dtype, device=k.device)
    for i in range(b):
        L = min(int(sl[i]), r2t.shape[1], max_len)
        slots = r2t[int(sid[i]), :L].long() % k.shape[0]
        cache[i, 0, :L] = k[slots]
        cache[i, 1, :L] = v[slots]
    return cache


@pytest.mark.kernels_ci
@pytest.mark.parametrize("with_sink", [False, True])
def test_naive_reference(device, with_sink):
    prob = make_direct([300, 0, 129, 70], hkv=2, g=3, topk=5, device=device)
    q, k, v, r2t, sl, sid, idx = prob
    sink = torch.randn(6, 64, device=device) if with_sink else None
    cache = _to_5d(prob, 320)
    out = msa.naive_flash_decode_with_gqa_share_sparse(q, sink, cache, sl, torch.arange(4, device=device), 128, idx)
    o_ref, _ = token_major_decode_ref(q, k, v, r2t, sl, sid, 128, idx, sink=sink)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_attn(out, o_ref, atol=2e-3)
    assert (out[1] == 0).all()
    # negative slot_ids index from the end (Python semantics)
    out_neg = msa.naive_flash_decode_with_gqa_share_sparse(q, sink, cache, sl, torch.arange(4, device=device) - 4,
                                                           128, idx)
    assert torch.equal(out_neg, out)
    # the kernel agrees with the naive reference
    out_k = run_direct(prob, 128, sink=sink)
    assert_close_attn(out_k, out.double(), atol=2e-3)


# ---------------------------------------------------------------------------------------------------
# errors, custom op, compile
# ---------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
def test_errors(device):
    q, k, v, r2t, sl, sid, idx = make_direct([300, 100], hkv=2, g=4, topk=4, device=device)
    U = msa.MsaUnsupportedError

    def call(q=q, sink=None, k=k, v=v, r2t=r2t, sl=sl, sid=sid, bs=128, idx=idx):
        return msa.flash_decode_with_gqa_share_sparse(q, sink, k, v, r2t, sl, sid, bs, idx)

    cases = [
        (dict(q=q.float()), TypeError),
        (dict(q=q.to(FP8), k=k.to(FP8), v=v.to(FP8)), TypeError),  # fp8 q rejected by the direct helper
        (dict(k=k.to(FP8), v=v.to(FP8)), TypeError),  # fp16 q + fp8 cache
        (dict(k=k.bfloat16()), TypeError),
        (dict(v=v.bfloat16()), TypeError),
        (dict(sl=sl[:1]), ValueError),
        (dict(sid=torch.zeros(3, dtype=torch.int32, device=device)), ValueError),
        (dict(idx=idx[:1]), ValueError),
        (dict(idx=idx[:, :1]), ValueError),
        (dict(bs=96), ValueError),
        (dict(bs=8), ValueError),
        (dict(bs=1024), ValueError),
        (dict(q=q[:, :7]), ValueError),
        (dict(q=q[..., :32], k=k[..., :32], v=v[..., :32]), U),
        (dict(q=q[..., :32]), U),
        (dict(k=k[..., :32], v=v[..., :32]), ValueError),
        (dict(v=v[:, :1]), ValueError),
        (dict(r2t=r2t.float()), TypeError),
        (dict(sl=sl.short()), TypeError),
        (dict(idx=idx.to(torch.int16)), TypeError),
        (dict(sink=torch.randn(8, 32, device=device)), ValueError),
        (dict(sink=torch.zeros(8, 64, dtype=torch.int32, device=device)), TypeError),
        (dict(r2t=r2t[0]), ValueError),
    ]
    for kw, exc in cases:
        with pytest.raises(exc):
            call(**kw)
    kbig = torch.randn(k.shape[0], 1, 64, dtype=k.dtype, device=device)
    with pytest.raises(U):  # G = 65 > 64
        msa.flash_decode_with_gqa_share_sparse(torch.randn(2, 65, 64, dtype=q.dtype, device=device), None, kbig, kbig,
                                               r2t, sl, sid, 128, idx[:1])


@pytest.mark.kernels_ci
def test_opcheck_token_major(device):
    q, k, v, r2t, sl, sid, idx = make_direct([300, 100], hkv=2, g=4, topk=4, device=device)
    sink = torch.randn(8, 64, device=device)
    from torch.library import opcheck

    opcheck(msa.decode._sparse_decode_fwd, (q, k, v, idx, r2t, sl, sid, sink, 1, 64, 1, True, 0.125, 0, False))


def test_compile_fullgraph(device):
    prob = make_direct([300, 100], hkv=2, g=4, topk=4, device=device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    f = msa.flash_decode_with_gqa_share_sparse
    cf = torch.compile(lambda *a: f(*a) + 1, fullgraph=True, backend=backend)
    q, k, v, r2t, sl, sid, idx = prob
    assert torch.equal(cf(q, None, k, v, r2t, sl, sid, 128, idx), f(q, None, k, v, r2t, sl, sid, 128, idx) + 1)


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("g", [1, 3, 16, 32, 64])
def test_gpu_bf16(g):
    dev = torch.device("cuda")
    for d, bs in ((128, 128), (64, 16), (256, 256)):
        prob = make_direct([32768, 1, 5000, 129], hkv=max(1, 64 // g), g=g, d=d, bs=bs, topk=16,
                           dtype=torch.bfloat16, device=dev)
        check_direct(run_direct(prob, bs), prob, bs)


@requires_cuda
def test_gpu_fp8_cache_bitwise_widened():
    dev = torch.device("cuda")
    prob = make_direct([32768, 70000, 3], hkv=4, g=16, d=128, topk=16, dtype=torch.bfloat16, kv_dtype=FP8, device=dev)
    q, k, v, *rest = prob
    out8 = run_direct(prob, 128)
    outw = run_direct((q, k.to(torch.bfloat16), v.to(torch.bfloat16), *rest), 128)
    # API: SHOULD be bitwise, MUST be within bf16 tolerance of the widened run (see decode.py docstring)
    if not torch.equal(out8, outw):
        warnings.warn(f"fp8 cache not bitwise equal to widened bf16: max |dO| = "
                      f"{(out8.float() - outw.float()).abs().max().item():.3g}")
    assert_close_attn(out8, outw.double(), what="fp8 vs widened")
    check_direct(out8, prob, 128)


@requires_cuda
def test_gpu_cuda_graph_replay():
    dev = torch.device("cuda")
    q, k, v, r2t, sl, sid, idx = make_direct([16384] * 8, hkv=4, g=16, d=128, topk=16, dtype=torch.bfloat16,
                                             device=dev, ids="valid")
    f = msa.flash_decode_with_gqa_share_sparse
    f(q, None, k, v, r2t, sl, sid, 128, idx)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(q, None, k, v, r2t, sl, sid, 128, idx)
    for step in range(3):
        r2t.copy_(r2t[:, torch.randperm(r2t.shape[1], device=dev)])
        sl.copy_(torch.randint(0, 16385, sl.shape, device=dev, dtype=sl.dtype))
        sid.copy_(sid[torch.randperm(sid.shape[0], device=dev)])
        idx.copy_(torch.randint(-1, 130, idx.shape, device=dev, dtype=idx.dtype))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        check_direct(out, (q, k, v, r2t, sl, sid, idx), 128)
