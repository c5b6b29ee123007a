"""Property-based fuzzing of the public entry points (issue #13, deliverable 2), with ``hypothesis``.

Valid inputs (random shapes and metadata: ragged lengths, empty requests, B = 0, GQA ratios, shuffled and aliased
page tables with garbage in the columns no token reaches, -1 / duplicate / out-of-range / int32-extreme block
ids, lengths beyond the addressable storage, strided views) are compared with the float64 references of
tests/reference.py (attention: cosine >= 0.9999 and max-abs <= 1e-2; LSE within 1e-3; CSR, top-k and NVFP4
bytes exact); ``out=`` / ``lse=`` buffers are NaN-poisoned. Invalid arguments must raise the class API.md
requires (wrong dtype -> TypeError, wrong rank / shape / value -> ValueError, unsupported configuration ->
MsaUnsupportedError) with a message naming the argument, and must not disturb a later valid call.

Covered: ``sparse_decode_atten_func`` and ``SparseDecodePagedAttentionWrapper`` (paged HND; bf16 / fp16, fp8 and
NVFP4 K/V), ``flash_decode_with_gqa_share_sparse`` (token-major; fp8 K/V on a GPU), ``build_k2q_csr`` +
``sparse_atten_func`` (dense and paged KV, temperature LSE, query rows outside every request),
``build_k2q_csr`` on both paths, ``native_topk_from_scores``, the decode indexer ``flash_decode_with_topk_idx``
and the NVFP4 quantiser round trip.

Profiles (environment variable ``MSA_FUZZ_PROFILE``, read by this file):

* ``ci`` (default): a few examples per test, derandomized, no example database: a few minutes in total on 2 CPU
  cores under the Triton interpreter (fp16 / fp32 data there; the interpreter's bf16 arithmetic is wrong).
* ``medium``: about 5x ``ci``, derandomized: the corpus scripts/sanitize.sh runs under compute-sanitizer.
* ``gpu``: thousands of examples in total (bf16, fp8 K/V); random unless ``MSA_FUZZ_DERANDOMIZE=1``; a failure
  prints a ``@reproduce_failure`` blob.

``MSA_FUZZ_EXAMPLES=N`` sets every test's example count. Example counts per test:
``pytest tests/test_fuzz.py --hypothesis-show-statistics``.
"""

import math
import os
import tempfile

import pytest
import torch

# hypothesis keeps a small cache even without an example database: not in the repository
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "msa_hypothesis"))
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test dependency (requirements-dev.txt)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from .helpers import (HAS_CUDA, assert_bitwise_equal, assert_close_attn, assert_lse_close, msa,  # noqa: E402
                      owner_ref, poison_like)
from .reference import (attention_ref, gather_paged, paged_decode_ref, q2k_block_mask,  # noqa: E402
                        token_major_decode_ref, visible_from_blocks)
from .test_csr import build_k2q_csr_owner_ref, build_on_path, csr_mod  # noqa: E402
from .test_indexer import _decode_ref_scores, _ref_select  # noqa: E402
from .test_nvfp4 import ref_quantize  # noqa: E402
from .test_topk import ref_topk_forced  # noqa: E402

pytestmark = [pytest.mark.fuzz, pytest.mark.kernels_ci]

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover (conftest sets it)
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
ADT = torch.bfloat16 if HAS_CUDA else torch.float16  # attention data dtype (the interpreter's bf16 is wrong)
FP8 = torch.float8_e4m3fn
I32_MIN, I32_MAX = -2**31, 2**31 - 1
ix_mod = msa.indexer

# ------------------------------------------------------------------------------------------------------------
# profiles
# ------------------------------------------------------------------------------------------------------------

