"""FP4 indexer block scores (API.md §5.14, §11.4) against a float64 reference.

The public entry point on every format / layout / scale kind, then the tensor-core kernel's own paths through
``fp4_indexer._launch`` with explicit configurations: KV-chunk split boundaries, several Q heads sharing one K
page (head groups smaller / larger than G, non-power-of-two G), causal with qo_offset and odd lengths, missing
pages and -1 / out-of-range page ids, and output buffers poisoned with NaN (every element must be written).
Under the CPU interpreter nvfp4 runs its GPU operand path (fp16, exact); mxfp4 and decoded float scales run fp32.
"""

import importlib
import math

import pytest
import torch

from .helpers import msa

fx = importlib.import_module(msa.__name__ + ".fp4_indexer")
fp4_indexer_block_scores = getattr(msa, "fp4_indexer_block_scores", None) or fx.fp4_indexer_block_scores

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
E8M0 = getattr(torch, "float8_e8m0fnu", None)


def _e4m3_val(b):
    b = int(b)
    e, m = (b >> 3) & 15, b & 7
    v = m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if b & 0x80 else v


def _scale_vals(bytes_u8: torch.Tensor, fmt: str) -> torch.Tensor:
    flat = bytes_u8.reshape(-1).tolist()
    if fmt == "mxfp4":
        vals = [float("nan") if b == 255 else 2.0 ** (b - 127) for b in flat]
    else:
        vals = [_e4m3_val(b) for b in flat]
    return torch.tensor(vals, dtype=torch.float64).reshape(bytes_u8.shape)


def _deq(packed: torch.Tensor, scale_vals: torch.Tensor, gs: int) -> torch.Tensor:
    """packed [..., 64] bytes, scale_vals [..., 128 // gs] -> float64 [..., 128]."""
    p = packed.to(torch.int64)
    codes = torch.stack([p & 15, p >> 4], -1).reshape(*p.shape[:-1], 128)
    return E2M1[codes] * scale_vals.repeat_interleave(gs, dim=-1)


