"""build_k2q_csr / SparseK2qCsrBuilderSm100 / k2q_to_q2k (API.md 5.3, 5.4): exact against a pure-Python
reference written from the spec steps."""

import contextlib

import pytest
import torch

from .helpers import msa, owner_ref, requires_cuda
from .reference import build_k2q_csr_ref, csr_block_mask, csr_from_pairs

csr_mod = msa.csr


@contextlib.contextmanager
def force_triton_on_cpu(on: bool):
    old = csr_mod._FORCE_TRITON_ON_CPU
    csr_mod._FORCE_TRITON_ON_CPU = on
    try:
        yield
    finally:
        csr_mod._FORCE_TRITON_ON_CPU = old


def build_on_path(path, q2k, cu_q, cu_k, **kw):
    """``build_k2q_csr`` through one implementation path; returns its outputs (on the path's device).

    "torch":  CPU tensors -> the pure-PyTorch path (on any machine).
    "triton": the Triton kernels: on CUDA when a GPU is present, else CPU tensors under the interpreter
              (``_FORCE_TRITON_ON_CPU``; Triton cannot take CPU tensors without ``TRITON_INTERPRET=1``).
    "as_is":  the tensors as given, ``_FORCE_TRITON_ON_CPU`` untouched (CUDA -> Triton, CPU -> PyTorch unless
              forced under the interpreter).
    """
    if path == "torch":
        dev, force = torch.device("cpu"), False
    elif path == "triton":
        if torch.cuda.is_available():
            dev, force = torch.device("cuda"), False
        elif csr_mod.interpreter_active():
            dev, force = torch.device("cpu"), True
        else:
            pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    elif path == "as_is":
        dev, force = q2k.device, csr_mod._FORCE_TRITON_ON_CPU
    else:
        raise ValueError(path)
    with force_triton_on_cpu(force):
        return msa.build_k2q_csr(q2k.to(dev), cu_q.to(dev), cu_k.to(dev), 128, **kw)