PROFILE = os.environ.get("MSA_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "medium", "gpu"):
    raise ValueError(f"MSA_FUZZ_PROFILE must be ci, medium or gpu, got {PROFILE!r}")
_COMMON = dict(deadline=None, database=None, print_blob=True, report_multiple_bugs=False,
               suppress_health_check=list(HealthCheck))
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("medium", derandomize=True, **_COMMON)
settings.register_profile("gpu", derandomize=os.environ.get("MSA_FUZZ_DERANDOMIZE") == "1", **_COMMON)
_FIXED = os.environ.get("MSA_FUZZ_EXAMPLES")


def fuzz(ci, gpu):
    """Per-test settings: ``ci`` examples in the ci profile, 5x in medium, ``gpu`` in gpu (or MSA_FUZZ_EXAMPLES)."""
    n = {"ci": ci, "medium": 5 * ci, "gpu": gpu}[PROFILE]
    if _FIXED:
        n = int(_FIXED)
    kw = {}
    if PROFILE != "gpu":  # the derandomized CI run keeps shrinking short: a failure reports its minimal case fast
        kw["phases"] = (Phase.explicit, Phase.generate, Phase.shrink)
    return settings(settings.get_profile(PROFILE), max_examples=n, **kw)


def gen_of(seed):
    return torch.Generator().manual_seed(seed)


SEEDS = st.integers(0, 2**31 - 1)


def randn(shape, gen, dtype, *, scale=1.0):
    """N(0, scale^2) generated on the CPU (reproducible), cast, moved to the test device."""
    x = torch.randn(shape, generator=gen) * scale
    if dtype == FP8:
        return x.to(FP8).to(DEV)
    return x.to(dtype).to(DEV)


def ri(gen, lo, hi):
    """A random int in [lo, hi] from ``gen``."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def messy_row(nb, topk, gen, width=None):
    """One index row for a request of ``nb`` blocks: one of several adversarial kinds (-1 anywhere, duplicates,
    out of range, beyond the table width, int32 extremes) or a valid shuffled row."""
    kind = ri(gen, 0, 7)
    top = nb if width is None else width
    if kind == 0:
        return [-1] * topk
    if kind == 1:
        return [ri(gen, 0, max(nb - 1, 0))] * topk
    if kind == 2:
        pool = [nb, nb + 1, top, top + 3, -2, -7, I32_MIN, I32_MAX, 2**30, 2**24 + 1]
        return [pool[ri(gen, 0, len(pool) - 1)] for _ in range(topk)]
    if kind == 3:
        r = torch.randperm(max(nb, 1), generator=gen)[:topk].tolist() if nb else []
        return r + [-1] * (topk - len(r))
    row = [ri(gen, -3, nb + 3) for _ in range(topk)]
    if ri(gen, 0, 3) == 0:
        row[ri(gen, 0, topk - 1)] = [I32_MAX, I32_MIN, 2**25][ri(gen, 0, 2)]
    return row


def index_tensor(nbs, hkv, topk, gen, *, dtype=torch.int32, strided=False, width=None):
    """[Hkv, len(nbs), topk] rows of ``messy_row`` (one request block count per row), optionally a strided view."""
    rows = [[messy_row(nb, topk, gen, width) for nb in nbs] for _ in range(hkv)]
    t = torch.tensor(rows, dtype=torch.int64).view(hkv, len(nbs), topk)
    if strided:  # a transposed copy viewed back: same values, non-unit strides
        t = t.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    return t.to(dtype).to(DEV)


def page_table(lens, maxp, num_pages, gen, kind, *, garbage_tail=True):
    """int32 [B, maxp] page table: 'perm' (distinct shuffled pages) or 'alias' (pages shared across and within
    requests). Columns no position of the request reaches (x >= seqused_k) hold garbage (-1, int32 max, out of
    the pool) when ``garbage_tail``: API.md 5.1 reads ``page_table[b, x // 128]`` only for x < seqused_k."""
    b = len(lens)
    if kind == "perm":
        pt = torch.randperm(num_pages, generator=gen)[: b * maxp].view(b, maxp)
    else:
        pt = torch.randint(0, num_pages, (b, maxp), generator=gen)
    if garbage_tail:
        junk = [-1, I32_MAX, num_pages, num_pages + 5, I32_MIN]
        for r, L in enumerate(lens):
            for c in range(-(-max(L, 0) // 128), maxp):
                pt[r, c] = junk[ri(gen, 0, len(junk) - 1)]
    return pt.to(torch.int32).to(DEV)


def check_attention(out, lse, o_ref, lse_ref, what):
    assert_close_attn(out, o_ref, what=what)
    empty = torch.isneginf(lse_ref)
    assert (out.double().cpu()[empty] == 0).all(), f"{what}: empty rows must be exactly 0"
    if lse is not None:
        assert lse.dtype == torch.float32
        assert_lse_close(lse, lse_ref)


# ------------------------------------------------------------------------------------------------------------
# paged HND decode: sparse_decode_atten_func / SparseDecodePagedAttentionWrapper
# ------------------------------------------------------------------------------------------------------------

KV_KINDS = ["native"] * 4 + (["nvfp4", "fp8", "fp8"] if HAS_CUDA else ["nvfp4"])


@st.composite
def paged_decode_cases(draw):
    kv = draw(st.sampled_from(KV_KINDS))
    # the NVFP4 tile decoder is slow under the interpreter: smaller NVFP4 problems there (any size on a GPU)
    small = kv == "nvfp4" and not HAS_CUDA
    b = draw(st.sampled_from([0, 1, 1, 2, 3, 4]))
    maxp = draw(st.integers(1, 2 if small else 5))
    cap = maxp * 128
    lens = draw(st.lists(st.one_of(st.integers(0, cap), st.sampled_from([0, 1, 127, 128, 129, cap, cap + 77])),
                         min_size=b, max_size=b))
    return dict(
        b=b, maxp=maxp, lens=lens, hkv=draw(st.integers(1, 2)), g=draw(st.sampled_from([1, 2, 4, 8, 16])),
        sq=draw(st.integers(1, 2 if small else 3)),
        topk=draw(st.sampled_from([1, 2, 3, 4] if small else [1, 2, 3, 4, 5, 8, 16, 64])),
        ids=draw(st.sampled_from(["messy", "messy", "messy", "dense"])), table=draw(st.sampled_from(["perm", "alias"])),
        causal=draw(st.booleans()), strided_kv=draw(st.booleans()), strided_idx=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 0.2))), api=draw(st.sampled_from(["func", "wrapper"])),
        hint=draw(st.sampled_from([None, "fixed", "nosplit", "grid"])), kv=kv,
        extra_pages=draw(st.integers(0, 3)), seed=draw(SEEDS))


def make_paged_decode(c):
    gen = gen_of(c["seed"])
    b, hkv, g, sq, topk, maxp = c["b"], c["hkv"], c["g"], c["sq"], c["topk"], c["maxp"]
    num_pages = max(b * maxp + c["extra_pages"], 1)
    kv_dtype = FP8 if c["kv"] == "fp8" else ADT
    if c["strided_kv"] and c["kv"] != "nvfp4":  # the permuted view of a token-major NHD cache (read in place)
        k = randn((num_pages * 128, hkv, 128), gen, kv_dtype).view(num_pages, 128, hkv, 128).permute(0, 2, 1, 3)
        v = randn((num_pages * 128, hkv, 128), gen, kv_dtype).view(num_pages, 128, hkv, 128).permute(0, 2, 1, 3)
    else:
        k = randn((num_pages, hkv, 128, 128), gen, kv_dtype)
        v = randn((num_pages, hkv, 128, 128), gen, kv_dtype)
    q = randn((b * sq, hkv * g, 128), gen, ADT)
    pt = page_table(c["lens"], maxp, num_pages, gen, c["table"])
    sk = torch.tensor(c["lens"], dtype=torch.int32).to(DEV)
    if c["ids"] == "dense":
        idx = None
    else:
        nbs = [-(-c["lens"][r // sq] // 128) for r in range(b * sq)]
        idx = index_tensor(nbs, hkv, topk, gen, strided=c["strided_idx"], width=maxp)
    kw, k_ref, v_ref = {}, k, v
    if c["kv"] == "nvfp4":
        kq, vq = msa.quantize_kv_bf16_to_nvfp4_128x4(k, v)
        k, v = kq.data, vq.data
        kw = dict(k_scale_128x4=kq.scale_128x4, v_scale_128x4=vq.scale_128x4, k_global_scale=kq.global_scale,
                  v_global_scale=vq.global_scale)
        k_ref, v_ref = (msa.dequantize_nvfp4_128x4_to_bf16(t, include_global_scale=False).double().cpu()
                        * t.global_scale.double().cpu() for t in (kq, vq))
    elif c["kv"] == "fp8":
        k_ref, v_ref = k.float(), v.float()
    return q, k, v, idx, pt, sk, kw, k_ref, v_ref


@fuzz(ci=12, gpu=1500)
@given(c=paged_decode_cases())
def test_fuzz_paged_decode(c):
    q, k, v, idx, pt, sk, kw, k_ref, v_ref = make_paged_decode(c)
    sq, causal = c["sq"], c["causal"]
    max_seqlen_k = max(c["lens"] + [1])
    if c["api"] == "func":
        out, lse = msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=sq,
                                                max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=c["scale"],
                                                return_softmax_lse=True, **kw)
    else:
        hint = {"fixed": dict(fixed_split_size=1 + c["seed"] % 3), "nosplit": dict(disable_split_kv=True),
                "grid": dict(max_grid_size=1 + c["seed"] % 7)}.get(c["hint"], {})
        w = msa.SparseDecodePagedAttentionWrapper(causal=causal).plan(
            page_table=pt, seqused_k=sk, seqlen_q=sq, max_seqlen_k=max_seqlen_k, q2k_indices=idx,
            num_qo_heads=q.shape[1], num_kv_heads=c["hkv"], enable_cuda_graph=bool(c["seed"] % 2), **hint)
        out_buf = poison_like(torch.empty(q.shape, dtype=ADT, device=DEV))
        lse_buf = poison_like(torch.empty(q.shape[:2], dtype=torch.float32, device=DEV))
        out, lse = w.run(q, k, v, softmax_scale=c["scale"], return_softmax_lse=True, out=out_buf, lse=lse_buf, **kw)
        assert out is out_buf and lse is lse_buf
    assert out.shape == q.shape and out.dtype == ADT and lse.shape == q.shape[:2]
    o_ref, lse_ref = paged_decode_ref(q, k_ref, v_ref, idx, pt, sk, sq, causal=causal, scale=c["scale"])
    check_attention(out, lse, o_ref, lse_ref, f"paged decode {c}")


# ------------------------------------------------------------------------------------------------------------
# token-major decode: flash_decode_with_gqa_share_sparse
# ------------------------------------------------------------------------------------------------------------


@st.composite
def token_major_cases(draw):
    b = draw(st.sampled_from([0, 1, 2, 3, 4]))
    return dict(
        b=b, hkv=draw(st.integers(1, 2)), g=draw(st.integers(1, 16)), d=draw(st.sampled_from([64, 128, 128, 256])),
        bs=draw(st.sampled_from([16, 32, 64, 128, 256, 512])), topk=draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16])),
        width=draw(st.integers(1, 700)), extra_reqs=draw(st.integers(0, 3)), extra_slots=draw(st.integers(0, 64)),
        idx_dtype=draw(st.sampled_from([torch.int32, torch.int64])), sink=draw(st.sampled_from([None, "fp32", "q"])),
        shared_rows=draw(st.booleans()), strided_idx=draw(st.booleans()), fp8=HAS_CUDA and draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 0.2))), seed=draw(SEEDS))


