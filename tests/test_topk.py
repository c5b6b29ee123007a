"""native_topk_from_scores (API.md §6.3 / §11.3): exact equality with an independent reference.

CPU runs exercise the PyTorch fallback; CUDA runs exercise the native op (when the build has it) and compare it
with the fallback. GPU-only: native-vs-fallback stress, CUDA graphs, opcheck, torch.compile with inductor.
"""

import math

import numpy as np
import pytest
import torch

from .helpers import msa, poison_like, requires_cuda

topk_mod = msa.topk


# ----------------------------------------------------------------------------------------------------------
# reference (numpy, per row): forced [n-m, n) ascending, then candidates by (score desc, id asc), then -1
# ----------------------------------------------------------------------------------------------------------
def ref_topk(score, seq_lens, block_size, topk, force=0):
    s = score.detach().double().cpu().numpy()
    sl = seq_lens.detach().cpu().numpy().astype(np.int64)
    H, B, NB = s.shape
    out = np.full((H, B, topk), -1, dtype=np.int64)
    for b in range(B):
        n = min(math.ceil(max(int(sl[b]), 0) / block_size), NB)
        f_lo = max(n - force, 0) if force > 0 else n
        forced = np.arange(f_lo, n)
        js = np.arange(f_lo)
        for h in range(H):
            v = s[h, b, :f_lo]
            ok = ~np.isnan(v) & (v != -np.inf)
            jj, vv = js[ok], v[ok] + 0.0
            order = jj[np.lexsort((jj, -vv))]  # primary: score desc; secondary: id asc
            row = np.concatenate([forced, order])[:topk]
            out[h, b, : row.size] = row
    return torch.from_numpy(out).to(torch.int32)


