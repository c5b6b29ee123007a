"""The eager fast path (``_launch.py``): validated-signature caches, direct Triton launches, per-stream workspaces.

Every decode entry point keeps the results of the custom-op path bit for bit, whatever hits the caches, and bad
input after a cached good call still raises the spec'd error.
"""

import importlib

import pytest
import torch

from .helpers import msa
from .test_decode_direct import make_direct

launch_mod = importlib.import_module(msa.__name__ + "._launch")
decode_mod = importlib.import_module(msa.__name__ + ".decode")
dk = importlib.import_module(msa.__name__ + ".decode_kernel")


def _paged(device, b=2, hkv=2, g=4, maxp=5, topk=3, dtype=torch.float16):
    num_pages = b * maxp + 3
    k = torch.randn(num_pages, hkv, 128, 128, dtype=dtype, device=device)
    v = torch.randn_like(k)
    pt = torch.randperm(num_pages)[: b * maxp].view(b, maxp).to(torch.int32).to(device)
    sk = torch.randint(1, maxp * 128 + 1, (b,), dtype=torch.int32).to(device)
    idx = torch.randint(-1, maxp + 1, (hkv, b, topk), dtype=torch.int32).to(device)
    q = torch.randn(b, hkv * g, 128, dtype=dtype, device=device)
    return q, k, v, idx, pt, sk


def _official_op(q, k, v, idx, pt, sk, maxk, lse=False):
    """The custom-op path (what torch.compile traces) for the same call."""
    hint = decode_mod._dense_hint(pt, maxk)
    return decode_mod._sparse_decode_fwd(
        q, k, v, idx, pt, sk, None, None, dk.LAYOUT_HND, 128, 1, True, 128 ** -0.5, hint, lse)


@pytest.mark.kernels_ci
def test_official_cache_hits_match_custom_op(device):
    decode_mod._SIG.clear()
    for _ in range(3):  # fresh data, same signature: the first call validates, the others hit the cache
        q, k, v, idx, pt, sk = _paged(device)
        out, lse = msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1,
                                                max_seqlen_k=640, return_softmax_lse=True)
        ref_o, ref_l = _official_op(q, k, v, idx, pt, sk, 640, lse=True)
        assert torch.equal(out, ref_o)
        assert torch.equal(lse, ref_l)
    assert len(decode_mod._SIG) == 1


@pytest.mark.kernels_ci
def test_bad_input_after_cached_signature_still_raises(device):
    q, k, v, idx, pt, sk = _paged(device)
    kw = dict(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=640)
    msa.sparse_decode_atten_func(q, k, v, idx, **kw)
    with pytest.raises(TypeError):
        msa.sparse_decode_atten_func(q, k, v, idx, **dict(kw, seqlen_q=True))  # True == 1, but not an int
    with pytest.raises(TypeError):
        msa.sparse_decode_atten_func(q, k, v, idx.to(torch.int64), **kw)
    with pytest.raises(ValueError):
        msa.sparse_decode_atten_func(q, k, v, idx, **dict(kw, seqused_k=sk[:1]))
    with pytest.raises(TypeError):
        msa.sparse_decode_atten_func(q, k.float(), v.float(), idx, **kw)
    q2, k2, v2, *rest = make_direct([130, 70], hkv=2, g=2, topk=2, device=device)
    r2t, sl, sid, tidx = rest
    msa.flash_decode_with_gqa_share_sparse(q2, None, k2, v2, r2t, sl, sid, 128, tidx)
    with pytest.raises(ValueError):
        msa.flash_decode_with_gqa_share_sparse(q2, None, k2, v2, r2t, sl, sid, 100, tidx)
    with pytest.raises(TypeError):
        msa.flash_decode_with_gqa_share_sparse(q2, None, k2, v2, r2t.float(), sl, sid, 128, tidx)


@pytest.mark.kernels_ci
def test_wrapper_run_cache(device):
    q, k, v, idx, pt, sk = _paged(device)
    w = msa.SparseDecodePagedAttentionWrapper().plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=640,
                                                     q2k_indices=idx, num_qo_heads=q.shape[1],
                                                     num_kv_heads=k.shape[1])
    ref = msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=640)
    o = torch.full_like(q, float("nan"))
    for _ in range(3):
        assert w.run(q, k, v, out=o) is o
        assert torch.equal(o, ref)
    o2, lse = w.run(q, k, v, return_softmax_lse=True)
    assert torch.equal(o2, ref) and lse.shape == q.shape[:2]
    sk.fill_(128)  # planned tensors are read by every run: new contents, no new plan
    ref2 = msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=640)
    assert torch.equal(w.run(q, k, v), ref2)
    with pytest.raises(ValueError):
        w.run(q[:1], k, v)
    with pytest.raises(TypeError):
        w.run(q, k, v, out=torch.empty_like(q, dtype=torch.float32))


@pytest.mark.kernels_ci
def test_direct_cache_hits_match_reference(device):
    from .test_decode_direct import check_direct, run_direct

    for _ in range(2):
        prob = make_direct([300, 0, 129], hkv=2, g=4, topk=3, device=device, width=320)
        check_direct(run_direct(prob, 128), prob, 128)