def make_token_major(c):
    gen = gen_of(c["seed"])
    b, hkv, g, d, bs, topk, width = c["b"], c["hkv"], c["g"], c["d"], c["bs"], c["topk"], c["width"]
    max_reqs = b + c["extra_reqs"] + 1
    max_slots = max(b, 1) * width + c["extra_slots"] + 1
    dt = c["idx_dtype"]
    pool = [0, 1, width - 1, width, width + 1, bs, bs + 1, -5, I32_MAX if dt == torch.int32 else 2**40]
    lens = [pool[ri(gen, 0, len(pool) - 1)] if ri(gen, 0, 2) == 0 else ri(gen, 0, width) for _ in range(b)]
    seq_lens = torch.tensor(lens, dtype=dt).to(DEV)
    # req_to_token: shuffled slots, some negative (Python modulo: -1 is the last slot) or >= max_slots
    r2t = torch.randperm(max_reqs * width, generator=gen).view(max_reqs, width) % max_slots
    wild = torch.rand(r2t.shape, generator=gen) < 0.1
    hi = I32_MAX if dt == torch.int32 else 2**40
    r2t = torch.where(wild, torch.randint(-max_slots * 3, 3 * max_slots, r2t.shape, generator=gen), r2t)
    r2t[0, 0] = hi if width > 0 else 0
    r2t = r2t.to(dt).to(DEV)
    if c["shared_rows"]:
        sid = torch.randint(0, max_reqs, (b,), generator=gen)
    else:
        sid = torch.randperm(max_reqs, generator=gen)[:b]
    sid = sid.to(dt).to(DEV)
    kv_dtype = FP8 if c["fp8"] else ADT
    kc = randn((max_slots, hkv, d), gen, kv_dtype)
    vc = randn((max_slots, hkv, d), gen, kv_dtype)
    q = randn((b, hkv * g, d), gen, ADT)
    sink = None
    if c["sink"] == "fp32":
        sink = randn((hkv * g, d), gen, torch.float32)
    elif c["sink"] == "q":
        sink = randn((hkv * g, d), gen, ADT)
    nbs = [-(-max(0, min(L, width)) // bs) for L in lens]
    idx = index_tensor(nbs, hkv, topk, gen, dtype=dt, strided=c["strided_idx"], width=-(-width // bs))
    return q, sink, kc, vc, r2t, seq_lens, sid, idx


@fuzz(ci=12, gpu=1500)
@given(c=token_major_cases())
def test_fuzz_token_major_decode(c):
    q, sink, kc, vc, r2t, sl, sid, idx = make_token_major(c)
    out = msa.flash_decode_with_gqa_share_sparse(q, sink, kc, vc, r2t, sl, sid, c["bs"], idx, c["scale"])
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    if c["b"] == 0:
        return
    kr, vr = (kc.float(), vc.float()) if c["fp8"] else (kc, vc)
    o_ref, lse_ref = token_major_decode_ref(q, kr, vr, r2t, sl, sid, c["bs"], idx, scale=c["scale"], sink=sink)
    check_attention(out, None, o_ref, lse_ref, f"token-major decode {c}")


# ------------------------------------------------------------------------------------------------------------
# prefill: build_k2q_csr + sparse_atten_func, dense and paged KV
# ------------------------------------------------------------------------------------------------------------


@st.composite
def prefill_cases(draw):
    b = draw(st.sampled_from([0, 1, 1, 2, 3, 4]))
    lq = draw(st.lists(st.one_of(st.integers(0, 40), st.sampled_from([0, 1])), min_size=b, max_size=b))
    lk = draw(st.lists(st.one_of(st.integers(0, 400), st.sampled_from([0, 1, 128, 129])), min_size=b, max_size=b))
    tau = draw(st.sampled_from([None, None, 1.0, "random"]))
    if tau == "random":
        tau = draw(st.floats(0.25, 4.0))
    return dict(
        b=b, lq=lq, lk=lk, hkv=draw(st.integers(1, 2)), g=draw(st.sampled_from([1, 2, 4, 8, 16])),
        topk=draw(st.sampled_from([1, 2, 3, 4, 6, 8])), causal=draw(st.booleans()), tau=tau,
        scale=draw(st.one_of(st.none(), st.floats(0.01, 0.2))), paged=draw(st.booleans()),
        table=draw(st.sampled_from(["perm", "alias"])), extra_cols=draw(st.integers(0, 2)),
        lead=draw(st.sampled_from([0, 0, 3])), tail=draw(st.sampled_from([0, 0, 2])),
        fp8=HAS_CUDA and draw(st.booleans()), strided_q=draw(st.booleans()),
        csr_max_k=draw(st.sampled_from(["none", "max"])), seed=draw(SEEDS))


def prefill_reference(q, kd, vd, q2k, cuq, lk, c, paged=None):
    """float64 per request, rows without an owner O = 0 and LSE = LSE_T = -inf (docs/POLICIES.md section 1).
    Dense: K_b = kd[cu_k[b]:][:Lk_b]; paged: gathered through the page table."""
    total_q, hq, d = q.shape
    scale = 128 ** -0.5 if c["scale"] is None else c["scale"]
    o = torch.zeros(total_q, hq, d, dtype=torch.float64)
    lse = torch.full((total_q, hq), -math.inf, dtype=torch.float64)
    lse_t = lse.clone()
    ck = [0]
    for x in lk:
        ck.append(ck[-1] + x)
    q2k = q2k.cpu()
    for b in range(len(lk)):
        qs, qe = cuq[b], cuq[b + 1]
        if qe <= qs:
            continue
        bm = q2k_block_mask(q2k[:, qs:qe], -(-lk[b] // 128))
        vis = visible_from_blocks(bm, qe - qs, lk[b], causal=c["causal"])
        if paged is None:
            kb, vb = kd[ck[b]:ck[b + 1]].cpu(), vd[ck[b]:ck[b + 1]].cpu()
        else:
            kp, vp, pt = paged
            kb, vb = gather_paged(kp.cpu(), pt[b].cpu(), lk[b]), gather_paged(vp.cpu(), pt[b].cpu(), lk[b])
        ob, lb, ltb = attention_ref(q[qs:qe].cpu(), kb.double(), vb.double(), vis, scale,
                                    tau=c["tau"] if c["tau"] is not None else None)
        o[qs:qe], lse[qs:qe] = ob, lb
        if ltb is not None:
            lse_t[qs:qe] = ltb
    return o, lse, lse_t


def _prefill_rows(c):
    """Row layout of a prefill case: ``(Hq, cu_seqlens_q list, total_q, total_k, blocks per query row)``; rows
    before ``lead`` and the ``tail`` rows after the last request belong to no request (0 blocks)."""
    lq, lk = c["lq"], c["lk"]
    cuq = [c["lead"]]
    for x in lq:
        cuq.append(cuq[-1] + x)
    total_q = cuq[-1] + c["tail"]
    nbs = [0] * total_q
    for b in range(len(lq)):
        for t in range(cuq[b], cuq[b + 1]):
            nbs[t] = -(-lk[b] // 128)
    return c["hkv"] * c["g"], cuq, total_q, sum(lk), nbs


def _prefill_csr_args(c, cuq, q2k, total_k, csr_max_k):
    """``build_k2q_csr`` of ``q2k`` and the keyword arguments shared by the prefill calls: ``(row_ptr, q_idx,
    args)``; ``csr_max_k``: pass ``max_seqlen_k`` to the CSR builder too."""
    lq, lk = c["lq"], c["lk"]
    cu_q = torch.tensor(cuq, dtype=torch.int32).to(DEV)
    cu_k = torch.tensor([0] + torch.tensor(lk, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32).to(DEV)
    max_k = max(lk + [1])
    rp, qi = msa.build_k2q_csr(q2k, cu_q, cu_k, 128, total_k=total_k, max_seqlen_k=max_k if csr_max_k else None)
    args = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq + [1]), max_seqlen_k=max_k,
                causal=c["causal"], softmax_scale=c["scale"], return_softmax_lse=True)
    return rp, qi, args


@fuzz(ci=12, gpu=1500)
@given(c=prefill_cases())
def test_fuzz_prefill(c):
    gen = gen_of(c["seed"])
    lk, hkv, topk = c["lk"], c["hkv"], c["topk"]
    hq, cuq, total_q, total_k, nbs = _prefill_rows(c)
    kv_dtype = FP8 if c["fp8"] else ADT
    if c["strided_q"]:
        q = randn((hq, total_q, 128), gen, ADT).permute(1, 0, 2)
    else:
        q = randn((total_q, hq, 128), gen, ADT)
    q2k = index_tensor(nbs, hkv, topk, gen)
    rp, qi, args = _prefill_csr_args(c, cuq, q2k, total_k, c["csr_max_k"] == "max")
    if c["tau"] is not None:
        args.update(lse_temperature_scale=c["tau"], return_temperature_lse=True)
    paged = None
    if c["paged"]:
        maxp = max([-(-x // 128) for x in lk] + [1]) + c["extra_cols"]
        num_pages = max(len(lk) * maxp + 2, 1)
        kp = randn((num_pages * 128, hkv, 128), gen, kv_dtype).view(num_pages, 128, hkv, 128).permute(0, 2, 1, 3)
        vp = randn((num_pages * 128, hkv, 128), gen, kv_dtype).view(num_pages, 128, hkv, 128).permute(0, 2, 1, 3)
        pt = page_table(lk, maxp, num_pages, gen, c["table"])
        paged = (kp, vp, pt)
        res = msa.sparse_atten_func(q, kp, vp, rp, qi, topk, page_table=pt,
                                    seqused_k=torch.tensor(lk, dtype=torch.int32).to(DEV), **args)
        kd = vd = None
    else:
        kd = randn((total_k, hkv, 128), gen, kv_dtype)
        vd = randn((total_k, hkv, 128), gen, kv_dtype)
        res = msa.sparse_atten_func(q, kd, vd, rp, qi, topk, **args)
    out, lse = res[0], res[1]
    assert out.shape == (total_q, hq, 128) and out.dtype == ADT and lse.shape == (total_q, hq)
    if c["fp8"]:
        kd, vd = (None, None) if kd is None else (kd.float(), vd.float())
        paged = None if paged is None else (paged[0].float(), paged[1].float(), paged[2])
    o_ref, lse_ref, lse_t_ref = prefill_reference(q, kd, vd, q2k, cuq, lk, c, paged)
    check_attention(out, lse, o_ref, lse_ref, f"prefill {c}")
    if c["tau"] is not None:
        assert len(res) == 3
        if c["tau"] == 1.0:
            assert res[2] is res[1], "tau == 1: LSE_T must be the LSE object itself"
        else:
            assert_lse_close(res[2], lse_t_ref)
    else:
        assert len(res) == 2
    # rows without an owner (before cu_seqlens_q[0] / from cu_seqlens_q[B] on) are exactly 0 / -inf
    unowned = [t for t in range(total_q) if owner_ref(cuq, t) is None]
    if unowned:
        assert (out.cpu()[unowned] == 0).all() and torch.isneginf(lse.cpu()[unowned]).all()


def _nvfp4_exact(qx):
    """float64 values of an NVFP4 tensor: ``e2m1 * E4M3 scale`` (exact) times the fp32 global scale."""
    g = qx.global_scale.reshape(-1)[0].double().cpu()
    return msa.dequantize_nvfp4_128x4_to_bf16(qx, include_global_scale=False).double().cpu() * g


@fuzz(ci=6, gpu=600)
@given(c=prefill_cases(), staged=st.booleans())
def test_fuzz_prefill_nvfp4(c, staged):
    """sparse_atten_nvfp4_kv_func on quantised K/V, staged (K/V decoded once, element kernel) and fused (decoded
    in the attention loop), dense and paged (the pool of every page, or a larger pool gathered through a table
    with aliased pages and garbage columns), against float64 of the exactly decoded K/V."""
    gen = gen_of(c["seed"])
    lk, hkv, topk = c["lk"], c["hkv"], c["topk"]
    hq, cuq, total_q, total_k, nbs = _prefill_rows(c)
    q = randn((total_q, hq, 128), gen, ADT)
    q2k = index_tensor(nbs, hkv, topk, gen)
    rp, qi, args = _prefill_csr_args(c, cuq, q2k, total_k, False)
    if c["paged"]:
        maxp = max([-(-x // 128) for x in lk] + [1]) + c["extra_cols"]
        num_pages = max(len(lk) * maxp + (2 if c["lead"] else 0), 1)  # staged: the pool, or (+2) gathered
        kv = [randn((num_pages, hkv, 128, 128), gen, ADT) for _ in range(2)]
        pt = page_table(lk, maxp, num_pages, gen, c["table"])
        args.update(page_table=pt, seqused_k=torch.tensor(lk, dtype=torch.int32).to(DEV))
    else:
        kv = [randn((total_k, hkv, 128), gen, ADT) for _ in range(2)]
    qk, qv = msa.quantize_kv_bf16_to_nvfp4_128x4(kv[0], kv[1])
    with msa.tuning.override(prefill_nvfp4_stage_bytes=(1 << 40) if staged else 0):
        out, lse = msa.sparse_atten_nvfp4_kv_func(q, qk.data, qv.data, qk.scale_128x4, qv.scale_128x4,
                                                  qk.global_scale, qv.global_scale, rp, qi, topk, **args)
    assert out.shape == (total_q, hq, 128) and out.dtype == ADT and lse.shape == (total_q, hq)
    kx, vx = _nvfp4_exact(qk), _nvfp4_exact(qv)
    paged = (kx, vx, args["page_table"]) if c["paged"] else None
    o_ref, lse_ref, _ = prefill_reference(q, None if paged else kx, None if paged else vx, q2k, cuq, lk,
                                          dict(c, tau=None), paged)
    check_attention(out, lse, o_ref, lse_ref, f"prefill nvfp4 {'staged' if staged else 'fused'} {c}")


# ------------------------------------------------------------------------------------------------------------
# build_k2q_csr: the PyTorch path and the Triton path, exact against the spec steps
# ------------------------------------------------------------------------------------------------------------


@st.composite
def csr_cases(draw):
    b = draw(st.integers(0, 5))
    lq = draw(st.lists(st.integers(0, 12), min_size=b, max_size=b))
    lk = draw(st.lists(st.one_of(st.integers(0, 700), st.sampled_from([0, 128, 129, 256])), min_size=b, max_size=b))
    return dict(b=b, lq=lq, lk=lk, hkv=draw(st.integers(1, 3)), topk=draw(st.integers(1, 8)),
                odd=draw(st.sampled_from([False, False, False, True])), extra_tokens=draw(st.integers(0, 3)),
                total_rows=draw(st.sampled_from(["default", "exact", "less", "more"])),
                max_seqlen_k=draw(st.sampled_from(["none", "max", "less", "huge"])), strided=draw(st.booleans()),
                seed=draw(SEEDS))


@fuzz(ci=15, gpu=3000)
@given(c=csr_cases())
def test_fuzz_build_k2q_csr(c):
    gen = gen_of(c["seed"])
    cuq = [0]
    for x in c["lq"]:
        cuq.append(cuq[-1] + x)
    cuk = [0]
    for x in c["lk"]:
        cuk.append(cuk[-1] + x)
    if c["odd"]:  # non-monotone / out-of-range cu_seqlens: one answer on every path (docs/POLICIES.md section 2)
        cuq = [x + ri(gen, -4, 4) for x in cuq]
        cuk = [x + ri(gen, -200, 200) for x in cuk]
    total_q = max(cuq[-1], 0) + c["extra_tokens"]
    total_k = max(cuk[-1], 0)
    nbmax = max([-(-x // 128) for x in c["lk"]] + [1])
    q2k = torch.randint(-3, nbmax + 3, (total_q, c["hkv"], c["topk"]), generator=gen, dtype=torch.int32)
    q2k = q2k.permute(1, 0, 2) if c["strided"] else q2k.permute(1, 0, 2).contiguous()
    B = len(cuq) - 1
    R = sum(max(0, -(-(cuk[i + 1] - cuk[i]) // 128)) for i in range(B))
    T = {"default": None, "exact": R, "less": max(R - 2, 0), "more": R + 3}[c["total_rows"]]
    msk = {"none": None, "max": max(c["lk"] + [1]), "less": max(max(c["lk"] + [1]) - 200, 1),
           "huge": 2**40}[c["max_seqlen_k"]]
    T_used = csr_mod.default_total_rows(total_k, B) if T is None else T
    want = build_k2q_csr_owner_ref(q2k, cuq, cuk, T_used, csr_mod.max_kv_blocks_bound(msk, total_k))
    cu_q, cu_k = torch.tensor(cuq, dtype=torch.int32), torch.tensor(cuk, dtype=torch.int32)
    for path in ("torch", "triton"):
        rp, qi = build_on_path(path, q2k, cu_q, cu_k, total_k=total_k, max_seqlen_k=msk, total_rows=T)
        assert rp.dtype == torch.int32 and qi.dtype == torch.int32
        assert torch.equal(rp.cpu(), want[0]), f"{path}: row_ptr differs for {c}"
        assert torch.equal(qi.cpu(), want[1]), f"{path}: q_indices differ for {c}"


# ------------------------------------------------------------------------------------------------------------
# native_topk_from_scores
# ------------------------------------------------------------------------------------------------------------


@st.composite
def topk_cases(draw):
    return dict(h=draw(st.integers(1, 4)), b=draw(st.integers(0, 6)),
                nb=draw(st.one_of(st.integers(0, 70), st.sampled_from([128, 129, 1000]))),
                bs=draw(st.sampled_from([1, 7, 16, 64, 128])), topk=draw(st.sampled_from([1, 2, 5, 16, 63, 64])),
                local=draw(st.sampled_from([0, 0, 1, 2, 100])), init=draw(st.sampled_from([0, 0, 1, 3])),
                scores=draw(st.sampled_from(["ties", "randn", "specials"])), strided=draw(st.booleans()),
                seed=draw(SEEDS))


@fuzz(ci=25, gpu=3000)
@given(c=topk_cases())
def test_fuzz_native_topk_from_scores(c):
    gen = gen_of(c["seed"])
    h, b, nb, bs = c["h"], c["b"], c["nb"], c["bs"]
    if c["scores"] == "randn":
        s = torch.randn(b, h, nb, generator=gen)
    else:
        s = torch.randint(-3, 4, (b, h, nb), generator=gen).float()
        if c["scores"] == "specials":
            pick = torch.randint(0, 8, s.shape, generator=gen)
            specials = torch.tensor([math.nan, -math.inf, math.inf, -0.0, 0.0, -math.nan])
            s = torch.where(pick < specials.numel(), specials[pick.clamp(max=specials.numel() - 1)], s)
    score = s.permute(1, 0, 2) if c["strided"] else s.permute(1, 0, 2).contiguous()  # [H, B, NB]
    pool = [0, -1, 1, bs - 1, bs, bs + 1, nb * bs, nb * bs + 1, I32_MAX, I32_MIN]
    lens = [pool[ri(gen, 0, len(pool) - 1)] if ri(gen, 0, 1) else ri(gen, 0, nb * bs + bs) for _ in range(b)]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kw = {}
    if c["local"]:
        kw["force_local_blocks"] = c["local"]
    if c["init"]:
        kw["force_init_blocks"] = c["init"]
    out = msa.native_topk_from_scores(score.to(DEV), seq_lens.to(DEV), bs, c["topk"], **kw)
    assert out.dtype == torch.int32 and out.shape == (h, b, c["topk"]) and out.is_contiguous()
    want = ref_topk_forced(score, seq_lens, bs, c["topk"], c["init"], c["local"])
    assert torch.equal(out.cpu(), want), f"top-k differs for {c}"


# ------------------------------------------------------------------------------------------------------------
# decode indexer: flash_decode_with_topk_idx
# ------------------------------------------------------------------------------------------------------------


@st.composite
def indexer_cases(draw):
    return dict(b=draw(st.integers(0, 4)), hkv=draw(st.integers(1, 2)), g=draw(st.sampled_from([1, 2, 4, 8])),
                d=draw(st.sampled_from([64, 128])), bs=draw(st.sampled_from([16, 32, 64, 128])),
                topk=draw(st.sampled_from([1, 2, 3, 4, 8])), init=draw(st.integers(0, 2)),
                local=draw(st.integers(0, 2)), score_type=draw(st.sampled_from(["max", "lse"])),
                value=draw(st.booleans()), sink=draw(st.booleans()), width=draw(st.integers(1, 600)),
                max_seqlen=draw(st.sampled_from(["width", "max_len", "more"])), fp8=HAS_CUDA and draw(st.booleans()),
                scale=draw(st.one_of(st.none(), st.floats(0.02, 0.2))), seed=draw(SEEDS))


@fuzz(ci=10, gpu=1500)
@given(c=indexer_cases())
def test_fuzz_decode_indexer(c):
    gen = gen_of(c["seed"])
    b, hkv, d, bs, width = c["b"], c["hkv"], c["d"], c["bs"], c["width"]
    hq = hkv * c["g"]
    max_reqs, max_slots = b + 2, max(b, 1) * width + 17
    pool = [0, 1, bs, bs + 1, width, width + 9, -3, I32_MAX]
    lens = [pool[ri(gen, 0, len(pool) - 1)] if ri(gen, 0, 2) == 0 else ri(gen, 0, width) for _ in range(b)]
    sl = torch.tensor(lens, dtype=torch.int32)
    r2t = torch.randint(-max_slots, 2 * max_slots, (max_reqs, width), generator=gen, dtype=torch.int32)
    sid = torch.randint(0, max_reqs, (b,), generator=gen, dtype=torch.int64)
    kv_dtype = FP8 if c["fp8"] else ADT
    q = randn((b, hq, d), gen, ADT)
    kc = randn((max_slots, hkv, d), gen, kv_dtype)
    vc = randn((max_slots, hkv, d), gen, kv_dtype) if c["value"] else None
    sink = randn((hq, d), gen, torch.float32) if c["sink"] else None
    lmax = max([max(0, min(x, width)) for x in lens] + [0])
    max_seqlen = {"width": width, "max_len": lmax, "more": width + 100}[c["max_seqlen"]]
    scale = d ** -0.5 if c["scale"] is None else c["scale"]
    o, idx, none = msa.flash_decode_with_topk_idx(
        q, sink, kc, vc, r2t.to(DEV), sl.to(DEV), max_seqlen, sid.to(DEV), bs, c["topk"], c["init"], c["local"],
        sm_scale=c["scale"], score_type=c["score_type"], disable_index_value=not c["value"])
    assert none is None and idx.dtype == torch.int32 and idx.shape == (hq, b, c["topk"])
    nbw = -(-max(0, min(max_seqlen, width)) // bs)
    lse_type = c["score_type"] == "lse"
    kr = kc.float() if c["fp8"] else kc
    ref_sc = _decode_ref_scores(q.cpu(), kr.cpu(), r2t, sl, sid, bs, nbw, scale, lse_type)
    got_sc = ix_mod._decode_block_scores_op(q, kc, r2t.to(DEV), sl.to(DEV), sid.to(DEV), nbw, bs, scale,
                                            lse_type).cpu()
    assert torch.equal(torch.isneginf(got_sc), torch.isneginf(ref_sc)), f"score -inf pattern differs for {c}"
    fin = torch.isfinite(ref_sc)
    torch.testing.assert_close(got_sc[fin].double(), ref_sc[fin], atol=2e-3, rtol=2e-3)
    # selection: exact on the kernel's own scores ...
    assert torch.equal(idx.cpu(), _ref_select(got_sc, sl, width, bs, c["topk"], c["init"], c["local"])), c
    # ... and within API.md 3.5 of the float64 ranking: every non-forced pick scores >= K-th best - 5e-3
    want = _ref_select(ref_sc, sl, width, bs, c["topk"], c["init"], c["local"])
    for hh in range(hq):
        for bb in range(b):
            g_row = [j for j in idx[hh, bb].tolist() if j >= 0]
            w_row = [j for j in want[hh, bb].tolist() if j >= 0]
            assert len(g_row) == len(w_row), f"valid count differs at ({hh}, {bb}) for {c}"
            L = max(0, min(lens[bb], width))
            nb = min(-(-L // bs), nbw)
            forced = set(range(max(0, nb - c["local"]), nb)) | set(range(min(c["init"], nb)))
            assert forced & set(range(nb)) <= set(g_row) or len(g_row) == c["topk"]
            free_w = [ref_sc[hh, bb, j].item() for j in w_row if j not in forced]
            if free_w:
                kth = min(free_w)
                for j in g_row:
                    if j not in forced:
                        assert ref_sc[hh, bb, j].item() >= kth - 5e-3, f"pick {j} too weak at ({hh}, {bb}) for {c}"
    if c["value"] and b:
        assert o is not None and o.shape == q.shape and o.dtype == q.dtype
        all_blocks = torch.arange(max(nbw, 1), dtype=torch.int32).view(1, 1, -1).expand(hkv, b, max(nbw, 1))
        vr = vc.float() if c["fp8"] else vc
        o_ref, lse_ref = token_major_decode_ref(q, kr, vr, r2t, sl, sid, bs, all_blocks if nbw else
                                                torch.full((hkv, b, 1), -1, dtype=torch.int32), scale=scale, sink=sink)
        check_attention(o, None, o_ref, lse_ref, f"indexer value output {c}")
    elif not c["value"]:
        assert o is None


# ------------------------------------------------------------------------------------------------------------
# NVFP4 quantiser round trip
# ------------------------------------------------------------------------------------------------------------


@st.composite
def nvfp4_cases(draw):
    lead = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    return dict(lead=lead, cols=16 * draw(st.integers(1, 10)), dtype=draw(st.sampled_from(["half", "bf16"])),
                spread=draw(st.integers(0, 30)), zero_blocks=draw(st.booleans()), nan_blocks=draw(st.booleans()),
                strided=draw(st.booleans()), seed=draw(SEEDS))


@fuzz(ci=20, gpu=2000)
@given(c=nvfp4_cases())
def test_fuzz_nvfp4_quantiser_round_trip(c):
    gen = gen_of(c["seed"])
    dt = torch.bfloat16 if (c["dtype"] == "bf16" and HAS_CUDA) else torch.float16
    shape = (*c["lead"], c["cols"])
    R, C = math.prod(c["lead"]), c["cols"] // 16
    x = torch.randn(R, C, 16, generator=gen)
    # per-block magnitudes over 2^[-spread/2, spread/2] (fp16 range kept), some all-zero and some NaN blocks
    e = torch.randint(-c["spread"] // 2, c["spread"] // 2 + 1, (R, C, 1), generator=gen).clamp(-14, 12)
    x = x * torch.pow(2.0, e.float())
    if c["zero_blocks"] and x.numel():
        x[torch.rand(R, C, generator=gen) < 0.2] = 0
    if c["nan_blocks"] and x.numel():
        x.view(-1)[torch.randint(0, x.numel(), (3,), generator=gen)] = math.nan
    x = x.reshape(shape).to(dt)
    if c["strided"] and len(shape) >= 2:  # same values through a transposed copy
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    x = x.to(DEV)
    qx = msa.quantize_bf16_to_nvfp4_128x4(x)
    data, scale, gs, _ = ref_quantize(x)
    assert qx.original_shape == shape and qx.logical_scale_shape == (R, C)
    assert torch.equal(qx.data.cpu().reshape(R, C * 8), torch.from_numpy(data)), f"data bytes differ for {c}"
    assert torch.equal(qx.scale_128x4.cpu(), torch.from_numpy(scale)), f"scale bytes differ for {c}"
    assert qx.global_scale.cpu().numpy()[0].tobytes() == gs.tobytes(), f"global scale differs for {c}"
    xh = msa.dequantize_nvfp4_128x4_to_bf16(qx)
    assert xh.shape == shape and xh.dtype == torch.bfloat16
    if msa.has_native_ops() and R:
        nat = msa.native_nvfp4_dequant_swizzled_to_bf16(qx.data, qx.scale_128x4, qx.global_scale)
        # bit-identical, NaN payloads included (canonical 0x7FC0)
        assert torch.equal(nat.view(torch.int16).cpu(), xh.view(torch.int16).cpu()), "native dequant differs"
    xd = x.double().cpu().reshape(R, C, 16)
    xhd = xh.double().cpu().reshape(R, C, 16)
    nan_blk = torch.isnan(xd).any(-1)
    assert torch.isnan(xhd[nan_blk]).all(), "a NaN must poison its whole 16-element block"
    ok = ~nan_blk
    assert not torch.isnan(xhd[ok]).any(), "NaN leaked outside the NaN blocks"
    g = float(qx.global_scale[0])
    ab = xd[ok].abs().amax(-1, keepdim=True)
    err = (xhd[ok] - xd[ok]).abs()
    bound = 0.25 * ab + 6 * 2.0**-9 * g
    # the bf16 rounding of the dequantised value adds at most half a bf16 ulp of it
    assert (err <= bound * (1 + 1e-6) + xhd[ok].abs() * 2.0**-8 + 1e-30).all(), \
        f"API.md 5.8 accuracy bound violated for {c}"


# ------------------------------------------------------------------------------------------------------------
# invalid arguments: the exception class of API.md (3.8 and the per-function tables), naming the argument
# ------------------------------------------------------------------------------------------------------------

MsaUnsupportedError = msa.MsaUnsupportedError


def _swap(**changes):
    return lambda kw: {**kw, **changes}


def _with(fn):
    return lambda kw: {**kw, **fn(kw)}


def _t(kw, name, fn):
    """Replace tensor ``name`` by ``fn(tensor)``."""
    return {**kw, name: fn(kw[name])}


def base_paged_decode(gen, b, g):
    hkv, sq, topk, maxp = 1, 1, 2, 2
    q = randn((b * sq, hkv * g, 128), gen, ADT)
    k = randn((b * maxp + 1, hkv, 128, 128), gen, ADT)
    v = randn((b * maxp + 1, hkv, 128, 128), gen, ADT)
    pt = torch.arange(b * maxp, dtype=torch.int32).view(b, maxp).to(DEV)
    sk = torch.tensor([100 + 50 * i for i in range(b)], dtype=torch.int32).to(DEV)
    idx = index_tensor([2] * (b * sq), hkv, topk, gen)
    return msa.sparse_decode_atten_func, dict(q=q, k=k, v=v, q2k_indices=idx, page_table=pt, seqused_k=sk,
                                              seqlen_q=sq, max_seqlen_k=256, return_softmax_lse=True)


def base_token_major(gen, b, g):
    hkv, d, width = 1, 64, 100
    q = randn((b, hkv * g, d), gen, ADT)
    kc = randn((b * width + 3, hkv, d), gen, ADT)
    vc = randn((b * width + 3, hkv, d), gen, ADT)
    r2t = torch.arange(b * width, dtype=torch.int32).view(b, width).to(DEV)
    return msa.flash_decode_with_gqa_share_sparse, dict(
        q=q, sink=None, k_cache=kc, v_cache=vc, req_to_token=r2t,
        seq_lens=torch.tensor([60 + i for i in range(b)], dtype=torch.int32).to(DEV),
        slot_ids=torch.arange(b, dtype=torch.int32).to(DEV), block_size=32,
        topk_idx=index_tensor([2] * b, hkv, 2, gen))


def base_prefill(gen, b, g):
    hkv, topk = 1, 2
    lq, lk = [3 + i for i in range(b)], [150 + i for i in range(b)]
    q = randn((sum(lq), hkv * g, 128), gen, ADT)
    k = randn((sum(lk), hkv, 128), gen, ADT)
    v = randn((sum(lk), hkv, 128), gen, ADT)
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32).to(DEV)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32).to(DEV)
    q2k = index_tensor([2] * sum(lq), hkv, topk, gen)
    rp, qi = msa.build_k2q_csr(q2k, cu_q, cu_k, 128, total_k=sum(lk))
    return msa.sparse_atten_func, dict(q=q, k=k, v=v, k2q_row_ptr=rp, k2q_q_indices=qi, topK=topk,
                                       cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq),
                                       max_seqlen_k=max(lk), causal=True, return_softmax_lse=True)


def base_prefill_paged(gen, b, g):
    fn, kw = base_prefill(gen, b, g)
    pages = 2 * b + 1
    kp = randn((pages, 1, 128, 128), gen, ADT)
    vp = randn((pages, 1, 128, 128), gen, ADT)
    pt = torch.arange(2 * b, dtype=torch.int32).view(b, 2).to(DEV)
    sk = torch.tensor([150 + i for i in range(b)], dtype=torch.int32).to(DEV)
    return fn, {**kw, "k": kp, "v": vp, "page_table": pt, "seqused_k": sk}


def base_csr(gen, b, g):
    lq, lk = [3 + i for i in range(b)], [150 + i for i in range(b)]
    return msa.build_k2q_csr, dict(
        q2k_indices=index_tensor([2] * sum(lq), 1, 3, gen),
        cu_seqlens_q=torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32).to(DEV),
        cu_seqlens_k=torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32).to(DEV),
        kv_block_size=128, total_k=sum(lk))


def base_topk(gen, b, g):
    return msa.native_topk_from_scores, dict(score=torch.randn(g, b, 9, generator=gen).to(DEV),
                                             seq_lens=torch.randint(0, 600, (b,), generator=gen,
                                                                    dtype=torch.int32).to(DEV),
                                             block_size=64, topk=4)


def base_indexer(gen, b, g):
    hkv, d, width = 1, 64, 100
    return msa.flash_decode_with_topk_idx, dict(
        q=randn((b, hkv * g, d), gen, ADT), sink=None, k_cache=randn((b * width + 3, hkv, d), gen, ADT),
        v_cache=randn((b * width + 3, hkv, d), gen, ADT),
        req_to_token=torch.arange(b * width, dtype=torch.int32).view(b, width).to(DEV),
        seq_lens=torch.tensor([60 + i for i in range(b)], dtype=torch.int32).to(DEV), max_seqlen=width,
        slot_ids=torch.arange(b, dtype=torch.int32).to(DEV), block_size=16, topk=3, init_blocks=1, local_blocks=1)


def base_quantize(gen, b, g):
    return msa.quantize_bf16_to_nvfp4_128x4, dict(x=randn((b, g, 32), gen, ADT))


def base_dequantize(gen, b, g):
    return msa.dequantize_nvfp4_128x4_to_bf16, dict(qx=msa.quantize_bf16_to_nvfp4_128x4(randn((b, g, 32), gen, ADT)))


def _qx(**changes):
    import dataclasses

    return lambda kw: {**kw, "qx": dataclasses.replace(kw["qx"], **changes)}


F32, I64 = torch.float32, torch.int64
BAD_ARGS = {  # base -> [(case id, mutation, exception class, substring the message must contain or None)]
    "paged_decode": (base_paged_decode, [
        ("q_fp32", lambda kw: _t(kw, "q", lambda t: t.float()), TypeError, None),
        ("kv_fp32", lambda kw: _t(_t(kw, "k", lambda t: t.float()), "v", lambda t: t.float()), TypeError, None),
        ("v_dtype", lambda kw: _t(kw, "v", lambda t: t.to(FP8)), TypeError, None),
        ("page_table_i64", lambda kw: _t(kw, "page_table", lambda t: t.long()), TypeError, "page_table"),
        ("seqused_k_i64", lambda kw: _t(kw, "seqused_k", lambda t: t.long()), TypeError, "seqused_k"),
        ("q2k_i64", lambda kw: _t(kw, "q2k_indices", lambda t: t.long()), TypeError, "q2k_indices"),
        ("q_rank2", lambda kw: _t(kw, "q", lambda t: t[:, 0]), ValueError, "q"),
        ("k_rank3", lambda kw: _t(kw, "k", lambda t: t[0]), ValueError, "k"),
        ("v_shape", lambda kw: _t(kw, "v", lambda t: t[:-1]), ValueError, None),
        ("q_rows", lambda kw: _t(kw, "q", lambda t: torch.cat([t, t[:1]])), ValueError, "q"),
        ("q2k_rows", lambda kw: _t(kw, "q2k_indices", lambda t: torch.cat([t, t[:, :1]], 1)), ValueError,
         "q2k_indices"),
        ("q2k_topk65", lambda kw: _t(kw, "q2k_indices", lambda t: t[:, :, :1].expand(-1, -1, 65)), ValueError,
         "q2k_indices"),
        ("q2k_rank2", lambda kw: _t(kw, "q2k_indices", lambda t: t[0]), ValueError, "q2k_indices"),
        ("seqlen_q_0", _swap(seqlen_q=0), ValueError, "seqlen_q"),
        ("max_seqlen_k_0", _swap(max_seqlen_k=0), ValueError, "max_seqlen_k"),
        ("page_table_rank1", lambda kw: _t(kw, "page_table", lambda t: t[:, 0]), ValueError, "page_table"),
        ("seqused_k_len", lambda kw: _t(kw, "seqused_k", lambda t: torch.cat([t, t[:1]])), ValueError, "seqused_k"),
        ("head_dim_64", lambda kw: _t(_t(_t(kw, "q", lambda t: t[..., :64]), "k", lambda t: t[..., :64]), "v",
                                      lambda t: t[..., :64]), MsaUnsupportedError, None),
        ("gqa_3", lambda kw: _t(kw, "q", lambda t: t[:, :1].expand(-1, 3, -1)), MsaUnsupportedError, None),
        ("blk_kv_64", _swap(blk_kv=64), ValueError, "blk_kv"),
        ("fp16_q_fp8_kv", lambda kw: _t(_t(_t(kw, "q", lambda t: t.half()), "k", lambda t: t.to(FP8)), "v",
                                        lambda t: t.to(FP8)), TypeError, None),
        ("softmax_scale_nan", _swap(softmax_scale=math.nan), ValueError, "softmax_scale"),
    ]),
    "token_major": (base_token_major, [
        ("q_fp32", lambda kw: _t(kw, "q", lambda t: t.float()), TypeError, "q"),
        ("q_fp8", lambda kw: _t(kw, "q", lambda t: t.to(FP8)), TypeError, "q"),
        ("v_dtype", lambda kw: _t(kw, "v_cache", lambda t: t.to(FP8)), TypeError, None),
        ("seq_lens_f32", lambda kw: _t(kw, "seq_lens", lambda t: t.float()), TypeError, "seq_lens"),
        ("slot_ids_f32", lambda kw: _t(kw, "slot_ids", lambda t: t.float()), TypeError, "slot_ids"),
        ("req_to_token_f32", lambda kw: _t(kw, "req_to_token", lambda t: t.float()), TypeError, "req_to_token"),
        ("topk_idx_f32", lambda kw: _t(kw, "topk_idx", lambda t: t.float()), TypeError, "topk_idx"),
        ("topk_idx_i16", lambda kw: _t(kw, "topk_idx", lambda t: t.short()), TypeError, "topk_idx"),
        ("seq_lens_len", lambda kw: _t(kw, "seq_lens", lambda t: torch.cat([t, t[:1]])), ValueError, "seq_lens"),
        ("slot_ids_len", lambda kw: _t(kw, "slot_ids", lambda t: torch.cat([t, t[:1]])), ValueError, "slot_ids"),
        ("topk_idx_heads", lambda kw: _t(kw, "topk_idx", lambda t: torch.cat([t, t])), ValueError, "topk_idx"),
        ("topk_idx_batch", lambda kw: _t(kw, "topk_idx", lambda t: torch.cat([t, t[:, :1]], 1)), ValueError,
         "topk_idx"),
        ("block_size_48", _swap(block_size=48), ValueError, "block_size"),
        ("block_size_8", _swap(block_size=8), ValueError, "block_size"),
        ("block_size_1024", _swap(block_size=1024), ValueError, "block_size"),
        ("head_dim_96", lambda kw: {**kw, "q": kw["q"][..., :96] if kw["q"].shape[2] > 96 else
                                    torch.cat([kw["q"], kw["q"][..., :32]], -1),
                                    "k_cache": torch.cat([kw["k_cache"], kw["k_cache"][..., :32]], -1),
                                    "v_cache": torch.cat([kw["v_cache"], kw["v_cache"][..., :32]], -1)},
         MsaUnsupportedError, None),
        ("hq_not_multiple", lambda kw: {**kw, "k_cache": torch.cat([kw["k_cache"]] * 2, 1),
                                        "v_cache": torch.cat([kw["v_cache"]] * 2, 1),
                                        "q": torch.cat([kw["q"]] * 3, 1)[:, :3],
                                        "topk_idx": torch.cat([kw["topk_idx"]] * 2)}, ValueError, None),
        ("sink_shape", lambda kw: {**kw, "sink": torch.zeros(kw["q"].shape[1] + 1, kw["q"].shape[2], device=DEV)},
         ValueError, "sink"),
        ("kv_shape", lambda kw: _t(kw, "v_cache", lambda t: t[:-1]), ValueError, None),
    ]),
    "prefill": (base_prefill, [
        ("q_rank2", lambda kw: _t(kw, "q", lambda t: t[:, 0]), ValueError, "q"),
        ("q_fp32", lambda kw: _t(kw, "q", lambda t: t.float()), TypeError, None),
        ("kv_fp32", lambda kw: _t(_t(kw, "k", lambda t: t.float()), "v", lambda t: t.float()), TypeError, None),
        ("head_dim_64", lambda kw: _t(_t(_t(kw, "q", lambda t: t[..., :64]), "k", lambda t: t[..., :64]), "v",
                                      lambda t: t[..., :64]), MsaUnsupportedError, None),
        ("gqa_3", lambda kw: _t(kw, "q", lambda t: t[:, :1].expand(-1, 3, -1)), MsaUnsupportedError, None),
        ("row_ptr_i64", lambda kw: _t(kw, "k2q_row_ptr", lambda t: t.long()), TypeError, "k2q_row_ptr"),
        ("q_indices_i64", lambda kw: _t(kw, "k2q_q_indices", lambda t: t.long()), TypeError, "k2q_q_indices"),
        ("row_ptr_rank1", lambda kw: _t(kw, "k2q_row_ptr", lambda t: t[0]), ValueError, "k2q_row_ptr"),
        ("row_ptr_heads", lambda kw: _t(kw, "k2q_row_ptr", lambda t: torch.cat([t, t])), ValueError, None),
        ("q_indices_short", lambda kw: _t(kw, "k2q_q_indices", lambda t: t[:, :-1]), ValueError, "k2q_q_indices"),
        ("cu_q_i64", lambda kw: _t(kw, "cu_seqlens_q", lambda t: t.long()), TypeError, "cu_seqlens_q"),
        ("cu_k_f32", lambda kw: _t(kw, "cu_seqlens_k", lambda t: t.float()), TypeError, "cu_seqlens_k"),
        ("cu_shapes", lambda kw: _t(kw, "cu_seqlens_k", lambda t: torch.cat([t, t[-1:]])), ValueError, None),
        ("dense_with_seqused_k", _with(lambda kw: {"seqused_k": torch.zeros(kw["cu_seqlens_q"].shape[0] - 1,
                                                                             dtype=torch.int32, device=DEV)}),
         ValueError, "seqused_k"),
        ("kv_shapes", lambda kw: _t(kw, "v", lambda t: t[:-1]), ValueError, None),
        ("topK_0", _swap(topK=0), ValueError, "topK"),
        ("topK_65", _swap(topK=65), ValueError, "topK"),
        ("tau_0", _swap(lse_temperature_scale=0.0), ValueError, "lse_temperature_scale"),
        ("tau_nan", _swap(lse_temperature_scale=math.nan), ValueError, "lse_temperature_scale"),
        ("tau_inf", _swap(lse_temperature_scale=math.inf), ValueError, "lse_temperature_scale"),
        ("temperature_without_lse", _swap(return_temperature_lse=True, return_softmax_lse=False), ValueError,
         "return_temperature_lse"),
        ("partial_dtype_i32", _swap(partial_dtype=torch.int32), TypeError, "partial_dtype"),
        ("qk_dtype_f32", _swap(qk_dtype=torch.float32), TypeError, "qk_dtype"),
    ]),
    "prefill_paged": (base_prefill_paged, [
        ("page_table_i64", lambda kw: _t(kw, "page_table", lambda t: t.long()), TypeError, "page_table"),
        ("page_table_rows", lambda kw: _t(kw, "page_table", lambda t: torch.cat([t, t[:1]])), ValueError,
         "page_table"),
        ("seqused_k_i64", lambda kw: _t(kw, "seqused_k", lambda t: t.long()), TypeError, "seqused_k"),
        ("seqused_k_len", lambda kw: _t(kw, "seqused_k", lambda t: torch.cat([t, t[:1]])), ValueError, "seqused_k"),
        ("kv_rank3", lambda kw: _t(_t(kw, "k", lambda t: t[0]), "v", lambda t: t[0]), ValueError, None),
        ("page_dim_64", lambda kw: _t(_t(kw, "k", lambda t: t[:, :, :64]), "v", lambda t: t[:, :, :64]),
         ValueError, None),
    ]),
    "csr": (base_csr, [
        ("total_k_none", _swap(total_k=None), ValueError, "total_k"),
        ("total_k_neg", _swap(total_k=-1), ValueError, "total_k"),
        ("block_0", _swap(kv_block_size=0), ValueError, "kv_block_size"),
        ("block_64", _swap(kv_block_size=64), MsaUnsupportedError, "kv_block_size"),
        ("q2k_i64", lambda kw: _t(kw, "q2k_indices", lambda t: t.long()), TypeError, "q2k_indices"),
        ("q2k_rank2", lambda kw: _t(kw, "q2k_indices", lambda t: t[0]), ValueError, "q2k_indices"),
        ("q2k_topk0", lambda kw: _t(kw, "q2k_indices", lambda t: t[:, :, :0]), ValueError, None),
        ("cu_q_i64", lambda kw: _t(kw, "cu_seqlens_q", lambda t: t.long()), TypeError, "cu_seqlens_q"),
        ("cu_k_rank2", lambda kw: _t(kw, "cu_seqlens_k", lambda t: t.view(1, -1)), ValueError, "cu_seqlens_k"),
        ("cu_q_empty", lambda kw: _t(kw, "cu_seqlens_q", lambda t: t[:0]), ValueError, "cu_seqlens_q"),
        ("cu_shapes", lambda kw: _t(kw, "cu_seqlens_k", lambda t: torch.cat([t, t[-1:]])), ValueError, None),
        ("total_rows_neg", _swap(total_rows=-1), ValueError, "total_rows"),
        ("qhead_per_kv_0", _swap(qhead_per_kv=0), ValueError, "qhead_per_kv"),
        ("schedule_without_max", _swap(return_schedule=True, max_seqlen_q=5), ValueError, None),
    ]),
    "topk": (base_topk, [
        ("score_f64", lambda kw: _t(kw, "score", lambda t: t.double()), TypeError, "score"),
        ("score_f16", lambda kw: _t(kw, "score", lambda t: t.half()), TypeError, "score"),
        ("seq_lens_i64", lambda kw: _t(kw, "seq_lens", lambda t: t.long()), TypeError, "seq_lens"),
        ("score_rank2", lambda kw: _t(kw, "score", lambda t: t[0]), ValueError, "score"),
        ("seq_lens_len", lambda kw: _t(kw, "seq_lens", lambda t: torch.cat([t, t[:1]])), ValueError, "seq_lens"),
        ("topk_0", _swap(topk=0), ValueError, "topk"),
        ("topk_65", _swap(topk=65), ValueError, "topk"),
        ("block_size_0", _swap(block_size=0), ValueError, "block_size"),
        ("force_local_neg", _swap(force_local_blocks=-1), ValueError, "force_local_blocks"),
    ]),
    "indexer": (base_indexer, [
        ("score_type", _swap(score_type="sum"), ValueError, "score_type"),
        ("q_fp32", lambda kw: _t(kw, "q", lambda t: t.float()), TypeError, None),
        ("v_cache_none", _swap(v_cache=None), ValueError, "v_cache"),
        ("v_cache_shape", lambda kw: _t(kw, "v_cache", lambda t: t[:-1]), ValueError, "v_cache"),
        ("v_cache_dtype", lambda kw: _t(kw, "v_cache", lambda t: t.to(FP8)), TypeError, None),
        ("seq_lens_len", lambda kw: _t(kw, "seq_lens", lambda t: torch.cat([t, t[:1]])), ValueError, "seq_lens"),
        ("slot_ids_len", lambda kw: _t(kw, "slot_ids", lambda t: torch.cat([t, t[:1]])), ValueError, "slot_ids"),
        ("hq_not_multiple", lambda kw: {**kw, "k_cache": torch.cat([kw["k_cache"]] * 2, 1),
                                        "v_cache": torch.cat([kw["v_cache"]] * 2, 1),
                                        "q": torch.cat([kw["q"]] * 3, 1)[:, :3]}, ValueError, None),
        ("topk_0", _swap(topk=0), ValueError, "topk"),
        ("topk_65", _swap(topk=65), ValueError, "topk"),
        ("block_size_24", _swap(block_size=24), ValueError, "block_size"),
        ("init_neg", _swap(init_blocks=-1), ValueError, "init_blocks"),
        ("local_neg", _swap(local_blocks=-1), ValueError, "local_blocks"),
        ("dense_main", _swap(use_dense_main_attn=True), MsaUnsupportedError, None),
        ("max_seqlen_float", _swap(max_seqlen=100.0), ValueError, "max_seqlen"),
    ]),
    "quantize": (base_quantize, [
        ("x_fp32", lambda kw: _t(kw, "x", lambda t: t.float()), TypeError, "x"),
        ("x_int", lambda kw: _t(kw, "x", lambda t: t.to(torch.int16)), TypeError, "x"),
        ("x_rank1", lambda kw: _t(kw, "x", lambda t: t.reshape(-1)), ValueError, "x"),
        ("x_cols24", lambda kw: _t(kw, "x", lambda t: t[..., :24]), ValueError, "x"),
        ("x_not_tensor", _swap(x=[1.0] * 16), TypeError, "x"),
    ]),
    "dequantize": (base_dequantize, [
        ("plain_tensor", lambda kw: {**kw, "qx": kw["qx"].data}, TypeError, "qx"),
        ("tuple", lambda kw: {**kw, "qx": tuple(getattr(kw["qx"], f) for f in kw["qx"].__dataclass_fields__)},
         TypeError, "qx"),
        ("global_empty", _qx(global_scale=torch.zeros(0, device=DEV)), ValueError, "global_scale"),
        ("global_f64", _qx(global_scale=torch.ones(1, dtype=torch.float64, device=DEV)), TypeError,
         "global_scale"),
        ("data_f32", lambda kw: _qx(data=kw["qx"].data.float())(kw), TypeError, "data"),
        ("scale_small", lambda kw: _qx(scale_128x4=kw["qx"].scale_128x4[:1])(kw), ValueError, None),
    ]),
}

if HAS_CUDA:  # one device for every tensor argument (API.md 3.6): ValueError naming an argument
    def _to_cpu(name):
        return lambda kw: _t(kw, name, lambda t: t.cpu())

    BAD_ARGS["paged_decode"][1].extend([("page_table_cpu", _to_cpu("page_table"), ValueError, "page_table"),
                                        ("q2k_cpu", _to_cpu("q2k_indices"), ValueError, "q2k_indices")])
    BAD_ARGS["token_major"][1].extend([("seq_lens_cpu", _to_cpu("seq_lens"), ValueError, "seq_lens"),
                                       ("topk_idx_cpu", _to_cpu("topk_idx"), ValueError, "topk_idx")])
    BAD_ARGS["prefill"][1].append(("row_ptr_cpu", _to_cpu("k2q_row_ptr"), ValueError, None))
    BAD_ARGS["csr"][1].append(("q2k_cpu", _to_cpu("q2k_indices"), ValueError, None))
    BAD_ARGS["topk"][1].append(("seq_lens_cpu", _to_cpu("seq_lens"), ValueError, "seq_lens"))
    BAD_ARGS["indexer"][1].append(("slot_ids_cpu", _to_cpu("slot_ids"), ValueError, "slot_ids"))

BAD_CASES = [pytest.param(fn_name, i, id=f"{fn_name}-{case[0]}")
             for fn_name, (_, cases) in BAD_ARGS.items() for i, case in enumerate(cases)]


@pytest.mark.parametrize("fn_name,i", BAD_CASES)
@fuzz(ci=1, gpu=20)
@given(b=st.integers(1, 3), g=st.sampled_from([1, 2, 4]), seed=SEEDS)
def test_fuzz_invalid_arguments(fn_name, i, b, g, seed):
    """A valid call, the mutated call (must raise the spec'd class, naming the argument), the valid call again
    (bit-identical: a failed call leaves no state behind, e.g. in the per-signature validation caches)."""
    base, cases = BAD_ARGS[fn_name]
    case_id, mutate, exc, name = cases[i]
    fn, kw = base(gen_of(seed), b, g)
    before = fn(**kw)
    bad = mutate(kw)
    with pytest.raises(exc) as info:
        fn(**bad)
    if exc is TypeError:
        assert not isinstance(info.value, ValueError), f"{case_id}: {info.value!r} should be a TypeError only"
    elif exc is ValueError and isinstance(info.value, MsaUnsupportedError):
        pass  # a subclass of ValueError: accepted where API.md says ValueError
    if name is not None:
        assert name in str(info.value), f"{case_id}: the message does not name {name!r}: {info.value}"
    assert_bitwise_equal(fn(**kw), before, f"{case_id}: the valid call after the failed one")