def check_against_torch_topk(out, score, seq_lens, block_size, force=0):
    """Selected scores == torch.topk values over the valid candidates (multiset check, independent of ties)."""
    H, B, NB = score.shape
    s = score.detach().double().cpu().clone()
    sl = seq_lens.cpu().long().clamp(min=0)
    n = torch.clamp((sl + block_size - 1) // block_size, max=NB)
    j = torch.arange(NB)
    valid = (j[None, :] < n[:, None])[None].expand(H, B, NB) & ~torch.isnan(s) & (s != -math.inf)
    if force > 0:
        forced = ((j[None, :] >= (n - force)[:, None]) & (j[None, :] < n[:, None]))[None].expand(H, B, NB)
        valid = valid & ~forced
    s = torch.where(valid, s, torch.full_like(s, -math.inf))
    o = out.cpu().long()
    for h in range(H):
        for b in range(B):
            row = o[h, b]
            nf = min(max(int(n[b]) - max(int(n[b]) - force, 0), 0), row.numel()) if force > 0 else 0
            sel = row[nf:]
            sel = sel[sel >= 0]
            cnt = int(valid[h, b].sum())
            k = sel.numel()
            assert k == min(cnt, row.numel() - nf), (h, b, k, cnt)
            if k:
                tv = torch.topk(s[h, b], k).values
                got = torch.sort(s[h, b][sel], descending=True).values
                assert torch.equal(got, tv), (h, b)


def assert_topk_equal(out, ref, what=""):
    out = out.cpu()
    assert out.dtype == torch.int32 and out.is_contiguous()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    # as sets first (clearer failure), then as ordered rows
    so, _ = torch.sort(out, dim=-1)
    sr, _ = torch.sort(ref, dim=-1)
    bad = (so != sr).any(-1).nonzero()
    assert bad.numel() == 0, f"{what}: selected sets differ in rows {bad[:5].tolist()}"
    bad = (out != ref).any(-1).nonzero()
    assert bad.numel() == 0, f"{what}: order differs in rows {bad[:5].tolist()}: {out[tuple(bad[0])]} vs {ref[tuple(bad[0])]}"


def make_inputs(H, B, NB, block_size, device, *, ints=True, specials=True, seq_lens=None):
    """Scores with many ties (integer valued) and -inf/NaN/+inf sprinkled; lengths ending mid-block, 0, < 0."""
    if ints:
        score = torch.randint(-8, 8, (H, B, NB), device=device).float()
    else:
        score = torch.randn(H, B, NB, device=device)
    if specials and NB > 0:
        r = torch.rand(H, B, NB, device=device)
        score = torch.where(r < 0.05, torch.full_like(score, -math.inf), score)
        score = torch.where((r >= 0.05) & (r < 0.08), torch.full_like(score, math.nan), score)
        score = torch.where((r >= 0.08) & (r < 0.09), torch.full_like(score, math.inf), score)
        score = torch.where((r >= 0.09) & (r < 0.11), torch.full_like(score, -0.0), score)
    if seq_lens is None:
        seq_lens = torch.randint(-3, NB * block_size + 2 * block_size, (B,), device=device, dtype=torch.int32)
        if B >= 3:
            seq_lens[0] = 0
            seq_lens[1] = -5
            seq_lens[2] = NB * block_size + 7  # longer than the score row
    return score, seq_lens


def run_and_check(score, seq_lens, block_size, topk, force=0, what=""):
    kw = {"force_local_blocks": force} if force else {}
    out = msa.native_topk_from_scores(score, seq_lens, block_size, topk, **kw)
    ref = ref_topk(score, seq_lens, block_size, topk, force)
    assert_topk_equal(out, ref, what)
    return out


# ----------------------------------------------------------------------------------------------------------
# correctness (CPU: the PyTorch fallback; CUDA: the native op when built)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.kernels_ci
@pytest.mark.parametrize("topk", [1, 16, 64])
@pytest.mark.parametrize("NB", [1, 5, 64, 130, 300])
def test_random_ties_and_specials(device, topk, NB):
    H, B, bs = 3, 7, 16
    score, seq_lens = make_inputs(H, B, NB, bs, device)
    out = run_and_check(score, seq_lens, bs, topk, what=f"NB={NB} k={topk}")
    check_against_torch_topk(out, score, seq_lens, bs)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("topk", [1, 16, 64])
def test_distinct_scores(device, topk):
    score, seq_lens = make_inputs(4, 5, 1000, 128, device, ints=False, specials=False)
    out = run_and_check(score, seq_lens, 128, topk)
    check_against_torch_topk(out, score, seq_lens, 128)


@pytest.mark.kernels_ci
def test_nb_8192(device):
    B = 64 if device.type == "cuda" else 6
    for topk in (1, 16, 64):
        score, seq_lens = make_inputs(4, B, 8192, 128, device, ints=(topk != 16))
        out = run_and_check(score, seq_lens, 128, topk, what=f"k={topk}")
        if topk == 16:
            check_against_torch_topk(out, score, seq_lens, 128)


@pytest.mark.kernels_ci
def test_edge_lengths(device):
    NB, bs = 9, 4
    score = torch.randn(2, 8, NB, device=device)
    # 0, negative, exactly one block, one token, mid-block, exact multiple, beyond NB, int32 max
    seq_lens = torch.tensor([0, -1, 4, 1, 6, 36, 1000, 2**31 - 1], dtype=torch.int32, device=device)
    for topk in (1, 3, 9, 20, 64):
        run_and_check(score, seq_lens, bs, topk, what=f"k={topk}")


@pytest.mark.kernels_ci
def test_single_block_and_all_invalid(device):
    score = torch.tensor([[[2.0]], [[-math.inf]], [[math.nan]], [[math.inf]]], device=device)  # [4, 1, 1]
    seq_lens = torch.tensor([1], dtype=torch.int32, device=device)
    out = msa.native_topk_from_scores(score, seq_lens, 128, 4)
    exp = torch.tensor([[[0, -1, -1, -1]], [[-1] * 4], [[-1] * 4], [[0, -1, -1, -1]]], dtype=torch.int32)
    assert torch.equal(out.cpu(), exp)


@pytest.mark.kernels_ci
def test_tie_order_and_signed_zero(device):
    score = torch.tensor([[[1.0, 3.0, 3.0, -0.0, 0.0, 3.0, math.inf, -0.0]]], device=device)
    seq_lens = torch.tensor([8], dtype=torch.int32, device=device)
    out = msa.native_topk_from_scores(score, seq_lens, 1, 8)
    assert out.cpu().tolist() == [[[6, 1, 2, 5, 0, 3, 4, 7]]]


@pytest.mark.kernels_ci
def test_non_contiguous_score(device):
    H, B, NB, bs = 3, 5, 70, 8
    base, seq_lens = make_inputs(B, NB, H, bs, device)  # [B, NB, H] storage
    score = base.permute(2, 0, 1)  # [H, B, NB], non-contiguous
    assert not score.is_contiguous()
    seq_lens = torch.randint(0, NB * bs + 1, (B,), dtype=torch.int32, device=device)
    run_and_check(score, seq_lens, bs, 16)
    sliced = torch.randn(H, B, 2 * NB, device=device)[:, :, ::2]
    run_and_check(sliced, seq_lens, bs, 16)
    sl_strided = torch.randint(0, NB * bs + 1, (2 * B,), dtype=torch.int32, device=device)[::2]
    run_and_check(score, sl_strided, bs, 16)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("force", [1, 3])
@pytest.mark.parametrize("topk", [1, 2, 16])
def test_forced_local_blocks(device, force, topk):
    H, B, NB, bs = 2, 9, 40, 16
    score, seq_lens = make_inputs(H, B, NB, bs, device)
    seq_lens[3] = 17  # n = 2 < force for force=3
    seq_lens[4] = 1  # n = 1
    # local block with -inf / NaN score is still selected
    n5 = 30
    seq_lens[5] = (n5 - 1) * bs + 3
    score[:, 5, n5 - 1] = -math.inf
    score[0, 5, n5 - 2] = math.nan
    out = run_and_check(score, seq_lens, bs, topk, force, what=f"m={force} k={topk}")
    exp_first = list(range(max(n5 - force, 0), n5))[:topk]
    assert out[0, 5, : len(exp_first)].cpu().tolist() == exp_first
    check_against_torch_topk(out, score, seq_lens, bs, force)


@pytest.mark.kernels_ci
def test_forced_more_than_topk_and_blocks(device):
    score = torch.randn(1, 3, 6, device=device)
    seq_lens = torch.tensor([60, 20, 0], dtype=torch.int32, device=device)  # n = 6, 2, 0 (bs = 10)
    out = msa.native_topk_from_scores(score, seq_lens, 10, 3, force_local_blocks=100)
    assert out.cpu().tolist() == [[[0, 1, 2], [0, 1, -1], [-1, -1, -1]]]


# ----------------------------------------------------------------------------------------------------------
# forced init blocks (+ local blocks): the §11.2 decode rule init asc, local asc, rest by (score desc, id asc)
# ----------------------------------------------------------------------------------------------------------
def ref_topk_forced(score, seq_lens, block_size, topk, init=0, local=0):
    """Plain-Python statement of the rule, row by row (independent of ref_topk and of both implementations)."""
    s = score.detach().double().cpu().tolist()
    sl = [int(x) for x in seq_lens.cpu().tolist()]
    H, B, NB = score.shape
    out = torch.full((H, B, topk), -1, dtype=torch.int32)
    for b in range(B):
        n = min(-(-max(sl[b], 0) // block_size), NB)
        loc = list(range(max(n - local, 0), n)) if local > 0 else []
        ini = [j for j in range(min(init, n)) if j not in loc]
        for h in range(H):
            rest = [j for j in range(n) if j not in loc and j not in ini
                    and not math.isnan(s[h][b][j]) and s[h][b][j] != -math.inf]
            rest.sort(key=lambda j: (-s[h][b][j], j))  # -0.0 == 0.0: ties by id
            row = (ini + loc + rest)[:topk]
            out[h, b, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


def _forced_init_inputs(device, NB, bs=8, B=9):
    score, seq_lens = make_inputs(3, B, NB, bs, device)  # integer ties, -inf / NaN / +inf / -0.0
    lens = [0, -5, NB * bs + 3 * bs + 1, 1, bs, bs + 1, 2 * bs - 1, 3 * bs + 2, NB * bs]  # 0, <0, > NB, partial
    seq_lens[:len(lens)] = torch.tensor(lens[:B], dtype=torch.int32)
    score[:, 3, 0] = -math.inf  # n = 1, the only block has no score: still forced (init or local)
    score[1, 4, 0] = math.nan
    return score, seq_lens


@pytest.mark.kernels_ci
@pytest.mark.parametrize("NB", [1, 3, 6, 40])
@pytest.mark.parametrize("init,local", [(1, 0), (2, 0), (3, 1), (1, 2), (5, 3), (100, 0), (2, 100), (0, 2)])
def test_forced_init_blocks(device, NB, init, local):
    """Fallback (CPU) or native op (CUDA) vs the plain statement: init and local overlapping, init >= n,
    topk > n, lengths 0 / < 0 / partial last block / past NB, forced blocks with -inf / NaN scores."""
    score, seq_lens = _forced_init_inputs(device, NB)
    for topk in (1, 2, 4, 16, 64):
        ref = ref_topk_forced(score, seq_lens, 8, topk, init, local)
        fb = topk_mod.topk_from_scores_torch(score, seq_lens, 8, topk, local, force_init_blocks=init)
        assert_topk_equal(fb, ref, f"fallback NB={NB} i={init} m={local} k={topk}")
        out = msa.native_topk_from_scores(score, seq_lens, 8, topk, force_local_blocks=local, force_init_blocks=init)
        assert_topk_equal(out, ref, f"NB={NB} i={init} m={local} k={topk}")


@pytest.mark.kernels_ci
def test_forced_init_order_example(device):
    # n = 6 (block_size 10, length 55): init {0, 1} first (ascending), then local {4, 5}, then by score, ids on ties
    score = torch.tensor([[[-math.inf, 1.0, 7.0, 7.0, math.nan, 9.0, 8.0]]], device=device)  # [1, 1, 7]
    seq_lens = torch.tensor([55], dtype=torch.int32, device=device)
    f = msa.native_topk_from_scores
    assert f(score, seq_lens, 10, 7, force_init_blocks=2, force_local_blocks=2).cpu().tolist() == [
        [[0, 1, 4, 5, 2, 3, -1]]]
    # init overlapping local: block 4 is local, not init; order init {0..3} then local {4, 5}
    assert f(score, seq_lens, 10, 7, force_init_blocks=5, force_local_blocks=2).cpu().tolist() == [
        [[0, 1, 2, 3, 4, 5, -1]]]
    # init only: forced 0 (score -inf) first, then by score: 5 (9), 2, 3 (7, id order), 1; NaN 4 excluded
    assert f(score, seq_lens, 10, 7, force_init_blocks=1).cpu().tolist() == [[[0, 5, 2, 3, 1, -1, -1]]]
    # init >= n with local covering everything: local wins, ascending
    assert f(score, seq_lens, 10, 3, force_init_blocks=50, force_local_blocks=50).cpu().tolist() == [[[0, 1, 2]]]
    # topk smaller than the forced set: the first topk of init + local
    assert f(score, seq_lens, 10, 3, force_init_blocks=2, force_local_blocks=3).cpu().tolist() == [[[0, 1, 3]]]


@pytest.mark.kernels_ci
def test_forced_init_huge_and_zero_length(device):
    score = torch.randn(2, 3, 5, device=device)
    seq_lens = torch.tensor([0, 2**31 - 1, -7], dtype=torch.int32, device=device)
    for init, local in ((2**40, 0), (2**40, 2**40), (3, 2**35)):
        out = msa.native_topk_from_scores(score, seq_lens, 1, 6, force_local_blocks=local, force_init_blocks=init)
        assert_topk_equal(out, ref_topk_forced(score, seq_lens, 1, 6, min(init, 99), min(local, 99)))


@pytest.mark.kernels_ci
def test_empty(device):
    for shape in ((4, 0, 16), (0, 3, 16), (2, 3, 0)):
        score = torch.randn(*shape, device=device)
        seq_lens = torch.full((shape[1],), 100, dtype=torch.int32, device=device)
        out = msa.native_topk_from_scores(score, seq_lens, 8, 5)
        assert out.shape == (shape[0], shape[1], 5) and out.dtype == torch.int32
        assert (out == -1).all()


@pytest.mark.kernels_ci
def test_bad_inputs():
    s = torch.randn(2, 3, 10)
    sl = torch.full((3,), 50, dtype=torch.int32)
    f = msa.native_topk_from_scores
    with pytest.raises(TypeError, match="score"):
        f(s.half(), sl, 8, 4)
    with pytest.raises(TypeError, match="score"):
        f(s.double(), sl, 8, 4)
    with pytest.raises(TypeError, match="seq_lens"):
        f(s, sl.long(), 8, 4)
    with pytest.raises(ValueError, match="score"):
        f(s[0], sl, 8, 4)
    with pytest.raises(ValueError, match="seq_lens"):
        f(s, sl[:2], 8, 4)
    with pytest.raises(ValueError, match="seq_lens"):
        f(s, sl.view(3, 1), 8, 4)
    with pytest.raises(ValueError, match="seq_lens"):
        f(s, sl.to("meta"), 8, 4)  # device mismatch
    with pytest.raises(ValueError, match="topk"):
        f(s, sl, 8, 0)
    with pytest.raises(ValueError, match="topk"):
        f(s, sl, 8, 65)
    with pytest.raises(ValueError, match="block_size"):
        f(s, sl, 0, 4)
    with pytest.raises(ValueError, match="force_local_blocks"):
        f(s, sl, 8, 4, force_local_blocks=-1)
    with pytest.raises(ValueError, match="force_init_blocks"):
        f(s, sl, 8, 4, force_init_blocks=-1)
    with pytest.raises(TypeError, match="force_init_blocks"):
        f(s, sl, 8, 4, force_init_blocks=1.0)
    with pytest.raises(TypeError, match="force_init_blocks"):
        f(s, sl, 8, 4, force_init_blocks=True)
    with pytest.raises(TypeError, match="topk"):
        f(s, sl, 8, 4.0)


@requires_cuda
def test_bad_inputs_cuda(cuda_device):
    s = torch.randn(2, 3, 10, device=cuda_device)
    sl = torch.full((3,), 50, dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens"):
        msa.native_topk_from_scores(s, sl, 8, 4)


@pytest.mark.kernels_ci
def test_has_native_ops_flag():
    """Source-tree mode has no compiled ops; a built variant loads them even without a GPU."""
    import os

    assert msa.has_native_ops() is (os.environ.get("MSA_TEST_SOURCE_TREE") != "1")


@pytest.mark.kernels_ci
def test_torch_compile_fullgraph(device):
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    score, seq_lens = make_inputs(2, 5, 50, 16, device)

    def fn(s, sl):
        return msa.native_topk_from_scores(s, sl, 16, 8, force_local_blocks=1) + 0

    def fn0(s, sl):
        return msa.native_topk_from_scores(s, sl, 16, 8)

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(score, seq_lens)
    assert_topk_equal(out, ref_topk(score, seq_lens, 16, 8, 1))
    out = torch.compile(fn0, fullgraph=True, backend=backend)(score, seq_lens)
    assert_topk_equal(out, ref_topk(score, seq_lens, 16, 8))

    def fn_init(s, sl):
        return msa.native_topk_from_scores(s, sl, 16, 8, force_local_blocks=2, force_init_blocks=1)

    out = torch.compile(fn_init, fullgraph=True, backend=backend)(score, seq_lens)
    assert_topk_equal(out, ref_topk_forced(score, seq_lens, 16, 8, 1, 2))


# ----------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------
def _adversarial(H, B, NB, device, tied, period=1024):
    """Many large keys concentrated in a few warps' elements: forces the kernel's radix-select fallback."""
    j = torch.arange(NB, device=device)
    hot = (j % period) < 32
    base = torch.randn(H, B, NB, device=device)
    big = 1000.0 if tied else 1000.0 + torch.randint(0, 50, (H, B, NB), device=device).float()
    return torch.where(hot, big, base)


@requires_cuda
def test_native_vs_fallback_stress(cuda_device):
    if not msa.has_native_ops():
        pytest.skip("native ops not built (source-tree mode)")
    fb = topk_mod.topk_from_scores_torch
    cases = []
    for NB in (1, 31, 128, 129, 256, 511, 512, 1000, 1024, 2048, 3000, 4096, 8192, 10000, 16384, 20000):
        for topk in (1, 8, 16, 17, 33, 64):
            cases.append((NB, topk))
    for NB, topk in cases:
        H, B = 4, (8 if NB > 4096 else 16)
        for kind in ("ints", "randn", "adv", "adv_tied", "adv128", "adv128_tied", "zeros", "sorted"):
            bs = 64
            if kind == "ints":
                score, seq_lens = make_inputs(H, B, NB, bs, cuda_device)
            elif kind == "randn":
                score, seq_lens = make_inputs(H, B, NB, bs, cuda_device, ints=False)
            else:
                _, seq_lens = make_inputs(H, B, NB, bs, cuda_device, specials=False)
                if kind.startswith("adv"):
                    period = 128 if kind.startswith("adv128") else 1024
                    score = _adversarial(H, B, NB, cuda_device, kind.endswith("tied"), period)
                elif kind == "zeros":
                    score = torch.zeros(H, B, NB, device=cuda_device)
                else:
                    score = torch.arange(NB, device=cuda_device).float().expand(H, B, NB).contiguous()
            for force in (0, 1, 3):
                kw = {"force_local_blocks": force} if force else {}
                out = msa.native_topk_from_scores(score, seq_lens, bs, topk, **kw)
                exp = fb(score, seq_lens, bs, topk, force)
                assert torch.equal(out, exp), f"NB={NB} k={topk} {kind} m={force}"
        # spot-check the fallback itself against the numpy reference
        assert_topk_equal(exp, ref_topk(score, seq_lens, bs, topk, force))


@requires_cuda
def test_native_vs_fallback_forced_init(cuda_device):
    """Native op == PyTorch fallback with forced init blocks, every kernel configuration (register keys, the
    global-memory path past NB 16384) and the radix-select fallback (adversarial data)."""
    if not msa.has_native_ops():
        pytest.skip("native ops not built (source-tree mode)")
    fb = topk_mod.topk_from_scores_torch
    for NB in (1, 7, 128, 129, 600, 2048, 5000, 16384, 20000):
        H, B, bs = 4, 8, 64
        for kind in ("ints", "randn", "adv", "adv_tied"):
            if kind in ("ints", "randn"):
                score, seq_lens = make_inputs(H, B, NB, bs, cuda_device, ints=kind == "ints")
            else:
                _, seq_lens = make_inputs(H, B, NB, bs, cuda_device, specials=False)
                score = _adversarial(H, B, NB, cuda_device, kind.endswith("tied"))
            for init, local in ((1, 0), (1, 2), (3, 1), (64, 0), (2, 70), (NB + 5, 1)):
                for topk in (1, 5, 16, 64):
                    kw = dict(force_local_blocks=local, force_init_blocks=init)
                    out = msa.native_topk_from_scores(score, seq_lens, bs, topk, **kw)
                    exp = fb(score, seq_lens, bs, topk, local, force_init_blocks=init)
                    assert torch.equal(out, exp), f"NB={NB} k={topk} {kind} i={init} m={local}"
    # spot-check the fallback against the plain statement
    sc, sl = _forced_init_inputs(cuda_device, 40)
    assert_topk_equal(fb(sc, sl, 8, 16, 2, force_init_blocks=3), ref_topk_forced(sc, sl, 8, 16, 3, 2))


@requires_cuda
def test_native_deterministic(cuda_device):
    score = _adversarial(4, 64, 8192, cuda_device, tied=True)
    seq_lens = torch.full((64,), 8192 * 128, dtype=torch.int32, device=cuda_device)
    a = msa.native_topk_from_scores(score, seq_lens, 128, 64)
    for _ in range(5):
        assert torch.equal(a, msa.native_topk_from_scores(score, seq_lens, 128, 64))
    assert_topk_equal(a, ref_topk(score, seq_lens, 128, 64))


@requires_cuda
@pytest.mark.parametrize("init,local", [(0, 0), (0, 1), (1, 2)], ids=["plain", "local1", "init1_local2"])
def test_cuda_graph_replay(cuda_device, init, local):
    """Capture once (plain, forced local, forced init + local), replay with new scores and lengths."""
    H, B, NB, bs, topk = 4, 8, 1024, 128, 16
    score, seq_lens = make_inputs(H, B, NB, bs, cuda_device)
    kw = {k: v for k, v in (("force_local_blocks", local), ("force_init_blocks", init)) if v}
    msa.native_topk_from_scores(score, seq_lens, bs, topk, **kw)  # warm-up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = msa.native_topk_from_scores(score, seq_lens, bs, topk, **kw)
    for _ in range(3):
        s2, l2 = make_inputs(H, B, NB, bs, cuda_device)
        score.copy_(s2)
        seq_lens.copy_(l2)
        poison_like(out)
        g.replay()
        torch.cuda.synchronize()
        assert_topk_equal(out, ref_topk_forced(score, seq_lens, bs, topk, init, local))


@requires_cuda
def test_cuda_graph_fallback(cuda_device):
    """The PyTorch path is graph-safe too (used when the native op is absent)."""
    H, B, NB, bs, topk = 2, 4, 300, 16, 16
    score, seq_lens = make_inputs(H, B, NB, bs, cuda_device)
    fb = topk_mod.topk_from_scores_torch
    fb(score, seq_lens, bs, topk, 1)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fb(score, seq_lens, bs, topk, 1)
    s2, l2 = make_inputs(H, B, NB, bs, cuda_device)
    score.copy_(s2)
    seq_lens.copy_(l2)
    g.replay()
    torch.cuda.synchronize()
    assert_topk_equal(out, ref_topk(score, seq_lens, bs, topk, 1))


@requires_cuda
def test_opcheck_native(cuda_device):
    if not msa.has_native_ops():
        pytest.skip("native ops not built (source-tree mode)")
    from torch.library import opcheck

    ops = msa._ops.ops
    score, seq_lens = make_inputs(4, 8, 300, 16, cuda_device)
    out = torch.empty(4, 8, 16, dtype=torch.int32, device=cuda_device)
    opcheck(ops.msa_topk_from_scores.default, (score, seq_lens, 16, 16, out))
    opcheck(ops.msa_topk_from_scores_forced.default, (score, seq_lens, 16, 16, 0, 1, out))
    opcheck(ops.msa_topk_from_scores_forced.default, (score, seq_lens, 16, 16, 2, 1, out))
    opcheck(ops.msa_topk_from_scores_forced.default, (score, seq_lens, 16, 16, 3, 0, out))
    # The C++ op's own validation (RuntimeError for topk=65 etc.) is checked by test_native_op_rejects_invalid_args.


# ----------------------------------------------------------------------------------------------------------
# validation inside the C++ op (peer callers use torch.ops directly): RuntimeError, nothing launched.
# Run in a child process: if raising from the extension ever crashed the interpreter (it once segfaulted on
# the GPU machine), the test fails with the child's output instead of killing the whole pytest run.
# ----------------------------------------------------------------------------------------------------------
_NATIVE_VALIDATION_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[2])
import torch
from tests.helpers import msa

mode = sys.argv[1]  # "cuda": normal dispatch on CUDA tensors; "host": CPU tensors redispatched to the CUDA kernel
ops = msa._ops.ops
dev = "cuda" if mode == "cuda" else "cpu"
cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
P, F = ops.msa_topk_from_scores.default, ops.msa_topk_from_scores_forced.default
s = torch.randn(4, 8, 300, device=dev)
sl = torch.full((8,), 1000, dtype=torch.int32, device=dev)
out = torch.full((4, 8, 16), -12345, dtype=torch.int32, device=dev)
i32 = dict(dtype=torch.int32, device=dev)
# A C++ error raised by torch itself first: tells an environment-wide exception problem from one of this op.
try:
    torch.ones(2, device=dev).view(3)
except RuntimeError:
    print("torch-internal RuntimeError ok", flush=True)
cases = [
    ("topk=65", P, (s, sl, 16, 65, out), "topk must be in [1, 64]"),
    ("topk=0", P, (s, sl, 16, 0, out), "topk must be in [1, 64]"),
    ("block_size=0", P, (s, sl, 0, 16, out), "block_size must be >= 1"),
    ("block_size<0", F, (s, sl, -4, 16, 0, 1, out), "block_size must be >= 1"),
    ("force<0", F, (s, sl, 16, 16, 0, -1, out), "force_local_blocks must be >= 0"),
    ("init<0", F, (s, sl, 16, 16, -1, 0, out), "force_init_blocks must be >= 0"),
    ("forced topk=65", F, (s, sl, 16, 65, 1, 1, out), "topk must be in [1, 64]"),
    ("score fp64", P, (s.double(), sl, 16, 16, out), "score must be float32"),
    ("score 2-D", P, (s[0], sl, 16, 16, out), "score must be 3-D"),
    ("seq_lens int64", P, (s, sl.long(), 16, 16, out), "seq_lens must be int32"),
    ("seq_lens short", P, (s, sl[:7], 16, 16, out), "seq_lens must have shape"),
    ("seq_lens 2-D", P, (s, sl.view(8, 1), 16, 16, out), "seq_lens must have shape"),
    ("out fp32", P, (s, sl, 16, 16, out.float()), "topk_idx must be int32"),
    ("out width", P, (s, sl, 16, 8, out), "topk_idx must have shape"),
    ("out rows", P, (s, sl, 16, 16, torch.empty(4, 7, 16, **i32)), "topk_idx must have shape"),
    ("out strided", P, (s, sl, 16, 16, torch.empty(4, 16, 8, **i32).transpose(1, 2)), "must be contiguous"),
]
if mode == "cuda":
    cases += [
        ("packet call, topk=65", ops.msa_topk_from_scores, (s, sl, 16, 65, out), "topk must be in [1, 64]"),
        ("seq_lens on cpu", P, (s, sl.cpu(), 16, 16, out), "same device"),
        ("out on cpu", F, (s, sl, 16, 16, 1, 1, out.cpu()), "same device"),
    ]
else:
    cases += [("cpu tensors", P, (s, sl, 16, 16, out), "must be a CUDA tensor"),
              ("cpu tensors (forced)", F, (s, sl, 16, 16, 1, 1, out), "must be a CUDA tensor")]
for name, op, args, msg in cases:
    print("case", name, flush=True)
    try:
        op(*args) if mode == "cuda" else op.redispatch(cuda_key, *args)
    except RuntimeError as e:
        if msg not in str(e):
            print(f"FAIL {name}: message {str(e)!r} lacks {msg!r}", flush=True)
            sys.exit(3)
    else:
        print(f"FAIL {name}: no RuntimeError", flush=True)
        sys.exit(2)
if mode == "cuda":
    torch.cuda.synchronize()
    assert bool((out == -12345).all()), "an invalid call wrote topk_idx"
    P(s, sl, 16, 16, out)  # a valid call still works afterwards
    torch.cuda.synchronize()
    assert bool(((out >= -1) & (out < 300)).all())
print("ALL OK", flush=True)
"""


def _run_native_validation(mode):
    import os
    import subprocess
    import sys

    from .helpers import REPO

    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _NATIVE_VALIDATION_CHILD, mode, str(REPO)],
                          cwd=str(REPO), env=dict(os.environ), capture_output=True, text=True, timeout=600)
    report = f"rc={proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, report


@pytest.mark.kernels_ci
def test_native_op_validation_host():
    """Every TORCH_CHECK of the C++ op, reached without a GPU: CPU tensors redispatched to its CUDA kernel."""
    if not msa.has_native_ops():
        pytest.skip("native ops not built (source-tree mode)")
    _run_native_validation("host")


@requires_cuda
def test_native_op_rejects_invalid_args(cuda_device):
    """Invalid arguments on CUDA tensors: RuntimeError from the C++ op, nothing launched, the op still usable."""
    if not msa.has_native_ops():
        pytest.skip("native ops not built (source-tree mode)")
    _run_native_validation("cuda")
