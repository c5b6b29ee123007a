"""CUDA-graph capture once, replay with new metadata (API.md 3.6: "Replays MUST be correct for new contents
of every input tensor, including seqused_k, page_table, seq_lens, req_to_token and the index tensors").

Every test captures one call (after an eager warm-up), then for several steps writes NEW contents into the
captured input buffers (queries, lengths incl. 0 and beyond the addressable storage, shuffled / aliased page
tables and req_to_token rows, index rows with -1 anywhere, duplicates, out-of-range ids and empty rows),
poisons the outputs, replays, and compares the replay

* with the float64 reference of tests/reference.py (bf16 gate: cosine >= 0.9999, max-abs <= 1e-2), and
* bit for bit with an eager call on the same buffers (the same kernels and launch policy).

Covered: ``sparse_decode_atten_func``, ``SparseDecodePagedAttentionWrapper`` (planned once with the
maximum sizes, ``run`` captured), ``flash_decode_with_gqa_share_sparse``, the decode indexer
``flash_decode_with_topk_idx`` feeding the decode in one graph (selection -> attention), and CSR build ->
prefill. GPU only; every test is also tagged ``sanitize`` (scripts/sanitize.sh runs them under
compute-sanitizer memcheck).
"""

import importlib
import os

import pytest
import torch

from .helpers import (GRAPH_STEPS as STEPS, HAS_CUDA, assert_bitwise_equal, assert_close_attn, assert_lse_close,
                      capture_cuda_graph, msa, poison_like, random_index_row, replay_steps)
from .reference import paged_decode_ref, token_major_decode_ref
from .test_indexer import _decode_ref_scores, _ref_select
from .test_prefill import BF16_ATOL, check as prefill_check, make_inputs as prefill_inputs, random_q2k, to_paged

