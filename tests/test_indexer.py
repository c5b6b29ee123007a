"""Decode indexer (docs/API.md §6.1, §6.1.1, §6.5, §11.2): scores, selection, chunked score kernel, against
references.

The FP4 prefill indexer (``fp4_indexer_block_scores``) is tested in tests/test_fp4_indexer.py.
"""

import contextlib
import importlib
import math

import pytest
import torch

from .helpers import msa

ix = importlib.import_module(msa.__name__ + ".indexer")
ixk = importlib.import_module(msa.__name__ + ".indexer_kernel")
tuning = importlib.import_module(msa.__name__ + ".tuning")


# ------------------------------------------------------------------------------------------------
# decode indexer (§6.1, §6.5, §11.2)
# ------------------------------------------------------------------------------------------------

flash_decode_with_topk_idx = getattr(msa, "flash_decode_with_topk_idx", None) or ix.flash_decode_with_topk_idx
naive_flash_decode_with_topk_idx = (getattr(msa, "naive_flash_decode_with_topk_idx", None)
                                    or ix.naive_flash_decode_with_topk_idx)


def _decode_ref_scores(q, kc, r2t, seq_lens, slot_ids, bs, nbw, scale, lse):
    B, Hq, D = q.shape
    Hkv = kc.shape[1]
    out = torch.full((Hq, B, nbw), -math.inf, dtype=torch.float64)
    for b in range(B):
        L = max(0, min(int(seq_lens[b]), r2t.shape[1]))
        toks = r2t[int(slot_ids[b]), :L].long() % kc.shape[0]
        for h in range(Hq):
            z = kc[toks, h // (Hq // Hkv)].double() @ q[b, h].double() * scale
            for j in range(min(-(-L // bs), nbw)):
                zz = z[j * bs:(j + 1) * bs]
                out[h, b, j] = torch.logsumexp(zz, 0) if lse else zz.max()
    return out


def _ref_select(sc, seq_lens, width, bs, topk, init_blocks, local_blocks):
    Hq, B, NB = sc.shape
    idx = torch.full((Hq, B, topk), -1, dtype=torch.int32)
    for b in range(B):
        L = max(0, min(int(seq_lens[b]), width))
        nb = min(-(-L // bs), NB)
        local = list(range(max(0, nb - local_blocks), nb))
        init = [j for j in range(min(init_blocks, nb)) if j not in local]
        for h in range(Hq):
            rest = [j for j in range(nb) if j not in local + init and sc[h, b, j] > -math.inf]
            rest.sort(key=lambda j: (-float(sc[h, b, j]), j))
            order = (init + local + rest)[:topk]
            idx[h, b, :len(order)] = torch.tensor(order, dtype=torch.int32)
    return idx


@pytest.mark.parametrize("score_type", ["max", "lse"])
@pytest.mark.parametrize("init_blocks,local_blocks", [(0, 1), (2, 1), (1, 3), (0, 0)])
def test_decode_indexer_selection(device, score_type, init_blocks, local_blocks):
    B, Hq, Hkv, D, bs, topk = 3, 4, 2, 64, 16, 4
    max_slots, width = 200, 112
    q = torch.randn(B, Hq, D, dtype=torch.float16)
    kc = torch.randn(max_slots, Hkv, D, dtype=torch.float16)
    r2t = torch.randint(-max_slots, max_slots, (5, width), dtype=torch.int32)
    seq_lens = torch.tensor([100, 0, 150], dtype=torch.int32)  # 150 > width: clamped
    slot_ids = torch.tensor([4, 0, 2], dtype=torch.int64)
    scale = 0.125
    _, idx, none = flash_decode_with_topk_idx(
        q.to(device), None, kc.to(device), None, r2t.to(device), seq_lens.to(device), 112, slot_ids.to(device), bs,
        topk, init_blocks, local_blocks, sm_scale=scale, score_type=score_type, disable_index_value=True)
    assert none is None and idx.dtype == torch.int32 and tuple(idx.shape) == (Hq, B, topk)
    sc = _decode_ref_scores(q, kc, r2t, seq_lens, slot_ids, bs, 7, scale, score_type == "lse")
    # kernel scores vs reference
    got_sc = ix._decode_block_scores_op(q.to(device), kc.to(device), r2t.to(device), seq_lens.to(device),
                                        slot_ids.to(device), 7, bs, scale, score_type == "lse").cpu()
    assert torch.equal(torch.isneginf(got_sc), torch.isneginf(sc))
    fin = torch.isfinite(sc)
    torch.testing.assert_close(got_sc[fin].double(), sc[fin], atol=1e-3, rtol=1e-3)
    # selection exact on the kernel's own scores
    assert torch.equal(idx.cpu(), _ref_select(got_sc, seq_lens, width, bs, topk, init_blocks, local_blocks))


def test_decode_indexer_o_and_naive(device):
    B, Hq, Hkv, D, bs, topk, max_len = 2, 4, 1, 64, 16, 3, 64
    q = torch.randn(B, Hq, D, dtype=torch.float16)
    kv = torch.randn(3, 2, max_len, Hkv, D, dtype=torch.float16)
    sink = torch.randn(Hq, D, dtype=torch.float32)
    seq_lens = torch.tensor([50, 17], dtype=torch.int32)
    slot_ids = torch.tensor([2, 0], dtype=torch.int32)
    o_n, idx_n = naive_flash_decode_with_topk_idx(q, sink, kv, seq_lens, max_len, slot_ids, bs, topk,
                                                  sm_scale=None, init_blocks=1, local_blocks=1)
    # the same data as a token-major cache
    kc = kv[:, 0].reshape(3 * max_len, Hkv, D)
    vc = kv[:, 1].reshape(3 * max_len, Hkv, D)
    r2t = (torch.arange(3).view(3, 1) * max_len + torch.arange(max_len).view(1, -1)).to(torch.int32)
    o, idx, _ = flash_decode_with_topk_idx(q.to(device), sink.to(device), kc.to(device), vc.to(device),
                                           r2t.to(device), seq_lens.to(device), max_len, slot_ids.to(device), bs,
                                           topk, 1, 1, score_type="max", disable_index_value=False)
    assert torch.equal(idx.cpu(), idx_n)
    assert o.dtype == q.dtype and (o.cpu().float() - o_n.float()).abs().max() <= 2e-3


def _int_valued_kv_case(B, Hq, Hkv, D, max_len, n_slots, dtype):
    """Small integer q / K / V: every score is an exact integer in fp32 and float64 alike (ties included), so the
    kernel's selection must equal the float64 reference's id for id."""
    q = torch.randint(-2, 3, (B, Hq, D)).to(dtype)
    kv = torch.randint(-2, 3, (n_slots, 2, max_len, Hkv, D)).to(dtype)
    kc = kv[:, 0].reshape(n_slots * max_len, Hkv, D)
    r2t = (torch.arange(n_slots).view(n_slots, 1) * max_len + torch.arange(max_len).view(1, -1)).to(torch.int32)
    return q, kv, kc, r2t


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_indexer_init_local_vs_naive(device, dtype):
    """Every init in {0, 1, 3} x local in {0, 1, 2}: exact ids against naive_flash_decode_with_topk_idx (float64).
    Lengths 0, one token, partial last block, whole blocks, past the cache width (clamped); int32 and int64
    seq_lens give the same ids. bf16 on a GPU only (the interpreter's bf16 is not trusted)."""
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 runs on a GPU only")
    B, Hq, Hkv, D, bs, max_len = 6, 4, 2, 64, 16, 112  # 7 blocks per request
    q, kv, kc, r2t = _int_valued_kv_case(B, Hq, Hkv, D, max_len, 7, dtype)
    seq_lens = torch.tensor([112, 0, 1, 40, 500, 33], dtype=torch.int32)
    slot_ids = torch.tensor([6, 0, 2, 3, 1, 5], dtype=torch.int32)
    dev_args = [t.to(device) for t in (q, kc, r2t, seq_lens, slot_ids)]
    for init in (0, 1, 3):
        for local in (0, 1, 2):
            for topk in (2, 8):
                _, idx_n = naive_flash_decode_with_topk_idx(q.float(), None, kv.float(), seq_lens, max_len, slot_ids,
                                                            bs, topk, sm_scale=1.0, init_blocks=init,
                                                            local_blocks=local)
                _, idx, _ = flash_decode_with_topk_idx(dev_args[0], None, dev_args[1], None, dev_args[2],
                                                       dev_args[3], max_len, dev_args[4], bs, topk, init, local,
                                                       sm_scale=1.0, disable_index_value=True)
                assert idx.dtype == torch.int32 and tuple(idx.shape) == (Hq, B, topk)
                assert torch.equal(idx.cpu(), idx_n), (init, local, topk)
                if topk != 8:
                    continue
                _, idx64, _ = flash_decode_with_topk_idx(dev_args[0], None, dev_args[1], None, dev_args[2],
                                                         dev_args[3].long(), max_len, dev_args[4].long(), bs, topk,
                                                         init, local, sm_scale=1.0, disable_index_value=True)
                assert torch.equal(idx64.cpu(), idx_n), ("int64", init, local, topk)


@pytest.mark.parametrize("init_blocks,local_blocks", [(1, 2), (3, 0), (0, 1)])
def test_decode_indexer_max_seqlen_below_lengths(device, init_blocks, local_blocks):
    """max_seqlen < seq_lens (NB from max_seqlen) and seq_lens > width, int32 straight into the top-k and int64
    clamped first: both equal the exact order on the kernel's scores with n = min(ceil(min(L, width)/bs), NB)."""
    B, Hq, Hkv, D, bs, topk, width = 4, 2, 1, 64, 16, 6, 96
    q, kc, r2t, seq_lens, slot_ids = _ragged_case(B, Hq, Hkv, D, 50, width, [96, 300, 20, -4])
    args = [t.to(device) for t in (q, kc, r2t, seq_lens, slot_ids)]
    for max_seqlen in (40, 96, 1000):
        nbw = -(-min(max_seqlen, width) // bs)
        sc = _scores_op(*args, nbw, bs, 0.125, False).cpu()
        want = _ref_select(sc, seq_lens, width, bs, topk, init_blocks, local_blocks)
        for sl in (args[3], args[3].long()):
            _, idx, _ = flash_decode_with_topk_idx(args[0], None, args[1], None, args[2], sl, max_seqlen, args[4],
                                                   bs, topk, init_blocks, local_blocks, sm_scale=0.125,
                                                   disable_index_value=True)
            assert torch.equal(idx.cpu(), want), (max_seqlen, sl.dtype)


def _tiny_indexer_args(device):
    """A valid small decode-indexer call: q [2, 4, 64] fp16, index-K cache [32, 2, 64], req_to_token [2, 32]
    (zeros), seq_lens [5, 9], slot_ids [0, 1]."""
    q = torch.randn(2, 4, 64, dtype=torch.float16, device=device)
    kc = torch.randn(32, 2, 64, dtype=torch.float16, device=device)
    r2t = torch.zeros(2, 32, dtype=torch.int32, device=device)
    sl = torch.tensor([5, 9], dtype=torch.int32, device=device)
    si = torch.tensor([0, 1], dtype=torch.int32, device=device)
    return q, kc, r2t, sl, si


def test_decode_indexer_fast_check_agrees(device):
    """The eager fast check accepts only what the full validation accepts (and the common call)."""
    q, kc, r2t, sl, si = _tiny_indexer_args(device)
    base = dict(q=q, sink=None, k_cache=kc, v_cache=None, req_to_token=r2t, seq_lens=sl, max_seqlen=32, slot_ids=si,
                block_size=16, topk=2, init_blocks=1, local_blocks=1, score_type="max", disable_index_value=True)
    assert ix._decode_indexer_fast_ok(**base)
    variants = [dict(block_size=24), dict(block_size=8), dict(block_size=16.0), dict(topk=0), dict(topk=65),
                dict(topk=True), dict(init_blocks=-1), dict(local_blocks=-1), dict(local_blocks=1.0),
                dict(max_seqlen=32.0), dict(max_seqlen=True), dict(score_type="sum"), dict(q=q.float()),
                dict(q=q[0]), dict(k_cache=kc.bfloat16()), dict(k_cache=kc[:, :, :32]), dict(k_cache=kc[:, :1].expand(32, 3, 64)),
                dict(req_to_token=r2t.float()), dict(req_to_token=r2t[0]), dict(seq_lens=sl[:1]),
                dict(seq_lens=sl.to(torch.int16)), dict(slot_ids=si.view(2, 1)), dict(seq_lens=sl.to("meta")),
                dict(v_cache=kc), dict(disable_index_value=False), dict(sink=torch.randn(4, 64, device=device)),
                dict(q=torch.randn(2, 4, 32, dtype=torch.float16, device=device))]
    for v in variants:
        kw = dict(base, **v)
        assert not ix._decode_indexer_fast_ok(**kw), v
        mx = kw.pop("max_seqlen")
        try:
            ix._validate_decode_indexer(**kw)
            if isinstance(mx, bool) or not isinstance(mx, int):
                raise ValueError("max_seqlen")
        except (TypeError, ValueError):  # MsaUnsupportedError is a ValueError
            continue
        # accepted by the full validation: only the value / sink variants (not on the fast path by design)
        assert set(v) <= {"v_cache", "disable_index_value", "sink"}, v


def test_decode_indexer_errors(device):
    q, kc, r2t, sl, si = _tiny_indexer_args(device)
    args = [q, None, kc, None, r2t, sl, 32, si, 16, 2, 0, 1]
    flash_decode_with_topk_idx(*args, disable_index_value=True)
    with pytest.raises(ValueError):
        flash_decode_with_topk_idx(*args, score_type="sum", disable_index_value=True)
    with pytest.raises(ValueError):
        flash_decode_with_topk_idx(*args)  # v_cache None
    with pytest.raises(ValueError):
        flash_decode_with_topk_idx(*args[:9], 65, 0, 1, disable_index_value=True)
    with pytest.raises(ValueError):
        flash_decode_with_topk_idx(*args[:8], 24, 2, 0, 1, disable_index_value=True)
    with pytest.raises(ValueError):
        flash_decode_with_topk_idx(*args[:10], -1, 1, disable_index_value=True)
    with pytest.raises(TypeError):
        flash_decode_with_topk_idx(q.float(), *args[1:], disable_index_value=True)
    with pytest.raises(ValueError):
        flash_decode_with_topk_idx(*args[:5], sl[:1], *args[6:], disable_index_value=True)
    with pytest.raises(ValueError):
        flash_decode_with_topk_idx(*args, disable_index_value=True, use_dense_main_attn=True)


# ------------------------------------------------------------------------------------------------
# decode block scores: chunked grid (request, KV head, chunk of tiles), shared K tile for all Q heads
# ------------------------------------------------------------------------------------------------

def _scores_op(q, kc, r2t, seq_lens, slot_ids, nbw, bs, scale, lse):
    """Run the score op on fresh NaN-poisoned memory (the caching allocator hands the block back on CUDA)."""
    B, Hq, _ = q.shape
    torch.full((Hq, B, max(nbw, 1)), float("nan"), device=q.device).fill_(float("nan"))
    return ix._decode_block_scores_op(q, kc, r2t, seq_lens, slot_ids, nbw, bs, scale, lse)


def _check_scores(got, ref, atol=1e-3):
    got = got.cpu()
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert not torch.isnan(got).any(), "unwritten / NaN scores"
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "-inf pattern differs"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin].double(), ref[fin], atol=atol, rtol=1e-3)


@pytest.fixture
def score_cfg():
    """Change the block-score launch entry for the rest of the test (``tuning.override(decode_scores=...)``)."""
    with contextlib.ExitStack() as stack:
        def set_cfg(tn=None, progs_per_sm=None, max_tpp=None):
            changes = {}
            if tn is not None:
                changes["tn"] = {64: tn, 128: tn, 256: tn}
            if progs_per_sm is not None:
                changes["progs_per_sm"] = progs_per_sm
            if max_tpp is not None:
                changes["max_tpp"] = max_tpp
            return stack.enter_context(tuning.override(decode_scores=changes))
        yield set_cfg


def _ragged_case(B, Hq, Hkv, D, max_slots, width, lens, n_rows=None, dtype=torch.float16):
    q = torch.randn(B, Hq, D, dtype=dtype)
    kc = torch.randn(max_slots, Hkv, D, dtype=dtype)
    r2t = torch.randint(-2 * max_slots, 2 * max_slots, (n_rows or B + 2, width), dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    slot_ids = torch.randperm(n_rows or B + 2)[:B].to(torch.int32)
    return q, kc, r2t, seq_lens, slot_ids


@pytest.mark.parametrize("bs,tn,max_tpp", [(16, 32, 3), (32, 32, 4), (64, 32, 1), (64, 32, 3), (16, 64, 2)])
@pytest.mark.parametrize("lse", [False, True])
def test_decode_scores_chunked(device, score_cfg, bs, tn, max_tpp, lse):
    """Tiles of tn tokens (whole blocks per tile when bs <= tn, several tiles per block when bs > tn), several
    tiles per program (progs_per_sm tiny -> max_tpp bites), ragged lengths incl. 0 and > width, out-of-range
    and negative req_to_token entries (mod max_slots), B = 5, GQA 2 Q heads per KV head."""
    score_cfg(tn=tn, progs_per_sm=1, max_tpp=max_tpp)
    B, Hq, Hkv, D, width = 5, 4, 2, 64, 200
    lens = [200, 0, 37, 129, 500]  # 500 > width: clamped
    q, kc, r2t, seq_lens, slot_ids = _ragged_case(B, Hq, Hkv, D, 97, width, lens)
    scale = 0.2
    nbw = -(-width // bs)
    args = [t.to(device) for t in (q, kc, r2t, seq_lens, slot_ids)]
    got = _scores_op(*args, nbw, bs, scale, lse)
    _check_scores(got, _decode_ref_scores(q, kc, r2t, seq_lens, slot_ids, bs, nbw, scale, lse))
    if not lse:  # chunking never changes a max score: same tile -> bitwise equal whatever tiles per program
        score_cfg(tn=tn, progs_per_sm=1000, max_tpp=1)
        assert torch.equal(_scores_op(*args, nbw, bs, scale, lse), got)


def test_decode_scores_short_width_and_bad_slots(device, score_cfg):
    """NB < ceil(L/bs) (max_seqlen below the lengths: nothing past NB written), slot_ids outside [0, max_reqs)
    (contract violation: the request reads nothing and scores -inf), all lengths 0, G = 1 and G = 8."""
    score_cfg(tn=32, progs_per_sm=1, max_tpp=2)
    B, D, width, bs = 4, 64, 96, 16
    for Hq, Hkv in ((2, 2), (8, 1)):
        q, kc, r2t, seq_lens, slot_ids = _ragged_case(B, Hq, Hkv, D, 50, width, [96, 80, 5, 60], n_rows=4)
        slot_ids = torch.tensor([1, 4, -1, 3], dtype=torch.int32)  # 4 and -1 are out of range
        got = _scores_op(q.to(device), kc.to(device), r2t.to(device), seq_lens.to(device), slot_ids.to(device),
                         3, bs, 0.125, False).cpu()
        ref = _decode_ref_scores(q, kc, r2t, seq_lens, slot_ids.clamp(0, 3), bs, 3, 0.125, False)
        ref[:, 1:3] = -math.inf
        _check_scores(got, ref)
    zero = torch.zeros(B, dtype=torch.int32)
    got = _scores_op(q.to(device), kc.to(device), r2t.to(device), zero.to(device), slot_ids.clamp(0, 3).to(device),
                     6, bs, 0.125, True)
    assert torch.isneginf(got).all()


def test_decode_scores_int64_indices_strided(device, score_cfg):
    """int64 req_to_token / seq_lens / slot_ids, non-contiguous seq_lens / slot_ids and q."""
    score_cfg(tn=32, progs_per_sm=1, max_tpp=2)
    B, Hq, Hkv, D, width, bs = 3, 4, 1, 64, 80, 32
    q, kc, r2t, seq_lens, slot_ids = _ragged_case(B, Hq, Hkv, D, 64, width, [80, 33, 1])
    q_nc = torch.randn(B, Hq, 2 * D, dtype=q.dtype)[..., ::2]
    sl = torch.stack([seq_lens, seq_lens + 7], 1).long()[:, 0]
    si = torch.stack([slot_ids, slot_ids], 1).long()[:, 1]
    nbw = -(-width // bs)
    got = _scores_op(q_nc.to(device), kc.to(device), r2t.long().to(device), sl.to(device), si.to(device), nbw, bs,
                     0.3, False)
    _check_scores(got, _decode_ref_scores(q_nc, kc, r2t, seq_lens, slot_ids, bs, nbw, 0.3, False))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("init_blocks,local_blocks", [(0, 1), (1, 2)])
def test_decode_indexer_selection_chunked(device, score_cfg, init_blocks, local_blocks):
    """End to end with several tiles per program: selection equals the exact order on the kernel's scores."""
    score_cfg(tn=32, progs_per_sm=1, max_tpp=4)
    B, Hq, Hkv, D, width, bs, topk = 5, 4, 1, 64, 256, 16, 5
    q, kc, r2t, seq_lens, slot_ids = _ragged_case(B, Hq, Hkv, D, 300, width, [256, 0, 17, 150, 96])
    args = [t.to(device) for t in (q, kc, r2t, seq_lens, slot_ids)]
    _, idx, _ = flash_decode_with_topk_idx(args[0], None, args[1], None, args[2], args[3], width, args[4], bs, topk,
                                           init_blocks, local_blocks, sm_scale=0.1, disable_index_value=True)
    sc = _scores_op(*args, width // bs, bs, 0.1, False).cpu()
    _check_scores(sc, _decode_ref_scores(q, kc, r2t, seq_lens, slot_ids, bs, width // bs, 0.1, False))
    assert torch.equal(idx.cpu(), _ref_select(sc, seq_lens, width, bs, topk, init_blocks, local_blocks))


def test_decode_scores_opcheck(device, score_cfg):
    score_cfg(tn=32, progs_per_sm=1, max_tpp=2)
    q, kc, r2t, seq_lens, slot_ids = _ragged_case(2, 4, 1, 64, 40, 64, [64, 20])
    args = tuple(t.to(device) for t in (q, kc, r2t, seq_lens, slot_ids)) + (4, 16, 0.125, False)
    torch.library.opcheck(ix._decode_block_scores_op, args)


@pytest.mark.parametrize("score_type", ["max", "lse"])
def test_decode_block_scores_public(device, score_type):
    """``msa.decode_block_scores`` (docs/API.md §6.1.1): the scores ``flash_decode_with_topk_idx`` ranks, against
    the float64 reference (ragged lengths incl. 0 and > width, wrapped req_to_token entries, default scale)."""
    q, kc, r2t, seq_lens, slot_ids = _ragged_case(3, 4, 2, 64, 50, 80, [70, 0, 200])
    args = [t.to(device) for t in (q, kc, r2t, seq_lens, slot_ids)]
    got = msa.decode_block_scores(*args, 6, 16, score_type=score_type)
    ref = _decode_ref_scores(q, kc, r2t, seq_lens, slot_ids, 16, 6, 64 ** -0.5, score_type == "lse")
    _check_scores(got, ref)
    assert torch.equal(got, msa.decode_block_scores(*args, 6, 16, sm_scale=64 ** -0.5, score_type=score_type))
    assert msa.decode_block_scores(*args, 0, 16).shape == (4, 3, 0)
    _, idx, _ = flash_decode_with_topk_idx(args[0], None, args[1], None, *args[2:4], 96, args[4], 16, 3, 0, 1,
                                           score_type=score_type, disable_index_value=True)
    assert torch.equal(idx.cpu(), _ref_select(got.cpu(), seq_lens, 80, 16, 3, 0, 1))


def test_decode_block_scores_errors():
    q, kc, r2t, seq_lens, slot_ids = _ragged_case(2, 4, 2, 64, 50, 80, [70, 3])
    ok = (q, kc, r2t, seq_lens, slot_ids, 5, 16)
    for bad, exc in [((q, kc, r2t, seq_lens, slot_ids, -1, 16), ValueError),
                     ((q, kc, r2t, seq_lens, slot_ids, 5.0, 16), ValueError),
                     ((q, kc, r2t, seq_lens, slot_ids, 5, 24), ValueError),
                     ((q, kc, r2t, seq_lens[:1], slot_ids, 5, 16), ValueError),
                     ((q, kc[:, :, :32], r2t, seq_lens, slot_ids, 5, 16), ValueError),
                     ((q, kc.float(), r2t, seq_lens, slot_ids, 5, 16), TypeError),
                     ((q, kc, r2t.float(), seq_lens, slot_ids, 5, 16), TypeError)]:
        with pytest.raises(exc):
            msa.decode_block_scores(*bad)
    with pytest.raises(ValueError, match="score_type"):
        msa.decode_block_scores(*ok, score_type="mean")


def test_decode_scores_plan_per_override(device):
    """A plan made inside ``tuning.override(decode_scores=...)`` is cached apart from the table's plan."""
    case = _ragged_case(2, 4, 2, 64, 300, 256, [250, 100])
    args = tuple(t.to(device) for t in case) + (16, 16)
    ref = msa.decode_block_scores(*args)
    n = len(ixk._PLAN_CACHE)
    with tuning.override(decode_scores=dict(tn={64: 16}, progs_per_sm=1, max_tpp=1)):
        got = msa.decode_block_scores(*args)
        inner = [v for k, v in ixk._PLAN_CACHE.items() if k[-1] is not None]
    assert len(ixk._PLAN_CACHE) == n + 1 and inner and inner[-1][4][2] == 16  # TN constexpr of the inner plan
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(msa.decode_block_scores(*args), ref) and len(ixk._PLAN_CACHE) == n + 1


def test_decode_score_plan_and_aot_table():
    """Plans cover every block exactly once (tiles_per_prog a multiple of the tiles per block) and every
    per-arch entry is in the AOT list."""
    for major in (None, 9, 10, 12):
        cfg = ixk.decode_score_config(major)
        for D in (64, 128, 256):
            for bs in (16, 32, 64, 128, 256, 512):
                for NB, rows, sms in ((1, 1, 132), (1024, 32, 132), (256, 1, 132), (7, 5, 8), (3, 40, 48)):
                    TN, tpp, n_chunks = ixk.decode_score_plan(cfg, D, bs, NB, rows, sms)
                    tpb = max(1, bs // TN)
                    assert tpp % tpb == 0 and 1 <= tpp
                    assert n_chunks * tpp * TN >= NB * bs and (n_chunks - 1) * tpp * TN < NB * bs
    for arch in (90, 100, 120, 121):
        cfg = ixk.decode_score_config(arch // 10)
        aot = [c for c in ixk.aot_configs(arch) if c.fn.__name__ == "_decode_block_scores_kernel"]
        assert {(c.args["D"], c.args["TN"]) for c in aot} == {(D, cfg.tn[D]) for D in (64, 128, 256)}
        assert {(c.num_warps, c.num_stages) for c in aot} == {(cfg.num_warps, cfg.num_stages)}
        assert any(c.args["D"] == 128 and c.args["BS"] == 128 and c.args["q_ptr"] == "*bf16" and not c.args["LSE"]
                   and c.args["GP"] == 16 for c in aot)  # the M3 launch


def _m3_case(dev, lens, width, dtype=torch.bfloat16, kdtype=None, Hq=4, Hkv=1, D=128, shuffle=True):
    """Paged token-major cache: 128-token pages in shuffled order through req_to_token."""
    B = len(lens)
    pages = width // 128
    n_rows = B + 1
    kc = torch.randn(n_rows * width, Hkv, D, device=dev, dtype=dtype)
    if kdtype is not None:
        kc = (kc.float() * 4).to(kdtype)
    perm = torch.randperm(n_rows * pages, device=dev) if shuffle else torch.arange(n_rows * pages, device=dev)
    r2t = (perm.view(n_rows, pages).unsqueeze(-1) * 128 + torch.arange(128, device=dev)).view(n_rows, width)
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    seq_lens = torch.tensor(lens, device=dev, dtype=torch.int32)
    slot_ids = torch.randperm(n_rows, device=dev)[:B].to(torch.int32)
    return q, kc, r2t.to(torch.int32), seq_lens, slot_ids


def _gpu_ref_scores(q, kc, r2t, seq_lens, slot_ids, bs, nbw, scale, lse):
    """float64 reference on the GPU (vectorised): [Hq, B, nbw]."""
    B, Hq, D = q.shape
    Hkv = kc.shape[1]
    G = Hq // Hkv
    width = r2t.shape[1]
    out = torch.full((Hq, B, nbw), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(B):
        L = max(0, min(int(seq_lens[b]), width))
        if L == 0:
            continue
        tok = r2t[int(slot_ids[b]), :L].long() % kc.shape[0]
        k = kc[tok].double()  # [L, Hkv, D]
        z = torch.einsum("lgd,gjd->gjl", k, q[b].double().view(Hkv, G, D)).reshape(Hq, L) * scale
        nb = min(-(-L // bs), nbw)
        zp = torch.full((Hq, nb * bs), -math.inf, dtype=torch.float64, device=q.device)
        zp[:, :min(L, nb * bs)] = z[:, :nb * bs]
        zb = zp.view(Hq, nb, bs)
        out[:, b, :nb] = torch.logsumexp(zb, -1) if lse else zb.amax(-1)
    return out.cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("kdtype", [None, torch.float8_e4m3fn])
def test_gpu_decode_indexer_m3_32k(cuda_device, kdtype):
    """M3 shape at 32K: Hq 4 index heads, one index-key head, D 128, block 128, top-16, local block forced;
    ragged lengths (full, partial block, 1 token, 0); scores vs float64, selection exact on the kernel's scores
    and against the float64 scores where there are no near-ties; CUDA-graph replay with new lengths."""
    width, bs, topk = 32768, 128, 16
    lens = [32768, 20000, 1, 0, 32767]
    q, kc, r2t, seq_lens, slot_ids = _m3_case(cuda_device, lens, width, kdtype=kdtype)
    sc = _scores_op(q, kc, r2t, seq_lens, slot_ids, width // bs, bs, 128 ** -0.5, False)
    ref = _gpu_ref_scores(q, kc, r2t, seq_lens, slot_ids, bs, width // bs, 128 ** -0.5, False)
    _check_scores(sc, ref, atol=2e-3)

    def call():
        return flash_decode_with_topk_idx(q, None, kc, None, r2t, seq_lens, width, slot_ids, bs, topk, 0, 1,
                                          score_type="max", disable_index_value=True)[1]

    idx = call()
    assert torch.equal(idx.cpu(), _ref_select(sc.cpu(), seq_lens.cpu(), width, bs, topk, 0, 1))
    ref_idx = _ref_select(ref.float(), seq_lens.cpu(), width, bs, topk, 0, 1)
    rows_same = (idx.cpu() == ref_idx).all(-1)
    assert rows_same.float().mean() >= 0.9  # differences only from fp32-vs-float64 near-ties
    # CUDA graph: capture once, replay with other lengths / slots
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        idx_g = call()
    seq_lens.copy_(torch.tensor([100, 32768, 4097, 129, 0], device=cuda_device, dtype=torch.int32))
    slot_ids.copy_(slot_ids.flip(0))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(idx_g, call())
    sc2 = _scores_op(q, kc, r2t, seq_lens, slot_ids, width // bs, bs, 128 ** -0.5, False)
    assert torch.equal(idx_g.cpu(), _ref_select(sc2.cpu(), seq_lens.cpu(), width, bs, topk, 0, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("D,bs,Hq,Hkv,lse", [(128, 16, 4, 1, False), (128, 512, 4, 1, True), (64, 64, 8, 2, True),
                                             (256, 128, 16, 1, False), (128, 256, 64, 1, False),
                                             (128, 128, 4, 1, True)])
def test_gpu_decode_scores_configs(cuda_device, D, bs, Hq, Hkv, lse):
    """The GPU launch table across head dims, block sizes (whole blocks per tile / tiles per block), GQA up to 64
    and lse; bf16, ragged lengths incl. 0; unwritten blocks would show as NaN."""
    width = 4096
    q, kc, r2t, seq_lens, slot_ids = _m3_case(cuda_device, [4096, 1000, 0, 129], width, Hq=Hq, Hkv=Hkv, D=D)
    nbw = width // bs
    sc = _scores_op(q, kc, r2t, seq_lens, slot_ids, nbw, bs, D ** -0.5, lse)
    _check_scores(sc, _gpu_ref_scores(q, kc, r2t, seq_lens, slot_ids, bs, nbw, D ** -0.5, lse), atol=2e-3)