def _preorder(logical_u8: torch.Tensor) -> torch.Tensor:
    """Logical [L, mn, Gs] bytes -> storage (L, ceil(mn/128), ceil(Gs/4), 32, 4, 4) by the §5.14 formula."""
    L, mn, Gs = logical_u8.shape
    rm, rg = -(-mn // 128), -(-Gs // 4)
    store = torch.full((L * rm * rg * 512,), 0xAB, dtype=torch.uint8)  # padding is garbage: must be ignored
    l = torch.arange(L).view(-1, 1, 1)
    m = torch.arange(mn).view(1, -1, 1)
    c = torch.arange(Gs).view(1, 1, -1)
    off = l * 512 * rm * rg + (m // 128) * 512 * rg + (c // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + c % 4
    store[off.reshape(-1)] = logical_u8.reshape(-1)
    return store.view(L, rm, rg, 32, 4, 4)


def _make_case(fmt, seq_q, seq_k, pages, Hq, Hkv, extra_pages=2):
    gs = 32 if fmt == "mxfp4" else 16
    Gs = 128 // gs
    B = len(seq_q)
    total_q = sum(seq_q)
    P = sum(pages) + extra_pages
    q = torch.randint(0, 256, (total_q, Hq, 64), dtype=torch.uint8)
    k = torch.randint(0, 256, (P, Hkv, 128, 64), dtype=torch.uint8)
    if fmt == "mxfp4":
        qs = torch.randint(124, 131, (total_q, Hq, Gs), dtype=torch.uint8)
        ks = torch.randint(124, 131, (P, Hkv, 128, Gs), dtype=torch.uint8)
    else:  # E4M3 codes with exponent field 4..10 (values 2^-3 .. ~15)
        qs = (torch.randint(4, 11, (total_q, Hq, Gs)) << 3 | torch.randint(0, 8, (total_q, Hq, Gs))).to(torch.uint8)
        ks = (torch.randint(4, 11, (P, Hkv, 128, Gs)) << 3 | torch.randint(0, 8, (P, Hkv, 128, Gs))).to(torch.uint8)
    perm = torch.randperm(P).to(torch.int32)
    kv_indices = perm[: sum(pages)].clone()
    cu_q = torch.tensor([0] + list(torch.tensor(seq_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(seq_k).cumsum(0)), dtype=torch.int32)
    cu_p = torch.tensor([0] + list(torch.tensor(pages).cumsum(0)), dtype=torch.int32)
    return dict(q=q, k=k, qs=qs, ks=ks, kv_indices=kv_indices, cu_q=cu_q, cu_k=cu_k, cu_p=cu_p, gs=gs, B=B)


def _reference(c, fmt, max_seqlen_k, causal, qo_offset=None, max_seqlen_q=None, device="cpu"):
    """§11.4 in float64. Rows no request owns (outside every ``[cu_q[b], cu_q[b+1])``, or past ``max_seqlen_q``
    tokens of their request), blocks past the page count and pages whose id is -1 / out of range are -inf."""
    q, k, gs = c["q"], c["k"], c["gs"]
    total_q, Hq, _ = q.shape
    P, Hkv = k.shape[:2]
    G = Hq // Hkv
    NB = -(-max_seqlen_k // 128)
    qd = _deq(q, _scale_vals(c["qs"], fmt), gs).to(device)  # [total_q, Hq, 128]
    kd = _deq(k, _scale_vals(c["ks"], fmt), gs).to(device)  # [P, Hkv, 128, 128]
    out = torch.full((Hq, NB, total_q), -math.inf, dtype=torch.float64, device=device)
    cu_q, cu_k, cu_p = c["cu_q"].tolist(), c["cu_k"].tolist(), c["cu_p"].tolist()
    kvi = c["kv_indices"].tolist()
    for b in range(len(cu_q) - 1):
        Lq, Lk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        npg = cu_p[b + 1] - cu_p[b]
        off = int(qo_offset[b]) if qo_offset is not None else Lk - Lq
        i = torch.arange(max(Lq, 0), device=device)
        if max_seqlen_q is not None:
            i = i[i < max_seqlen_q]
        t = cu_q[b] + i
        i = i[(t >= 0) & (t < total_q)]
        t = cu_q[b] + i
        if len(t) == 0:
            continue
        for j in range(max(0, min(NB, -(-Lk // 128), npg))):
            pidx = cu_p[b] + j
            if not 0 <= pidx < len(kvi) or not 0 <= kvi[pidx] < P:
                continue
            kk = kd[kvi[pidx]].repeat_interleave(G, 0)  # [Hq, 128 slots, 128]
            s = torch.einsum("thd,hsd->hts", qd[t], kk)  # [Hq, rows, 128]
            x = 128 * j + torch.arange(128, device=device)
            vis = (x < Lk).view(1, -1)
            if causal:
                vis = vis & (x.view(1, -1) <= i.view(-1, 1) + off)
            s = torch.where(vis.unsqueeze(0), s, torch.tensor(-math.inf, dtype=torch.float64, device=device))
            out[:, j, t] = s.max(dim=-1).values
    return out.float().cpu()


def _run(c, fmt, layout, device, max_seqlen_k, causal=False, qo_offset=None, scale_dtype=None, as_dtype=None):
    q, k = c["q"], c["k"]
    total_q, Hq, _ = q.shape
    P, Hkv = k.shape[:2]
    f8 = E8M0 if fmt == "mxfp4" else torch.float8_e4m3fn
    if layout == "public":
        qs, ks = c["qs"].view(f8), c["ks"].view(f8)
        if scale_dtype is not None:
            qs = _scale_vals(c["qs"], fmt).to(scale_dtype)
            ks = _scale_vals(c["ks"], fmt).to(scale_dtype)
    else:
        Gs = c["qs"].shape[-1]
        qs = _preorder(c["qs"].permute(1, 0, 2).contiguous()).view(f8)
        ks = _preorder(c["ks"].reshape(P * Hkv, 128, Gs)).view(f8)
    if as_dtype is not None:
        q, k = q.view(as_dtype), k.view(as_dtype)
    seq_q = (c["cu_q"][1:] - c["cu_q"][:-1])
    out = fp4_indexer_block_scores(
        q.to(device), k.to(device), qs.to(device), ks.to(device), c["cu_q"].to(device), c["cu_k"].to(device),
        c["cu_p"].to(device), max_seqlen_q=int(seq_q.max()) if len(seq_q) else 0, max_seqlen_k=max_seqlen_k,
        kv_indices=c["kv_indices"].to(device), fp4_format=fmt, causal=causal,
        qo_offset=None if qo_offset is None else qo_offset.to(device), scale_layout=layout)
    return out


def _check(out, ref):
    out = out.cpu()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), "-inf pattern differs"
    fin = torch.isfinite(ref)
    assert torch.isfinite(out[fin]).all()
    torch.testing.assert_close(out[fin], ref[fin], atol=0.1, rtol=0.01)


CASE = dict(seq_q=[5, 0, 20], seq_k=[300, 50, 129], pages=[3, 1, 1])  # request 2 lacks its 2nd page


@pytest.mark.kernels_ci
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("layout", ["public", "preordered_mma"])
def test_scores_noncausal(device, fmt, layout):
    c = _make_case(fmt, Hq=4, Hkv=2, **CASE)
    out = _run(c, fmt, layout, device, max_seqlen_k=520)
    _check(out, _reference(c, fmt, 520, False))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_scores_causal(device, fmt):
    c = _make_case(fmt, Hq=2, Hkv=1, **CASE)
    out = _run(c, fmt, "preordered_mma", device, max_seqlen_k=300, causal=True)
    _check(out, _reference(c, fmt, 300, True))


def test_scores_causal_qo_offset(device):
    c = _make_case("nvfp4", Hq=2, Hkv=2, **CASE)
    qo = torch.tensor([200, 7, -3], dtype=torch.int32)
    out = _run(c, "nvfp4", "public", device, max_seqlen_k=300, causal=True, qo_offset=qo)
    _check(out, _reference(c, "nvfp4", 300, True, qo_offset=qo))


def test_scores_alias_float_scales_and_dtypes(device):
    c = _make_case("nvfp4", Hq=2, Hkv=1, seq_q=[17], seq_k=[200], pages=[2])
    ref = _reference(c, "nvfp4", 256, False)
    _check(_run(c, "e2m1", "public", device, 256, scale_dtype=torch.float32, as_dtype=torch.int8), ref)
    if hasattr(torch, "float4_e2m1fn_x2"):
        _check(_run(c, "NVFP4", "preordered_mma", device, 256, as_dtype=torch.float4_e2m1fn_x2), ref)
    cm = _make_case("mxfp4", Hq=2, Hkv=1, seq_q=[3], seq_k=[100], pages=[1])
    _check(_run(cm, "mxfp4", "public", device, 128, scale_dtype=torch.float16), _reference(cm, "mxfp4", 128, False))


def test_scores_empty(device):
    c = _make_case("nvfp4", Hq=2, Hkv=1, seq_q=[4], seq_k=[100], pages=[1])
    assert tuple(_run(c, "nvfp4", "public", device, 0).shape) == (2, 0, 4)
    c0 = _make_case("nvfp4", Hq=2, Hkv=1, seq_q=[0], seq_k=[100], pages=[1])
    assert tuple(_run(c0, "nvfp4", "preordered_mma", device, 100).shape) == (2, 1, 0)


def test_opcheck(device):
    c = _make_case("nvfp4", Hq=2, Hkv=1, seq_q=[3, 2], seq_k=[130, 5], pages=[2, 1])
    f8 = torch.float8_e4m3fn
    args = (c["q"].to(device), c["k"].to(device), c["qs"].to(device), c["ks"].to(device), c["cu_q"].to(device),
            c["cu_k"].to(device), c["cu_p"].to(device), c["kv_indices"].to(device), None, 3, 256, fx.FMT_NVFP4,
            fx.SK_E4M3, False, False)
    torch.library.opcheck(fx._fp4_indexer_op, args)
    assert f8 is not None


def test_errors(device):
    c = _make_case("nvfp4", Hq=2, Hkv=1, seq_q=[3], seq_k=[100], pages=[1])
    f8 = torch.float8_e4m3fn
    base = dict(q_fp4=c["q"], k_fp4=c["k"], q_scale=c["qs"].view(f8), k_scale=c["ks"].view(f8),
                cu_seqlens_q=c["cu_q"], cu_seqlens_k=c["cu_k"], cu_page_offsets=c["cu_p"], max_seqlen_q=3,
                max_seqlen_k=100, kv_indices=c["kv_indices"], fp4_format="nvfp4", scale_layout="public")
    base = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in base.items()}

    def call(**kw):
        a = dict(base)
        a.update(kw)
        q, k, qs, ks, cq, ck, cp = (a.pop(n) for n in ("q_fp4", "k_fp4", "q_scale", "k_scale", "cu_seqlens_q",
                                                        "cu_seqlens_k", "cu_page_offsets"))
        return fp4_indexer_block_scores(q, k, qs, ks, cq, ck, cp, **a)

    call()
    with pytest.raises(TypeError):
        call(q_fp4=base["q_fp4"].float())
    with pytest.raises(ValueError):
        call(q_fp4=base["q_fp4"][..., :32])
    with pytest.raises(ValueError):
        call(k_fp4=base["k_fp4"][:, :, :64])
    with pytest.raises(ValueError):
        call(q_fp4=base["q_fp4"][:, :1].expand(3, 3, 64).contiguous(), k_fp4=base["k_fp4"].repeat(1, 2, 1, 1),
             q_scale=base["q_scale"].view(torch.uint8)[:, :1].expand(3, 3, 8).contiguous().view(f8),
             k_scale=base["k_scale"].view(torch.uint8).repeat(1, 2, 1, 1).view(f8))
    with pytest.raises(ValueError, match="format must be one of"):
        call(fp4_format="fp8")
    with pytest.raises(ValueError):
        call(scale_layout="swizzled")
    with pytest.raises(ValueError):
        call(q_scale=base["q_scale"][:, :, :4])
    with pytest.raises(TypeError):
        call(q_scale=base["q_scale"].view(torch.uint8).to(torch.int32))
    with pytest.raises(ValueError):
        call(scale_layout="preordered_mma")  # public shapes given as preordered storage
    pre_q = _preorder(c["qs"].permute(1, 0, 2).contiguous()).view(f8).to(device)
    pre_k = _preorder(c["ks"].reshape(-1, 128, 8)).view(f8).to(device)
    call(scale_layout="preordered_mma", q_scale=pre_q, k_scale=pre_k)
    with pytest.raises(ValueError):  # wrong strides
        bad = torch.empty_strided((2, 1, 2, 32, 4, 4), (4096, 2048, 512, 16, 4, 1), dtype=f8, device=device)
        call(scale_layout="preordered_mma", q_scale=bad, k_scale=pre_k)
    with pytest.raises(TypeError):
        call(scale_layout="preordered_mma", q_scale=pre_q.view(torch.uint8).to(torch.int32), k_scale=pre_k)
    with pytest.raises(TypeError):
        call(cu_seqlens_q=base["cu_seqlens_q"].long())
    with pytest.raises(ValueError):
        call(cu_seqlens_k=torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError):
        call(kv_indices=None)
    with pytest.raises(ValueError):
        call(kv_indices=base["kv_indices"].long())
    with pytest.raises(ValueError, match="qo_offset is only valid when causal=True"):
        call(qo_offset=torch.zeros(1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError):
        call(causal=True, qo_offset=torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError):
        call(causal=True, qo_offset=torch.zeros(1, dtype=torch.int64, device=device))


@pytest.mark.gpu
def test_gpu_large_m3_shape(cuda_device):
    """M3-like index shapes: Hq 4 index heads, 1 key head, ragged prefill with causal masking."""
    for fmt in ("nvfp4", "mxfp4"):
        c = _make_case(fmt, Hq=4, Hkv=1, seq_q=[200, 1, 77], seq_k=[1500, 300, 77], pages=[12, 3, 1])
        out = _run(c, fmt, "preordered_mma", cuda_device, max_seqlen_k=1600, causal=True)
        _check(out, _reference(c, fmt, 1600, True))
        out2 = _run(c, fmt, "public", cuda_device, max_seqlen_k=1600, causal=True)
        _check(out2, _reference(c, fmt, 1600, True))



# ------------------------------------------------------------------------------------------------
# the tensor-core kernel's paths, through fp4_indexer._launch with explicit configurations
# ------------------------------------------------------------------------------------------------

def _cfg(rows=32, block_n=64, **kw):
    return fx.Fp4IndexerConfig(rows=rows, wide_rows=kw.pop("wide_rows", rows), block_n=block_n,
                               num_warps=kw.pop("num_warps", 4), num_stages=kw.pop("num_stages", 1), **kw)


def _inputs(c, fmt, layout):
    """(q, k, q_scale, k_scale, scale kind, preordered) as the public function hands them to the op."""
    P, Hkv = c["k"].shape[:2]
    if layout == "public":
        qs, ks = c["qs"], c["ks"]
    else:
        Gs = c["qs"].shape[-1]
        qs = _preorder(c["qs"].permute(1, 0, 2).contiguous())
        ks = _preorder(c["ks"].reshape(P * Hkv, 128, Gs))
    return c["q"], c["k"], qs, ks, (fx.SK_E8M0 if fmt == "mxfp4" else fx.SK_E4M3), layout != "public"


def _direct(c, fmt, layout, device, max_seqlen_k, causal=False, qo_offset=None, cfg=None, chunk=None,
            max_seqlen_q=None, cu_q=None):
    """``_launch`` into an output poisoned with NaN; returns (out, launch description)."""
    q, k, qs, ks, sk, pre = _inputs(c, fmt, layout)
    cu_q = c["cu_q"] if cu_q is None else cu_q
    if max_seqlen_q is None:
        max_seqlen_q = max([int(b) - int(a) for a, b in zip(cu_q[:-1], cu_q[1:])] + [0])
    NB = -(-max_seqlen_k // 128)
    out = torch.full((q.shape[1], NB, q.shape[0]), float("nan"), dtype=torch.float32, device=device)
    d = lambda t: None if t is None else t.to(device)  # noqa: E731
    desc = fx._launch(d(q), d(k), d(qs), d(ks), d(cu_q), d(c["cu_k"]), d(c["cu_p"]), d(c["kv_indices"]), d(qo_offset),
                      max_seqlen_q, NB, fx.FMT_MXFP4 if fmt == "mxfp4" else fx.FMT_NVFP4, sk, pre, causal, out,
                      cfg=cfg, chunk=chunk)
    assert not torch.isnan(out).any(), "output elements left unwritten"
    return out, desc


@pytest.mark.kernels_ci
@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_kv_chunk_split_boundaries(device, block_n, chunk):
    """KV blocks split across programs: every chunk size (1 block, uneven splits, one chunk >= NB) gives the
    same scores; NB (7) exceeds every request's blocks, so whole chunks are -inf without reading a page."""
    c = _make_case("nvfp4", Hq=4, Hkv=2, seq_q=[37, 5, 1], seq_k=[700, 129, 40], pages=[6, 2, 1])
    qo = torch.tensor([680, 3, 39], dtype=torch.int32)
    for causal, q_off in ((False, None), (True, None), (True, qo)):
        out, desc = _direct(c, "nvfp4", "preordered_mma", device, 800, causal=causal, qo_offset=q_off,
                            cfg=_cfg(block_n=block_n), chunk=chunk)
        assert desc["chunk"] == chunk and desc["n_chunks"] == -(-7 // chunk)
        _check(out, _reference(c, "nvfp4", 800, causal, qo_offset=q_off))


def test_kv_chunk_plan_default(device):
    """The planned split (no override) on a context long enough to split: several chunks per tile."""
    c = _make_case("nvfp4", Hq=2, Hkv=1, seq_q=[20], seq_k=[1100], pages=[9])
    out, desc = _direct(c, "nvfp4", "public", device, 1100, causal=True)
    assert desc["n_chunks"] > 1
    _check(out, _reference(c, "nvfp4", 1100, True))


@pytest.mark.parametrize("G,Hkv,rows", [(1, 2, 32), (3, 2, 32), (4, 1, 32), (4, 1, 64), (8, 1, 32), (2, 3, 16),
                                        (8, 2, 128), (4, 1, 256)])  # 256 rows x 128 slots: the sm_90 entry
def test_heads_sharing_a_page(device, G, Hkv, rows):
    """G Q heads per KV head folded into the MMA rows: head groups smaller than G (several programs per KV
    head), equal, and larger (G = 3 in a group of 4: one masked head)."""
    c = _make_case("nvfp4", Hq=G * Hkv, Hkv=Hkv, seq_q=[19, 2], seq_k=[300, 130], pages=[3, 2])
    cfg = _cfg(rows=rows, block_n=128)
    bm, bh = fx.tile_for(cfg, G, 19)
    out, desc = _direct(c, "nvfp4", "public", device, 384, causal=True, cfg=cfg, chunk=2)
    assert (desc["block_m"], desc["block_h"]) == (bm, bh) and bh == min(fx._next_pow2(G), rows // 16)
    _check(out, _reference(c, "nvfp4", 384, True))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("layout", ["public", "preordered_mma"])
def test_causal_qo_offset_odd_lengths(device, fmt, layout):
    """Odd lengths (1, 17, 33, 3 queries; 1, 127, 129, 255 keys) with qo_offset below, inside and beyond the
    context (the causal limit crosses blocks at different rows of one tile) and the default Lk - Lq."""
    c = _make_case(fmt, Hq=4, Hkv=1, seq_q=[1, 17, 33, 3], seq_k=[1, 127, 129, 255], pages=[1, 1, 2, 2])
    for qo in (None, torch.tensor([0, -5, 100, 400], dtype=torch.int32), torch.tensor([7, 120, -40, 130],
                                                                                      dtype=torch.int32)):
        out, _ = _direct(c, fmt, layout, device, 256, causal=True, qo_offset=qo, cfg=_cfg(block_n=64), chunk=1)
        _check(out, _reference(c, fmt, 256, True, qo_offset=qo))
        pub = _run(c, fmt, layout, device, 256, causal=True, qo_offset=qo)
        _check(pub, _reference(c, fmt, 256, True, qo_offset=qo))


def test_missing_and_bad_pages(device):
    """Pages missing (fewer pages than blocks), ids -1 / negative / >= total_pages, and a request whose page
    range runs past kv_indices: those blocks are -inf and never read (P = 4 pages)."""
    c = _make_case("nvfp4", Hq=2, Hkv=1, seq_q=[9, 4, 6], seq_k=[500, 384, 300], pages=[4, 3, 3], extra_pages=0)
    P = c["k"].shape[0]
    c["k"], c["ks"] = c["k"][:4].clone(), c["ks"][:4].clone()
    c["kv_indices"] = torch.tensor([2, -1, 3, P + 100, 0, -7, 4, 1], dtype=torch.int32)  # 4 == P: out of range
    c["cu_p"] = torch.tensor([0, 4, 7, 10], dtype=torch.int32)  # request 2: positions 7..9, only 7 exists
    for layout in ("public", "preordered_mma"):
        for causal in (False, True):
            out, _ = _direct(c, "nvfp4", layout, device, 512, causal=causal, cfg=_cfg(), chunk=2)
            ref = _reference(c, "nvfp4", 512, causal)
            assert torch.isneginf(ref[:, 1, :9]).all() and torch.isneginf(ref[:, 3, :9]).all()
            _check(out, ref)


def test_mxfp4_and_float_scales_direct(device):
    """mxfp4 (e8m0) and decoded float scales through the chunked kernel with several head groups."""
    c = _make_case("mxfp4", Hq=4, Hkv=1, seq_q=[21, 3], seq_k=[400, 90], pages=[4, 1])
    out, _ = _direct(c, "mxfp4", "preordered_mma", device, 512, causal=True, cfg=_cfg(block_n=128), chunk=3)
    _check(out, _reference(c, "mxfp4", 512, True))
    ref = _reference(c, "mxfp4", 512, False)
    _check(_run(c, "mxfp4", "public", device, 512, scale_dtype=torch.float32), ref)


def test_poisoned_output_every_element_written(device):
    """Output buffers pre-filled with NaN: rows before cu_q[0] / after cu_q[B], rows past max_seqlen_q of a
    request, empty requests and a non-monotone (non-overlapping) cu_seqlens_q all end up defined (-inf)."""
    c = _make_case("nvfp4", Hq=4, Hkv=1, seq_q=[0, 0, 0], seq_k=[200, 300, 150], pages=[2, 3, 2])
    total_q = 70
    c["q"] = torch.randint(0, 256, (total_q, 4, 64), dtype=torch.uint8)
    c["qs"] = (torch.randint(4, 11, (total_q, 4, 8)) << 3 | torch.randint(0, 8, (total_q, 4, 8))).to(torch.uint8)
    cases = [
        (torch.tensor([5, 30, 30, 52], dtype=torch.int32), None),  # rows 0..4 and 52..69 belong to no request
        (torch.tensor([0, 40, 45, 70], dtype=torch.int32), 17),  # max_seqlen_q below request 0's 40 tokens
        (torch.tensor([50, 60, 10, 30], dtype=torch.int32), None),  # request 1 runs backwards (empty)
    ]
    for cu_q, mq in cases:
        c["cu_q"] = cu_q
        for causal in (False, True):
            out, _ = _direct(c, "nvfp4", "preordered_mma", device, 300, causal=causal, cfg=_cfg(), chunk=2,
                             max_seqlen_q=mq)
            _check(out, _reference(c, "nvfp4", 300, causal, max_seqlen_q=mq))
    # the public op on a caching allocator full of NaN (CUDA; on CPU a fresh allocation)
    if device.type == "cuda":
        junk = torch.full((1 << 22,), float("nan"), device=device)
        del junk
    c["cu_q"] = cases[0][0]
    _check(_run(c, "nvfp4", "public", device, 300), _reference(c, "nvfp4", 300, False))


def test_no_pages_at_all(device):
    """total_pages = 0: every page id is out of range, nothing is read, every block -inf."""
    c = _make_case("nvfp4", Hq=2, Hkv=1, seq_q=[3], seq_k=[200], pages=[2], extra_pages=0)
    c["k"], c["ks"] = c["k"][:0], c["ks"][:0]
    out, _ = _direct(c, "nvfp4", "public", device, 256, cfg=_cfg())
    assert torch.isneginf(out).all()


def test_config_tables_plan_and_aot_cover_runtime():
    """Host-side tables (no kernel): tiles are powers of two within the configured rows, the chunk plan covers
    NB exactly, and ``aot_configs`` lists every tile the launch can choose on each arch, per operand class."""
    for major in (None, 9, 10, 12):
        for qmax, cfg in fx.config_table(major):
            assert cfg.block_n in (64, 128) and cfg.rows & (cfg.rows - 1) == 0 and cfg.wide_rows <= cfg.rows
        for G in (1, 2, 3, 4, 5, 8, 16, 48, 64):
            for T in (1, 7, 16, 17, 31, 64, 200, 256, 257, 511, 4096, 100000):
                cfg = fx.config_for(major, T)
                for wide in (False, True):
                    rows = cfg.wide_rows if wide else cfg.rows
                    bm, bh = fx.tile_for(cfg, G, T, wide)
                    assert bm >= 16 and bm & (bm - 1) == 0 and bh & (bh - 1) == 0 and bm * bh <= max(rows, 16)
                    assert bh <= fx._next_pow2(G) and (bm == 16 or bm // 2 < T or bm * bh == rows)
                    if major is not None:
                        assert (cfg, bm, bh) in fx.runtime_tiles(major, wide)
    for NB in (1, 2, 5, 256, 8192):
        for tiles in (1, 3, 64, 10000):
            for sms in (8, 132):
                chunk, n = fx.plan_chunks(fx.config_for(9, 512), tiles, NB, sms)
                assert chunk >= 1 and (n - 1) * chunk < NB <= n * chunk
    for arch in (90, 100, 120, 121):
        cfgs = fx.aot_configs(arch)
        got = {(c.args["BLOCK_M"], c.args["BLOCK_H"], c.args["BLOCK_N"], c.num_warps, c.num_stages,
                c.args["OP"] != fx.OP_F16) for c in cfgs}
        want = {(bm, bh, cfg.block_n, cfg.num_warps, cfg.num_stages, wide)
                for wide in (False, True) for cfg, bm, bh in fx.runtime_tiles(arch // 10, wide)}
        assert got == want, (arch, want - got)
        assert all(c.hot for c in cfgs)


# ------------------------------------------------------------------------------------------------
# GPU: M3 shapes, every table configuration, top-k identical to the float64 reference's
# ------------------------------------------------------------------------------------------------

def _topk_agrees(out, ref, k=16, rel=1e-4):
    """Top-k block sets equal per (head, query) row, except rows whose k-th / (k+1)-th reference scores tie."""
    o = out.permute(0, 2, 1).reshape(-1, out.shape[1]).double()
    r = ref.permute(0, 2, 1).reshape(-1, ref.shape[1]).double()
    k = min(k, r.shape[1] - 1)
    ro = torch.sort(r, dim=1, descending=True).values
    gap = (ro[:, k - 1] - ro[:, k]).abs() > rel * ro[:, k - 1].abs().clamp_min(1.0)
    so = torch.sort(torch.topk(o, k, dim=1).indices, dim=1).values
    sr = torch.sort(torch.topk(r, k, dim=1).indices, dim=1).values
    same = (so == sr).all(dim=1)
    assert bool((same | ~gap).all()), f"{int((~same & gap).sum())} rows select different blocks"
    return int(gap.sum())


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_gpu_m3_chunk_32k_every_config(cuda_device, fmt):
    """The demo's shape: a causal 256-token chunk at the end of a 32K context (Hq 4, Hkv 1), preordered scales:
    scores within tolerance and the top-16 selection identical, with the table's configuration and with every
    configuration of every arch's table that this GPU can run (same kernel, other tiles)."""
    c = _make_case(fmt, Hq=4, Hkv=1, seq_q=[256], seq_k=[32768], pages=[256])
    ref = _reference(c, fmt, 32768, True, device=cuda_device)
    out = _run(c, fmt, "preordered_mma", cuda_device, 32768, causal=True)
    _check(out, ref)
    assert _topk_agrees(out.cpu(), ref) > 0
    cfgs = {cfg for major in (9, 10, 12) for _, cfg in fx.config_table(major)}
    for cfg in cfgs:
        o, _ = _direct(c, fmt, "preordered_mma", cuda_device, 32768, causal=True, cfg=cfg)
        _check(o, ref)
        _topk_agrees(o.cpu(), ref)


@pytest.mark.gpu
def test_gpu_ragged_batch_chunks_and_bad_pages(cuda_device):
    """Ragged batch with a long request, many KV chunks per tile, G = 8 (two head groups at 128 rows), missing
    and out-of-range pages, qo_offset, NaN-poisoned output."""
    c = _make_case("nvfp4", Hq=16, Hkv=2, seq_q=[300, 1, 77, 0, 513], seq_k=[5000, 300, 77, 10, 2000],
                   pages=[40, 3, 1, 1, 16])
    c["kv_indices"][5] = -1
    c["kv_indices"][45] = c["k"].shape[0] + 3
    qo = torch.tensor([4700, 299, 0, 3, 1487], dtype=torch.int32)
    ref = _reference(c, "nvfp4", 5120, True, qo_offset=qo, device=cuda_device)
    for layout in ("public", "preordered_mma"):
        out, _ = _direct(c, "nvfp4", layout, cuda_device, 5120, causal=True, qo_offset=qo)
        _check(out, ref)
    for cfg in {cfg for major in (9, 10, 12) for _, cfg in fx.config_table(major)}:
        out, _ = _direct(c, "nvfp4", "preordered_mma", cuda_device, 5120, causal=True, qo_offset=qo, cfg=cfg)
        _check(out, ref)