def make_case(lq, lk, hkv, topk, *, id_lo=-2, id_hi_extra=3, extra_tokens=0, device="cpu", noncontig=True):
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    total_q = int(cu_q[-1]) + extra_tokens
    hi = max([x // 128 for x in lk] + [0]) + id_hi_extra
    q2k = torch.randint(id_lo, hi, (total_q, hkv, topk), dtype=torch.int32)
    q2k = q2k.permute(1, 0, 2) if noncontig else q2k.permute(1, 0, 2).contiguous()
    return q2k.to(device), cu_q.to(device), cu_k.to(device)


def check_exact(q2k, cu_q, cu_k, *, total_rows=None, max_seqlen_k=None, total_k=None, paths=("torch", "triton")):
    total_k = int(cu_k[-1]) if total_k is None else total_k
    B = cu_q.shape[0] - 1
    T = csr_mod.default_total_rows(total_k, B) if total_rows is None else total_rows
    mkb = csr_mod.max_kv_blocks_bound(max_seqlen_k, total_k)
    rp_ref, qi_ref = build_k2q_csr_ref(q2k.cpu(), cu_q.tolist(), cu_k.tolist(), T, mkb)
    outs = []
    for path in paths:
        rp, qi = build_on_path(path, q2k, cu_q, cu_k, total_k=total_k, total_rows=total_rows,
                               max_seqlen_k=max_seqlen_k)
        assert rp.dtype == torch.int32 and qi.dtype == torch.int32
        assert rp.shape == (q2k.shape[0], T + 1) and qi.shape == (q2k.shape[0], q2k.shape[1] * q2k.shape[2])
        assert torch.equal(rp.cpu(), rp_ref), f"{path}: row_ptr differs"
        assert torch.equal(qi.cpu(), qi_ref), f"{path}: q_indices differ"
        outs.append((rp, qi))
    return outs


# ------------------------------------------------------------------------------------------------
# PyTorch path (CPU tensors) vs Triton path (CUDA when present, else CPU under the interpreter)
# ------------------------------------------------------------------------------------------------

@pytest.mark.kernels_ci
@pytest.mark.parametrize("lq,lk,hkv,topk", [
    ([5], [300], 2, 5),
    ([37], [300], 1, 16),
    ([7, 0, 9], [130, 0, 512], 2, 3),        # empty request
    ([3, 9, 4], [10, 512, 0], 2, 4),         # request without KV
    ([20, 3], [1000, 128], 1, 7),
])
def test_csr_exact_small(lq, lk, hkv, topk):
    q2k, cu_q, cu_k = make_case(lq, lk, hkv, topk)
    check_exact(q2k, cu_q, cu_k)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("total_rows", [0, 1, 3, 40])
def test_csr_total_rows_override(total_rows):
    q2k, cu_q, cu_k = make_case([7, 3, 9], [300, 10, 512], 2, 4)
    check_exact(q2k, cu_q, cu_k, total_rows=total_rows)


@pytest.mark.kernels_ci
def test_csr_max_seqlen_k_bound_and_duplicates():
    q2k, cu_q, cu_k = make_case([12, 6], [1000, 600], 2, 6, id_lo=-1, id_hi_extra=2)
    q2k = q2k.clone()
    q2k[:, :, 1] = q2k[:, :, 0]  # duplicates are kept
    check_exact(q2k, cu_q, cu_k, max_seqlen_k=500)  # ids >= 4 dropped


@pytest.mark.kernels_ci
def test_csr_tokens_past_cu_seqlens_ignored_and_total_k_mismatch():
    q2k, cu_q, cu_k = make_case([6, 5], [300, 200], 1, 3, extra_tokens=4)
    check_exact(q2k, cu_q, cu_k)
    check_exact(q2k, cu_q, cu_k, total_k=1024)  # default T from total_k only


@pytest.mark.kernels_ci
def test_csr_contiguous_equals_noncontig_and_schedule():
    q2k, cu_q, cu_k = make_case([9], [700], 2, 5)
    a = msa.build_k2q_csr(q2k, cu_q, cu_k, 128, total_k=700)
    b = msa.build_k2q_csr(q2k.contiguous(), cu_q, cu_k, 128, total_k=700)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rp, qi, sched = msa.build_k2q_csr(q2k, cu_q, cu_k, 128, total_k=700, max_seqlen_k=700, max_seqlen_q=9,
                                      return_schedule=True)
    assert sched.enabled is False and sched.scheduler_metadata is None and sched.work_count is None
    assert sched.qsplit_indices is None and sched.split_counts is None
    assert sched.target_q_per_cta == 0 and sched.work_capacity == 0
    builder = msa.SparseK2qCsrBuilderSm100("anything", x=1)
    c = builder(q2k, cu_q, cu_k, total_k=700, blk_kv=128)
    d = builder.build(q2k, cu_q, cu_k, 128, total_k=700)
    for x in (c, d):
        assert torch.equal(x[0], a[0]) and torch.equal(x[1], a[1])


@pytest.mark.kernels_ci
def test_csr_level_major_example():
    # R = (2, 1, 3): rows (0,0)->0, (1,0)->1, (2,0)->2, (0,1)->3, (2,1)->4, (2,2)->5
    cu_q = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 256, 384, 768], dtype=torch.int32)
    q2k = torch.tensor([[[1, 0], [0, -1], [2, 1]]], dtype=torch.int32)
    for path in ("torch", "triton"):
        rp, qi = build_on_path(path, q2k, cu_q, cu_k, total_k=768, total_rows=6)
        assert rp.tolist() == [[0, 1, 2, 2, 3, 4, 5]]
        assert qi.tolist() == [[0, 0, 0, 0, 0, -1]]