pytestmark = [pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"), pytest.mark.gpu, pytest.mark.sanitize]

ix_mod = importlib.import_module(msa.__name__ + ".indexer")
tuning = importlib.import_module(msa.__name__ + ".tuning")
DEV = "cuda"
BF16 = torch.bfloat16
BS = 128  # official page / block size
D = 128


def _adversarial_rows(rows, nbs, topk, gen):
    """Fill ``rows`` (int tensor [R, topk], CPU) with index rows for requests of ``nbs[r]`` blocks.

    Mostly random ids in [-2, nb + 3) (negatives anywhere, out of range, duplicates); plus one empty row,
    one row repeating a single id, one row of only out-of-range / negative ids and one valid shuffled row.
    """
    for r, nb in enumerate(nbs):
        kind = int(torch.randint(0, 8, (1,), generator=gen))
        if kind == 0:
            row = torch.full((topk,), -1)
        elif kind == 1:
            row = torch.full((topk,), int(torch.randint(0, max(nb, 1), (1,), generator=gen)))
        elif kind == 2:
            row = torch.tensor([nb + 1, -7, 10 ** 6, nb] * topk)[:topk]
        elif kind == 3:
            row = random_index_row(nb, topk, "valid")
        else:
            row = random_index_row(nb, topk, "messy")
        rows[r] = row
    return rows


def _lengths(b, cap, gen):
    """``b`` KV lengths mixing 0, 1, page edges, the full table and beyond it (caller error, must be masked)."""
    pool = [0, 1, 127, 128, 129, cap - 1, cap, cap + 77, int(torch.randint(1, cap + 1, (1,), generator=gen))]
    pick = torch.randint(0, len(pool), (b,), generator=gen)
    lens = [pool[int(i)] for i in pick]
    lens[int(torch.randint(0, b, (1,), generator=gen))] = 0 if b > 1 else lens[0]
    return lens


# ------------------------------------------------------------------------------------------------
# paged HND decode: sparse_decode_atten_func and the wrapper
# ------------------------------------------------------------------------------------------------


class PagedDecode:
    """Static buffers of a paged decode problem; ``refill`` writes new adversarial contents in place.

    q [B*sq, Hkv*G, 128], k/v [num_pages, Hkv, 128, 128] bf16 (``kv="nvfp4"``: packed uint8
    [num_pages, Hkv, 128, 64] with 128x4-swizzled scales and fp32 global scales, API.md 5.13 conventions),
    q2k int32 [Hkv, B*sq, topk] (or None), page_table int32 [B, maxp], seqused_k int32 [B].
    """

    def __init__(self, b, hkv, g, sq, topk, maxp, *, dense=False, kv="bf16", extra_pages=3, seed=0):
        dev = DEV
        self.b, self.hkv, self.g, self.sq, self.topk, self.maxp = b, hkv, g, sq, topk, maxp
        self.num_pages = b * maxp + extra_pages
        self.nvfp4 = kv == "nvfp4"
        if self.nvfp4:  # packed E2M1 pages + swizzled scales + global scales, rewritten in place by refill
            self.kq, self.vq = msa.quantize_kv_bf16_to_nvfp4_128x4(*self._random_kv())
            self.k, self.v = self.kq.data, self.vq.data
        else:
            self.k, self.v = self._random_kv()
        self.q = torch.empty(b * sq, hkv * g, D, dtype=BF16, device=dev)
        self.idx = None if dense else torch.empty(hkv, b * sq, topk, dtype=torch.int32, device=dev)
        self.pt = torch.empty(b, maxp, dtype=torch.int32, device=dev)
        self.sk = torch.empty(b, dtype=torch.int32, device=dev)
        self.gen = torch.Generator().manual_seed(seed)
        self.refill(0)

    def _random_kv(self, gen=None):
        shape = (self.num_pages, self.hkv, BS, D)
        return tuple(torch.randn(shape, generator=gen).to(BF16).to(DEV) for _ in range(2))

    @property
    def cap(self):
        return self.maxp * BS

    def kv_kwargs(self):
        if not self.nvfp4:
            return {}
        return dict(k_scale_128x4=self.kq.scale_128x4, v_scale_128x4=self.vq.scale_128x4,
                    k_global_scale=self.kq.global_scale, v_global_scale=self.vq.global_scale)

    def kv_reference(self):
        """Exact K/V values (float64): e2m1 * E4M3 scale * global scale for NVFP4."""
        if not self.nvfp4:
            return self.k, self.v
        return tuple(msa.dequantize_nvfp4_128x4_to_bf16(t, include_global_scale=False).double()
                     * t.global_scale.double() for t in (self.kq, self.vq))

    def refill(self, step):
        gen = self.gen
        lens = _lengths(self.b, self.cap, gen)
        self.sk.copy_(torch.tensor(lens, dtype=torch.int32))
        if step % 2 == 0:  # a shuffled permutation of the pool
            pt = torch.randperm(self.num_pages, generator=gen)[: self.b * self.maxp].view(self.b, self.maxp)
        else:  # aliased pages (several logical blocks on one physical page)
            pt = torch.randint(0, self.num_pages, (self.b, self.maxp), generator=gen)
        self.pt.copy_(pt.to(torch.int32))
        self.q.copy_(torch.randn(self.q.shape, generator=gen).to(BF16))
        if self.nvfp4 and step:  # new cache contents, scales and global scales (read on the device)
            for dst, src in zip((self.kq, self.vq), msa.quantize_kv_bf16_to_nvfp4_128x4(*self._random_kv(gen))):
                for f in ("data", "scale_128x4", "global_scale"):
                    getattr(dst, f).copy_(getattr(src, f))
        if self.idx is not None:
            nbs = [-(-lens[r // self.sq] // BS) for r in range(self.b * self.sq)]
            rows = torch.empty(self.hkv, self.b * self.sq, self.topk, dtype=torch.int64)
            for h in range(self.hkv):
                _adversarial_rows(rows[h], nbs, self.topk, gen)
            self.idx.copy_(rows.to(torch.int32))

    def functional(self, causal=True):
        return msa.sparse_decode_atten_func(self.q, self.k, self.v, self.idx, page_table=self.pt, seqused_k=self.sk,
                                            seqlen_q=self.sq, max_seqlen_k=self.cap, causal=causal,
                                            return_softmax_lse=True, **self.kv_kwargs())

    def run(self, w, **kw):
        return w.run(self.q, self.k, self.v, return_softmax_lse=True, **self.kv_kwargs(), **kw)

    def check(self, out, lse, causal=True, what=""):
        k, v = self.kv_reference()
        o_ref, lse_ref = paged_decode_ref(self.q, k, v, self.idx, self.pt, self.sk, self.sq, causal=causal)
        assert_close_attn(out, o_ref, what=what)
        assert_lse_close(lse, lse_ref)
        empty = torch.isneginf(lse_ref)
        assert (out.float().cpu()[empty] == 0).all(), f"{what}: empty rows must be exactly 0"


# b, hkv, g, sq, topk, maxp: small batches split the KV work (workspaces + self-resetting counters in the graph)
PAGED_CASES = [
    pytest.param(4, 2, 4, 1, 6, 8, id="b4_g4"),
    pytest.param(1, 2, 8, 1, 16, 32, id="b1_split"),
    pytest.param(3, 1, 16, 2, 4, 6, id="mtp_g16"),
    pytest.param(6, 4, 2, 1, 3, 4, id="b6_g2"),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,hkv,g,sq,topk,maxp,kv", [pytest.param(*c.values, "bf16", id=c.id) for c in PAGED_CASES]
                         + [pytest.param(*c.values, "nvfp4", id=c.id + "-nvfp4") for c in PAGED_CASES[:3]])
def test_graph_sparse_decode_atten_func(b, hkv, g, sq, topk, maxp, kv, causal):
    p = PagedDecode(b, hkv, g, sq, topk, maxp, kv=kv, seed=b * 100 + g)
    graph, (out, lse) = capture_cuda_graph(lambda: p.functional(causal))
    replay_steps(graph, (out, lse), p.refill, lambda what: p.check(out, lse, causal, what=what),
                 lambda: p.functional(causal))


def test_graph_dense_decode():
    p = PagedDecode(3, 2, 4, 1, 1, 8, dense=True, seed=7)
    graph, (out, lse) = capture_cuda_graph(lambda: p.functional())
    replay_steps(graph, (out, lse), p.refill, lambda what: p.check(out, lse, what=what), p.functional)


WRAPPER_CASES = [  # (case, dense, plan hint, kv)
    (PAGED_CASES[0], False, None, "bf16"), (PAGED_CASES[0], True, None, "bf16"),
    (PAGED_CASES[1], False, None, "bf16"), (PAGED_CASES[1], False, "fixed_split", "bf16"),
    (PAGED_CASES[1], False, "no_split", "bf16"), (PAGED_CASES[1], True, "fixed_split", "bf16"),
    (PAGED_CASES[2], False, None, "bf16"), (PAGED_CASES[2], True, "no_split", "bf16"),
    (PAGED_CASES[0], False, None, "nvfp4"), (PAGED_CASES[1], False, "fixed_split", "nvfp4"),
]


@pytest.mark.parametrize("b,hkv,g,sq,topk,maxp,dense,hint,kv", [
    pytest.param(*c.values, dense, hint, kv, id=f"{c.id}-{'dense' if dense else 'sparse'}-{hint or 'auto'}-{kv}")
    for c, dense, hint, kv in WRAPPER_CASES])
def test_graph_decode_wrapper(b, hkv, g, sq, topk, maxp, dense, hint, kv):
    """plan once (outside capture) with the maximum sizes; run captured; metadata rewritten in place."""
    p = PagedDecode(b, hkv, g, sq, topk, maxp, dense=dense, kv=kv, seed=b * 10 + sq)
    kw = {"fixed_split_size": 2} if hint == "fixed_split" else {"disable_split_kv": True} if hint == "no_split" else {}
    w = msa.SparseDecodePagedAttentionWrapper()
    w.plan(page_table=p.pt, seqused_k=p.sk, seqlen_q=sq, max_seqlen_k=p.cap, q2k_indices=p.idx,
           num_qo_heads=hkv * g, num_kv_heads=hkv, head_dim=D, enable_cuda_graph=True, **kw)
    out = torch.empty_like(p.q)
    lse = torch.empty(p.q.shape[:2], dtype=torch.float32, device=DEV)
    graph, res = capture_cuda_graph(lambda: p.run(w, out=out, lse=lse))
    assert res[0] is out and res[1] is lse

    def check(what):
        p.check(out, lse, what=what)
        if hint is None:  # same launch policy as the functional API: identical bits
            assert_bitwise_equal((out, lse), p.functional(), f"{what} vs functional")

    replay_steps(graph, (out, lse), p.refill, check, lambda: p.run(w))


# ------------------------------------------------------------------------------------------------
# token-major decode: flash_decode_with_gqa_share_sparse
# ------------------------------------------------------------------------------------------------


class TokenMajor:
    """Static buffers of a token-major decode problem (peer layout); ``refill`` rewrites them in place.

    q [B, Hkv*G, D]; k/v caches [max_slots, Hkv, D]; req_to_token [max_reqs, width]; seq_lens, slot_ids [B];
    topk_idx [Hkv, B, topk]; sink [Hq, D] fp32 or None. Index ids use ``bs``-token blocks.
    """

    def __init__(self, b, hkv, g, d, bs, topk, width, *, idx_dtype=torch.int32, sink=False, max_slots=None,
                 seed=0):
        dev = DEV
        self.b, self.hkv, self.g, self.d, self.bs, self.topk, self.width = b, hkv, g, d, bs, topk, width
        self.max_reqs = b + 3
        self.max_slots = max_slots or b * width + 29
        self.k = torch.randn(self.max_slots, hkv, d, dtype=BF16, device=dev)
        self.v = torch.randn(self.max_slots, hkv, d, dtype=BF16, device=dev)
        self.q = torch.empty(b, hkv * g, d, dtype=BF16, device=dev)
        self.r2t = torch.empty(self.max_reqs, width, dtype=idx_dtype, device=dev)
        self.sl = torch.empty(b, dtype=idx_dtype, device=dev)
        self.sid = torch.empty(b, dtype=idx_dtype, device=dev)
        self.idx = torch.empty(hkv, b, topk, dtype=idx_dtype, device=dev)
        self.sink = torch.empty(hkv * g, d, dtype=torch.float32, device=dev) if sink else None
        self.gen = torch.Generator().manual_seed(seed)
        self.refill(0)

    def refill(self, step):
        gen, ms = self.gen, self.max_slots
        lens = _lengths(self.b, self.width, gen)
        self.sl.copy_(torch.tensor(lens))
        # req_to_token: shuffled slots, with negative entries (python modulo) and entries >= max_slots (wrap)
        r2t = torch.randperm(self.max_reqs * self.width, generator=gen).view(self.max_reqs, self.width) % ms
        wild = torch.rand(r2t.shape, generator=gen) < 0.05
        r2t = torch.where(wild, torch.randint(-ms, 2 * ms, r2t.shape, generator=gen), r2t)
        self.r2t.copy_(r2t)
        if step % 2:  # two requests may share one req_to_token row
            sid = torch.randint(0, self.max_reqs, (self.b,), generator=gen)
        else:
            sid = torch.randperm(self.max_reqs, generator=gen)[: self.b]
        self.sid.copy_(sid)
        self.q.copy_(torch.randn(self.q.shape, generator=gen).to(BF16))
        if self.sink is not None:
            self.sink.copy_(torch.randn(self.sink.shape, generator=gen))
        nbs = [-(-min(L, self.width) // self.bs) for L in lens]
        rows = torch.empty(self.hkv, self.b, self.topk, dtype=torch.int64)
        for h in range(self.hkv):
            _adversarial_rows(rows[h], nbs, self.topk, gen)
        self.idx.copy_(rows)

    def run(self, idx=None, scale=None):
        return msa.flash_decode_with_gqa_share_sparse(self.q, self.sink, self.k, self.v, self.r2t, self.sl, self.sid,
                                                      self.bs, self.idx if idx is None else idx, scale)

    def check(self, out, idx=None, scale=None, what=""):
        o_ref, lse_ref = token_major_decode_ref(self.q, self.k, self.v, self.r2t, self.sl, self.sid, self.bs,
                                                self.idx if idx is None else idx, scale=scale, sink=self.sink)
        assert_close_attn(out, o_ref, what=what)
        assert (out.float().cpu()[torch.isneginf(lse_ref)] == 0).all(), f"{what}: empty rows must be exactly 0"


@pytest.mark.parametrize("b,hkv,g,d,bs,topk,width,idx_dtype,sink", [
    pytest.param(4, 2, 16, 128, 128, 8, 1100, torch.int32, False, id="m3like"),
    pytest.param(3, 2, 4, 64, 64, 5, 700, torch.int64, True, id="int64_sink"),
    pytest.param(1, 1, 32, 128, 16, 16, 4000, torch.int32, True, id="b1_split_bs16"),
    pytest.param(5, 4, 1, 256, 256, 3, 900, torch.int32, False, id="d256"),
])
def test_graph_flash_decode_with_gqa_share_sparse(b, hkv, g, d, bs, topk, width, idx_dtype, sink):
    p = TokenMajor(b, hkv, g, d, bs, topk, width, idx_dtype=idx_dtype, sink=sink, seed=b + d)
    graph, out = capture_cuda_graph(lambda: p.run(scale=0.07))
    replay_steps(graph, (out,), p.refill, lambda what: p.check(out, scale=0.07, what=what),
                 lambda: (p.run(scale=0.07),))


# ------------------------------------------------------------------------------------------------
# decode indexer -> sparse decode in one graph
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_blocks,local_blocks,score_type,with_value", [
    pytest.param(0, 1, "max", False, id="m3"),
    pytest.param(1, 2, "lse", True, id="init_lse_value"),
])
def test_graph_indexer_then_decode(init_blocks, local_blocks, score_type, with_value):
    """flash_decode_with_topk_idx (index heads = KV heads, one shared index-key head) -> its topk_idx feeds
    flash_decode_with_gqa_share_sparse, both captured in one graph; caches, lengths and tables change."""
    b, hkv, g, d, bs, topk, width = 4, 2, 8, 128, 64, 6, 900
    main = TokenMajor(b, hkv, g, d, bs, topk, width, sink=True, seed=11)
    q_idx = torch.empty(b, hkv, d, dtype=BF16, device=DEV)
    k_idx = torch.empty(main.max_slots, 1, d, dtype=BF16, device=DEV)
    v_idx = torch.empty_like(k_idx) if with_value else None
    scale = 0.09
    gen = torch.Generator().manual_seed(5)

    def refill(step):
        main.refill(step)
        q_idx.copy_(torch.randn(q_idx.shape, generator=gen).to(BF16))
        k_idx.copy_(torch.randn(k_idx.shape, generator=gen).to(BF16))
        if v_idx is not None:
            v_idx.copy_(torch.randn(v_idx.shape, generator=gen).to(BF16))

    def pipeline():
        o_idx, idx, none = msa.flash_decode_with_topk_idx(
            q_idx, None, k_idx, v_idx, main.r2t, main.sl, width, main.sid, bs, topk, init_blocks, local_blocks,
            sm_scale=scale, score_type=score_type, disable_index_value=not with_value)
        assert none is None
        return o_idx, idx, main.run(idx=idx)

    graph, (o_idx, idx, out) = capture_cuda_graph(pipeline)
    nbw = -(-width // bs)
    for step in range(1, STEPS + 1):
        refill(step)
        poison_like(idx)
        poison_like(out)
        if o_idx is not None:
            poison_like(o_idx)
        graph.replay()
        torch.cuda.synchronize()
        what = f"replay {step}"
        assert_bitwise_equal((o_idx, idx, out), pipeline(), f"{what} vs eager")
        # selection: exact on the kernel's own block scores, which match the float64 scores
        sc = ix_mod._decode_block_scores_op(q_idx, k_idx, main.r2t, main.sl, main.sid, nbw, bs, scale,
                                            score_type == "lse").cpu()
        sl_c, sid_c, r2t_c = main.sl.cpu(), main.sid.cpu(), main.r2t.cpu()
        ref_sc = _decode_ref_scores(q_idx.cpu(), k_idx.cpu(), r2t_c, sl_c, sid_c, bs, nbw, scale, score_type == "lse")
        assert torch.equal(torch.isneginf(sc), torch.isneginf(ref_sc)), what
        fin = torch.isfinite(ref_sc)
        torch.testing.assert_close(sc[fin].double(), ref_sc[fin], atol=2e-3, rtol=2e-3)
        want_idx = _ref_select(sc, sl_c, width, bs, topk, init_blocks, local_blocks)
        assert torch.equal(idx.cpu(), want_idx), f"{what}: selection differs"
        # attention over the selected blocks
        main.check(out, idx=idx, what=f"{what} decode")
        if with_value:  # dense value attention over all x < L_b of the index cache, no sink
            o_ref, _ = token_major_decode_ref(q_idx, k_idx, v_idx, main.r2t, main.sl, main.sid, bs,
                                              torch.arange(nbw, dtype=torch.int32).view(1, 1, -1).expand(1, b, nbw),
                                              scale=scale)
            assert_close_attn(o_idx, o_ref, what=f"{what} index value")


PDL_ON = dict(decode=dict(pdl=1), decode_nvfp4=dict(pdl=1), decode_scores=dict(pdl=1))


@pytest.mark.parametrize("case", ["paged_split", "paged_nvfp4", "token_major", "indexer_then_decode"])
def test_graph_with_programmatic_dependent_launch(case):
    """The decode and block-score kernels launched with programmatic dependent launch (``pdl=1`` in their launch
    tables): captured, replayed with new metadata, checked against float64 and eager exactly as above."""
    with tuning.override(**PDL_ON):
        if case == "paged_split":
            test_graph_sparse_decode_atten_func(*PAGED_CASES[1].values, "bf16", True)
        elif case == "paged_nvfp4":
            test_graph_sparse_decode_atten_func(*PAGED_CASES[2].values, "nvfp4", True)
        elif case == "token_major":
            test_graph_flash_decode_with_gqa_share_sparse(1, 1, 32, 128, 16, 16, 4000, torch.int32, True)
        else:
            test_graph_indexer_then_decode(0, 1, "max", False)


# ------------------------------------------------------------------------------------------------
# CSR build -> prefill (dense and paged KV)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("paged", [False, True])
def test_graph_csr_prefill(paged):
    """build_k2q_csr + sparse_atten_func captured together; q, ids (-1 / out of range / duplicates / empty
    tokens), the page table and the page pool contents change between replays."""
    lq, lk, hq, hkv, topk = [40, 0, 75, 9], [300, 50, 700, 129], 8, 2, 6
    inp = prefill_inputs(lq, lk, hq, hkv, topk, BF16, DEV)
    total_k = sum(lk)
    sk = torch.tensor(lk, dtype=torch.int32, device=DEV)
    kp, vp, pt = to_paged(inp["k"], inp["v"], lk, inp["cu_k"]) if paged else (None, None, None)

    def step_fn():
        rp, qi = msa.build_k2q_csr(inp["q2k"], inp["cu_q"], inp["cu_k"], 128, total_k=total_k,
                                   max_seqlen_k=max(lk))
        kw = dict(page_table=pt, seqused_k=sk) if paged else {}
        return msa.sparse_atten_func(inp["q"], kp if paged else inp["k"], vp if paged else inp["v"], rp, qi, topk,
                                     cu_seqlens_q=inp["cu_q"], cu_seqlens_k=inp["cu_k"], max_seqlen_q=max(lq),
                                     max_seqlen_k=max(lk), causal=True, return_softmax_lse=True, **kw)

    graph, (out, lse) = capture_cuda_graph(step_fn)
    for step in range(1, STEPS + 1):
        q2k = random_q2k(lq, lk, hkv, topk, "random")  # ids in [-1, nb + 1]
        q2k[:, 3] = -1  # an empty token
        q2k[:, 5, :] = q2k[:, 5, :1]  # one id repeated
        inp["q2k"].copy_(q2k)
        inp["q"].copy_(torch.randn(inp["q"].shape).to(BF16))
        if paged:
            kp2, vp2, pt2 = to_paged(inp["k"], inp["v"], lk, inp["cu_k"])  # new shuffled table and pool
            kp.copy_(kp2)
            vp.copy_(vp2)
            pt.copy_(pt2)
        poison_like(out)
        poison_like(lse)
        graph.replay()
        torch.cuda.synchronize()
        prefill_check(out, lse, inp, atol=BF16_ATOL, causal=True)
        assert_bitwise_equal((out, lse), step_fn(), f"replay {step} vs eager")


# ------------------------------------------------------------------------------------------------
# long replay: one capture, REPLAYS replays with the metadata changing between replays (issue #13, item 4)
# ------------------------------------------------------------------------------------------------

REPLAYS = int(os.environ.get("MSA_GRAPH_REPLAYS", "10000"))  # scripts/sanitize.sh uses fewer
CHECK_EVERY = 100


def _banks(refill, bufs, n):
    """``n`` snapshots of ``bufs`` after ``refill(i)`` (device tensors): contents to copy in between replays."""
    out = [[] for _ in bufs]
    for i in range(n):
        refill(i)
        for j, t in enumerate(bufs):
            out[j].append(t.clone())
    return [torch.stack(x) for x in out]


@pytest.mark.parametrize("case", ["paged_b4", "paged_b1_split", "paged_b3_mtp_nvfp4", "token_major"])
def test_graph_decode_long_replay(case):
    """Capture one decode call once and replay it REPLAYS (10,000) times while the metadata changes between
    replays as in a serving loop: every KV length grows by one token per replay (wrapping through 0 and through
    lengths beyond the page table / req_to_token width, which must be masked), pages / req_to_token rows are
    re-mapped (shuffled and aliased tables), the index rows change (-1 anywhere, duplicates, out-of-range ids),
    and q changes. The updates are device-side copies (no host sync in the loop). Every CHECK_EVERY-th replay
    (and the last) runs on NaN-poisoned outputs and is compared with the float64 reference and bit for bit with
    an eager call: no drift (split workspaces and their self-resetting counters), no stale state."""
    if case == "token_major":
        p = TokenMajor(4, 2, 8, 128, 64, 8, 1100, sink=True, seed=3)
        lens_buf, mod = p.sl, p.width + 50
        banks = _banks(p.refill, (p.r2t, p.sid, p.idx, p.q), 7)
        bufs = (p.r2t, p.sid, p.idx, p.q)
        graph, out = capture_cuda_graph(lambda: p.run())
        outs = (out,)

        def check(what):
            p.check(out, what=what)
            assert_bitwise_equal(out, p.run(), f"{what} vs eager")
    else:
        b, hkv, g, sq, topk, maxp, kv = {"paged_b4": (4, 2, 4, 1, 6, 8, "bf16"),
                                         "paged_b1_split": (1, 2, 8, 1, 16, 32, "bf16"),
                                         "paged_b3_mtp_nvfp4": (3, 1, 16, 2, 4, 6, "nvfp4")}[case]
        p = PagedDecode(b, hkv, g, sq, topk, maxp, kv=kv, seed=b + maxp)
        lens_buf, mod = p.sk, p.cap + 64
        banks = _banks(p.refill, (p.pt, p.idx, p.q), 7)
        bufs = (p.pt, p.idx, p.q)
        graph, (out, lse) = capture_cuda_graph(lambda: p.functional())
        outs = (out, lse)

        def check(what):
            p.check(out, lse, what=what)
            assert_bitwise_equal((out, lse), p.functional(), f"{what} vs eager")
    periods = (7, 5, 3, 2)[: len(bufs)]  # co-prime-ish periods: the table / index / q combinations keep changing
    checked = 0
    for step in range(1, REPLAYS + 1):
        lens_buf.add_(1).remainder_(mod)  # every request one token longer (wrapping through 0 and past the table)
        for t, bank, period in zip(bufs, banks, periods):
            t.copy_(bank[(step // period) % bank.shape[0]])
        last = step == REPLAYS
        if step % CHECK_EVERY == 0 or last:
            for t in outs:
                poison_like(t)
        graph.replay()
        if step % CHECK_EVERY == 0 or last:
            torch.cuda.synchronize()
            check(f"{case}: replay {step} of {REPLAYS}")
            checked += 1
    assert checked >= REPLAYS // CHECK_EVERY