@pytest.mark.kernels_ci
def test_direct_empty_cache(device):
    q = torch.randn(2, 4, 64, dtype=torch.float16, device=device)
    k = torch.empty(0, 2, 64, dtype=torch.float16, device=device)
    r2t = torch.zeros(2, 8, dtype=torch.int32, device=device)
    sl = torch.tensor([5, 0], dtype=torch.int32, device=device)
    sid = torch.arange(2, dtype=torch.int32, device=device)
    idx = torch.zeros(2, 2, 1, dtype=torch.int32, device=device)
    for _ in range(2):
        out = msa.flash_decode_with_gqa_share_sparse(q, None, k, k, r2t, sl, sid, 16, idx)
        assert torch.equal(out, torch.zeros_like(q))


def test_signature_cache_bound():
    c = launch_mod.SignatureCache(limit=3)
    for i in range(10):
        c.put(i, i)
        assert len(c) <= 3
    assert c[9] == 9


def test_tensor_key():
    t = torch.zeros(2, 3)
    assert launch_mod.tensor_key(None) is None
    assert launch_mod.tensor_key(t) == (torch.float32, torch.Size([2, 3]), (3, 1), -1)
    assert launch_mod.tensor_key(t.t()) != launch_mod.tensor_key(t)


@pytest.mark.gpu
def test_gpu_direct_launch_alignment(cuda_device):
    """The direct launch is keyed on 16-byte alignment: a misaligned view after an aligned call stays correct."""
    from .test_decode_direct import check_direct

    prob = make_direct([300, 129], hkv=2, g=4, d=128, topk=3, device=cuda_device, width=320)
    q, k, v, r2t, sl, sid, idx = prob
    first = msa.flash_decode_with_gqa_share_sparse(q, None, k, v, r2t, sl, sid, 128, idx)
    again = msa.flash_decode_with_gqa_share_sparse(q, None, k, v, r2t, sl, sid, 128, idx)
    assert torch.equal(first, again)
    big = torch.empty(q.numel() + 1, dtype=q.dtype, device=cuda_device)
    q_mis = big[1:].view_as(q)
    q_mis.copy_(q)
    assert q_mis.data_ptr() % 16 != 0
    assert torch.equal(msa.flash_decode_with_gqa_share_sparse(q_mis, None, k, v, r2t, sl, sid, 128, idx), first)
    check_direct(first, prob, 128)


@pytest.mark.gpu
def test_gpu_eager_between_graph_replays(cuda_device):
    """Eager calls (per-stream workspaces) interleaved with replays of a captured call (its own workspaces)."""
    q, k, v, idx, pt, sk = _paged(cuda_device, b=1, hkv=4, g=16, maxp=64, topk=16, dtype=torch.bfloat16)
    kw = dict(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=64 * 128)
    assert dk.make_plan(cuda_device, B=1, Hkv=4, G=16, SQ=1, D=128, BS=128, topk=16, hint_blocks=0).num_splits > 1
    ref = msa.sparse_decode_atten_func(q, k, v, idx, **kw).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        msa.sparse_decode_atten_func(q, k, v, idx, **kw)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g = msa.sparse_decode_atten_func(q, k, v, idx, **kw)
    for i in range(20):
        g.replay()
        e = msa.sparse_decode_atten_func(q, k, v, idx, **kw)
        torch.cuda.synchronize()
        assert torch.equal(out_g, ref) and torch.equal(e, ref), i


@pytest.mark.kernels_ci
def test_tuning_override_never_uses_a_cached_plan(device):
    """Inside ``tuning.override(decode=...)`` the functional fast path is skipped (no plan of another override
    is served from ``_SIG`` or ``make_plan``'s cache) and the launch uses the overridden plan; the wrapper's fast
    path runs only under the overrides its ``plan`` saw."""
    tuning = importlib.import_module(msa.__name__ + ".tuning")
    decode_mod._SIG.clear()
    q, k, v, idx, pt, sk = _paged(device)
    kw = dict(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=640, return_softmax_lse=True)
    shape = dict(B=2, Hkv=2, G=4, SQ=1, D=128, BS=128, topk=3, hint_blocks=0)
    split = dk.make_plan(q.device, **shape)
    o0, l0 = msa.sparse_decode_atten_func(q, k, v, idx, **kw)
    assert len(decode_mod._SIG) == 1 and split.num_splits > 1
    with tuning.override(decode=dict(max_splits=1)):
        assert dk.make_plan(q.device, **shape).num_splits == 1
        o1, l1 = msa.sparse_decode_atten_func(q, k, v, idx, **kw)
        ref_o, ref_l = _official_op(q, k, v, idx, pt, sk, 640, lse=True)  # the custom op under the same override
        w = msa.SparseDecodePagedAttentionWrapper().plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=640,
                                                         q2k_indices=idx, num_qo_heads=8, num_kv_heads=2)
        assert not w.split_kv
        ow = [w.run(q, k, v) for _ in range(2)]
    assert len(decode_mod._SIG) == 1 and dk.make_plan(q.device, **shape) is split
    assert torch.equal(o1, ref_o) and torch.equal(l1, ref_l) and torch.equal(ow[0], o1) and torch.equal(ow[1], o1)
    torch.testing.assert_close(o1, o0, atol=2e-3, rtol=0)  # another split count: reassociation only
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=0)
    assert len(w._run_sigs) == 1  # planned and run inside the block: its fast path was used
    with tuning.override(decode=dict(max_splits=1)):
        assert torch.equal(w.run(q, k, v), o1)  # a new block (other Overrides object): validated path