@pytest.mark.kernels_ci
def test_csr_cpu_tensors_without_interpreter_use_torch(monkeypatch):
    """A GPU machine runs without TRITON_INTERPRET: CPU tensors must take the PyTorch path there, even when the
    tests' force flag is set (Triton cannot launch on CPU tensors outside the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not csr_mod.interpreter_active()
    q2k, cu_q, cu_k = make_case([7, 0, 9], [130, 0, 512], 2, 3)

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path was taken for CPU tensors without the interpreter")

    monkeypatch.setattr(csr_mod, "_build_triton", boom)
    with force_triton_on_cpu(True):
        check_exact(q2k, cu_q, cu_k, paths=("as_is",))
    check_exact(q2k, cu_q, cu_k, paths=("as_is",))


@pytest.mark.kernels_ci
def test_csr_empty_inputs():
    cu = torch.tensor([0], dtype=torch.int32)
    rp, qi = msa.build_k2q_csr(torch.zeros((2, 0, 4), dtype=torch.int32), cu, cu, 128, total_k=0)
    assert rp.shape == (2, 1) and qi.shape == (2, 0) and rp.abs().sum() == 0


@pytest.mark.kernels_ci
def test_csr_errors():
    q2k, cu_q, cu_k = make_case([5], [300], 1, 2)
    f = msa.build_k2q_csr
    with pytest.raises(ValueError, match="total_k"):
        f(q2k, cu_q, cu_k, 128)
    with pytest.raises(ValueError):
        f(q2k, cu_q, cu_k, 128, total_k=-1)
    with pytest.raises(ValueError):
        f(q2k, cu_q, cu_k, 0, total_k=300)
    with pytest.raises(msa.MsaUnsupportedError):
        f(q2k, cu_q, cu_k, 64, total_k=300)
    with pytest.raises(NotImplementedError):
        f(q2k, cu_q, cu_k, 64, total_k=300)
    with pytest.raises(TypeError):
        f(q2k.long(), cu_q, cu_k, 128, total_k=300)
    with pytest.raises(ValueError):
        f(q2k[0], cu_q, cu_k, 128, total_k=300)
    with pytest.raises(ValueError):
        f(q2k[:, :, :0], cu_q, cu_k, 128, total_k=300)
    with pytest.raises(TypeError):
        f(q2k, cu_q.long(), cu_k, 128, total_k=300)
    with pytest.raises(TypeError):
        f(q2k, cu_q, cu_k.float(), 128, total_k=300)
    with pytest.raises(ValueError):
        f(q2k, cu_q.view(1, -1), cu_k, 128, total_k=300)
    with pytest.raises(ValueError):
        f(q2k, cu_q[:0], cu_k[:0], 128, total_k=300)
    with pytest.raises(ValueError):
        f(q2k, cu_q, torch.tensor([0, 100, 300], dtype=torch.int32), 128, total_k=300)
    with pytest.raises(ValueError):
        f(q2k, cu_q, cu_k, 128, total_k=300, total_rows=-1)
    with pytest.raises(ValueError):
        f(q2k, cu_q, cu_k, 128, total_k=300, qhead_per_kv=0)
    with pytest.raises(ValueError):
        f(q2k, cu_q, cu_k, 128, total_k=300, return_schedule=True, max_seqlen_q=5)
    with pytest.raises(ValueError):
        f(q2k, cu_q, cu_k, 128, total_k=300, return_schedule=True, max_seqlen_k=300)
    if torch.cuda.is_available():
        with pytest.raises(ValueError):
            f(q2k.cuda(), cu_q, cu_k, 128, total_k=300)


@pytest.mark.kernels_ci
def test_k2q_to_q2k_roundtrip(device):
    q2k, cu_q, cu_k = make_case([9, 0, 13], [400, 50, 700], 2, 4, id_lo=-1, id_hi_extra=1, device=device)
    rp, qi = msa.build_k2q_csr(q2k, cu_q, cu_k, 128, total_k=int(cu_k[-1]))
    back = msa.csr.k2q_to_q2k(rp, qi, cu_q, cu_k, q2k.shape[1], 4).cpu()
    assert back.shape == (2, q2k.shape[1], 4)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(3):
        nb = -(-(ck[b + 1] - ck[b]) // 128)
        want = csr_block_mask(rp, qi, cq, ck, b, nb)
        for g in range(2):
            for i in range(cq[b + 1] - cq[b]):
                row = back[g, cq[b] + i].tolist()
                ids = sorted(j for j in row if j >= 0)
                assert ids == row[:len(ids)] and all(j == -1 for j in row[len(ids):])
                assert ids == torch.nonzero(want[g, i]).flatten().tolist()


# ------------------------------------------------------------------------------------------------
# Odd cu_seqlens (docs/POLICIES.md "Query rows and cu_seqlens_q"): one answer on every path
# ------------------------------------------------------------------------------------------------

I32_MIN, I32_MAX = -2**31, 2**31 - 1


def _wrap32(x):
    return (x + 2**31) % 2**32 - 2**31


def build_k2q_csr_owner_ref(q2k, cu_q, cu_k, total_rows, max_kv_blocks):
    """API.md 5.3 steps 1-7 with token ownership by ``owner_ref`` (any cu_seqlens, exact Python integers; the
    level-major row is the closed form ``sum_b' min(R_b', j) + #{b' < b : R_b' > j}``). For non-decreasing
    cu_seqlens_q this is ``reference.build_k2q_csr_ref``."""
    hkv, total_q, topk = q2k.shape
    ids = q2k.tolist()
    B = len(cu_q) - 1
    R = [max(0, -(-(cu_k[b + 1] - cu_k[b]) // 128)) for b in range(B)]
    heads = []
    for g in range(hkv):
        pairs = []
        for t in range(total_q):
            b = owner_ref(cu_q, t)
            if b is None:
                continue
            for j in ids[g][t]:
                if j < 0 or j >= R[b] or j >= max_kv_blocks:
                    continue
                row = sum(min(r, j) for r in R) + sum(1 for bp in range(b) if R[bp] > j)
                if row < total_rows:
                    pairs.append((row, _wrap32(t - cu_q[b])))
        pairs.sort(key=lambda p: p[0])  # stable: (row, t) order; i = t - cu_q[b] is increasing in t within a row
        heads.append(pairs)
    return csr_from_pairs(heads, total_rows, total_q * topk)


ODD_CU = [
    # (cu_seqlens_q, cu_seqlens_k, total_q)
    ([3, 7], [0, 300], 10),                          # rows before cu_q[0] and after cu_q[-1]
    ([0, 4, 4, 9], [0, 130, 130, 700], 12),          # empty request, rows after the end
    ([0, 8, 4, 10], [0, 100, 400, 700], 10),         # decreasing step: overlapping ranges
    ([0, 6, 2, 10], [0, 300, 200, 700], 10),         # decreasing step inside
    ([5, 2, 9], [0, 256, 700], 9),                   # negative first length
    ([-3, 4, 10], [0, 300, 700], 8),                 # negative start
    ([0, 20, 25], [0, 200, 700], 9),                 # cu_q beyond total_q
    ([7, 1, 3, 12, 2, 9], [0, 129, 300, 700, 512, 900], 12),
    ([I32_MIN, 5, I32_MAX], [0, 300, 900], 10),      # int32 extremes (lengths overflow int32)
    ([0, 6, 10], [I32_MIN, 0, I32_MAX], 10),         # int32 extremes in cu_k
    ([2, 9], [500, 100], 10),                        # negative KV length
]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("cuq,cuk,total_q", ODD_CU)
def test_csr_odd_cu_seqlens_paths_agree(cuq, cuk, total_q):
    """Non-monotone / out-of-range / extreme cu_seqlens: the PyTorch path, the Triton path and the owner-rule
    reference give the same CSR (they used to disagree: torch.searchsorted on unsorted input)."""
    hkv, topk = 2, 3
    q2k = torch.randint(-1, 7, (hkv, total_q, topk), dtype=torch.int32)
    cu_q = torch.tensor(cuq, dtype=torch.int32)
    cu_k = torch.tensor(cuk, dtype=torch.int32)
    for total_k, max_seqlen_k in ((900, None), (900, 300), (10**6, 2**40)):
        T = csr_mod.default_total_rows(total_k, len(cuq) - 1)
        mkb = csr_mod.max_kv_blocks_bound(max_seqlen_k, total_k)
        want = build_k2q_csr_owner_ref(q2k, cuq, cuk, T, mkb)
        for path in ("torch", "triton"):
            rp, qi = build_on_path(path, q2k, cu_q, cu_k, total_k=total_k, max_seqlen_k=max_seqlen_k)
            assert torch.equal(rp.cpu(), want[0]), f"{path}: row_ptr differs ({cuq}, {cuk})"
            assert torch.equal(qi.cpu(), want[1]), f"{path}: q_indices differ ({cuq}, {cuk})"


@pytest.mark.kernels_ci
def test_csr_owner_ref_is_the_spec_reference_for_monotone_cu():
    """Sanity of the owner-rule reference: for non-decreasing cu_seqlens it is reference.build_k2q_csr_ref."""
    for lq, lk in (([5, 0, 7], [300, 100, 0]), ([9], [400]), ([1, 2, 3, 4], [129, 0, 256, 1])):
        q2k, cu_q, cu_k = make_case(lq, lk, 2, 3, extra_tokens=2)
        T = csr_mod.default_total_rows(int(cu_k[-1]), len(lq))
        want = build_k2q_csr_ref(q2k, cu_q.tolist(), cu_k.tolist(), T, 10)
        got = build_k2q_csr_owner_ref(q2k, cu_q.tolist(), cu_k.tolist(), T, 10)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


@pytest.mark.kernels_ci
def test_csr_random_odd_cu_seqlens_paths_agree():
    """Random cu_seqlens (any order, values around [0, total_q] and int32 extremes): both paths agree."""
    pool = [I32_MIN, I32_MIN + 1, -1000, -1, I32_MAX, I32_MAX - 1, 2**30]
    for _ in range(12):
        B = int(torch.randint(1, 6, ()))
        total_q = int(torch.randint(1, 14, ()))

        def draw(hi):
            return [pool[int(torch.randint(0, len(pool), ()))] if float(torch.rand(())) < 0.2
                    else int(torch.randint(-3, hi, ())) for _ in range(B + 1)]

        cuq, cuk = draw(total_q + 4), draw(1000)
        q2k = torch.randint(-2, 9, (2, total_q, 3), dtype=torch.int32)
        outs = [build_on_path(p, q2k, torch.tensor(cuq, dtype=torch.int32), torch.tensor(cuk, dtype=torch.int32),
                              total_k=1000) for p in ("torch", "triton")]
        assert torch.equal(outs[0][0].cpu(), outs[1][0].cpu()), (cuq, cuk)
        assert torch.equal(outs[0][1].cpu(), outs[1][1].cpu()), (cuq, cuk)


@pytest.mark.kernels_ci
def test_k2q_to_q2k_owner_rows(device):
    """Set semantics with a decreasing cu_seqlens_q: a token gets the blocks of its owner request only (a
    hand-made CSR that also lists it under an overlapping request does not leak), unowned tokens get none."""
    # requests [0, 6), [6, 2) (empty), [2, 9) overlap on rows 2..5; the binary search gives rows 2..8 to
    # request 2 (local i = t - 2), rows 0, 1 to request 0, row 9 to none
    cuq, cuk, total_q = [0, 6, 2, 9], [0, 300, 500, 900], 10   # R = (3, 2, 4)
    owners = [owner_ref(cuq, t) for t in range(total_q)]
    assert owners == [0, 0, 2, 2, 2, 2, 2, 2, 2, None]
    # rows (b, j): (0,0)0 (1,0)1 (2,0)2 (0,1)3 (1,1)4 (2,1)5 (0,2)6 (2,2)7 (2,3)8
    # row 0 lists request-0 tokens 0, 1 and 5 (t = 5 belongs to request 2: ignored); row 1 (Lq = -4) nothing;
    # row 2: t = 2, 5, 6, 8; row 3: t = 2 (request 2's: ignored); row 5: t = 3, 6, 7; row 6: t = 3 (ignored);
    # row 8: i = 7 >= Lq (ignored), t = 8 twice (once)
    lists = {0: [0, 1, 5], 1: [0], 2: [0, 3, 4, 6], 3: [2], 5: [1, 4, 5], 6: [3], 8: [6, 7, 6]}
    qi, rp = [], [0]
    for r in range(9):
        qi += lists.get(r, [])
        rp.append(len(qi))
    qi += [-1] * (total_q * 4 - len(qi))
    rp_t = torch.tensor([rp], dtype=torch.int32, device=device)
    qi_t = torch.tensor([qi], dtype=torch.int32, device=device)
    cu_q = torch.tensor(cuq, dtype=torch.int32, device=device)
    cu_k = torch.tensor(cuk, dtype=torch.int32, device=device)
    back = msa.csr.k2q_to_q2k(rp_t, qi_t, cu_q, cu_k, total_q, 4).cpu()[0]
    want = {0: [0], 1: [0], 2: [0], 3: [1], 4: [], 5: [0], 6: [0, 1], 7: [1], 8: [0, 3], 9: []}
    for t in range(total_q):
        ids = [j for j in back[t].tolist() if j >= 0]
        assert ids == want[t], (t, back[t].tolist())


@pytest.mark.kernels_ci
def test_csr_opcheck_and_compile():
    q2k, cu_q, cu_k = make_case([6], [300], 1, 2, noncontig=False)
    torch.library.opcheck(csr_mod._build_k2q_csr_op, (q2k, cu_q, cu_k, 3, 3))

    def fn(a, b, c):
        return msa.build_k2q_csr(a, b, c, 128, total_k=300)

    got = torch.compile(fn, fullgraph=True, backend="eager")(q2k, cu_q, cu_k)
    ref = fn(q2k, cu_q, cu_k)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------

def m3_like_q2k(lq, lk, hkv, topk, device, run=64):
    """Local block + random earlier blocks, constant over runs of ``run`` tokens (indexer-like)."""
    out = []
    for lq_b, lk_b in zip(lq, lk):
        i = torch.arange(lq_b)
        local = (i + lk_b - lq_b).clamp_min(0) // 128
        rows = torch.full((hkv, lq_b, topk), -1, dtype=torch.int32)
        for g in range(hkv):
            for s in range(0, lq_b, run):
                loc = int(local[s])
                cand = torch.randperm(max(loc, 1))[:topk - 1] if loc > 0 else torch.empty(0, dtype=torch.long)
                e = min(s + run, lq_b)
                rows[g, s:e, 0] = local[s:e].to(torch.int32)
                rows[g, s:e, 1:1 + cand.numel()] = cand.to(torch.int32)
        out.append(rows)
    return torch.cat(out, 1).to(device)


@requires_cuda
@pytest.mark.parametrize("lq,lk,hkv,topk", [
    ([4096], [4096], 4, 16),
    ([1000, 3000, 17, 0, 2500], [1000, 5000, 300, 128, 2500], 4, 16),
    ([2048], [8192], 2, 64),
    ([777, 1], [9000, 5], 1, 1),
])
def test_csr_gpu_matches_cpu(cuda_device, lq, lk, hkv, topk):
    q2k, cu_q, cu_k = make_case(lq, lk, hkv, topk, id_lo=-3, id_hi_extra=3)
    rp_c, qi_c = msa.build_k2q_csr(q2k, cu_q, cu_k, 128, total_k=int(cu_k[-1]))
    rp_g, qi_g = msa.build_k2q_csr(q2k.to(cuda_device), cu_q.to(cuda_device), cu_k.to(cuda_device), 128,
                                   total_k=int(cu_k[-1]))
    assert torch.equal(rp_g.cpu(), rp_c) and torch.equal(qi_g.cpu(), qi_c)
    rp_g2, qi_g2 = msa.build_k2q_csr(q2k.to(cuda_device), cu_q.to(cuda_device), cu_k.to(cuda_device), 128,
                                     total_k=int(cu_k[-1]))
    assert torch.equal(rp_g, rp_g2) and torch.equal(qi_g, qi_g2)  # deterministic


@requires_cuda
def test_csr_gpu_reference_small(cuda_device):
    q2k, cu_q, cu_k = make_case([50, 0, 70], [900, 20, 400], 2, 8)
    check_exact(q2k.to(cuda_device), cu_q.to(cuda_device), cu_k.to(cuda_device), paths=("as_is",))


@requires_cuda
def test_csr_gpu_m3_32k_and_graph(cuda_device):
    lq = lk = [32768]
    q2k = m3_like_q2k(lq, lk, 4, 16, "cpu")
    cu = torch.tensor([0, 32768], dtype=torch.int32)
    rp_c, qi_c = msa.build_k2q_csr(q2k, cu, cu, 128, total_k=32768)
    q2k_d, cu_d = q2k.to(cuda_device), cu.to(cuda_device)
    fn = lambda: msa.build_k2q_csr(q2k_d, cu_d, cu_d, 128, total_k=32768, max_seqlen_k=32768)  # noqa: E731
    rp, qi = fn()
    assert torch.equal(rp.cpu(), rp_c) and torch.equal(qi.cpu(), qi_c)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rp_gr, qi_gr = fn()
    q2k2 = m3_like_q2k(lq, lk, 4, 16, "cpu")
    q2k_d.copy_(q2k2)
    graph.replay()
    rp_c2, qi_c2 = msa.build_k2q_csr(q2k2, cu, cu, 128, total_k=32768)
    assert torch.equal(rp_gr.cpu(), rp_c2) and torch.equal(qi_gr.cpu(), qi_c2)


@requires_cuda
@pytest.mark.parametrize("cuq,cuk,total_q", ODD_CU)
def test_csr_gpu_odd_cu_seqlens_matches_cpu(cuda_device, cuq, cuk, total_q):
    q2k = torch.randint(-1, 7, (2, total_q, 3), dtype=torch.int32)
    cu_q = torch.tensor(cuq, dtype=torch.int32)
    cu_k = torch.tensor(cuk, dtype=torch.int32)
    want = build_k2q_csr_owner_ref(q2k, cuq, cuk, csr_mod.default_total_rows(900, len(cuq) - 1),
                                   csr_mod.max_kv_blocks_bound(None, 900))
    for dev in ("cpu", cuda_device):
        rp, qi = msa.build_k2q_csr(q2k.to(dev), cu_q.to(dev), cu_k.to(dev), 128, total_k=900)
        assert torch.equal(rp.cpu(), want[0]) and torch.equal(qi.cpu(), want[1]), dev
