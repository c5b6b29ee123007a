"""FP4 indexer block scores (API.md §5.14, §11.4) against a float64 reference."""

import importlib
import math

import pytest
import torch

from .helpers import msa

ix = importlib.import_module(msa.__name__ + ".indexer")
fp4_indexer_block_scores = getattr(msa, "fp4_indexer_block_scores", None) or ix.fp4_indexer_block_scores

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


def _reference(c, fmt, max_seqlen_k, causal, qo_offset=None):
    q, k, gs = c["q"], c["k"], c["gs"]
    total_q, Hq, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    NB = -(-max_seqlen_k // 128)
    qd = _deq(q, _scale_vals(c["qs"], fmt), gs)  # [total_q, Hq, 128]
    kd = _deq(k, _scale_vals(c["ks"], fmt), gs)  # [P, Hkv, 128, 128]
    out = torch.full((Hq, NB, total_q), -math.inf, dtype=torch.float64)
    cu_q, cu_k, cu_p = c["cu_q"].tolist(), c["cu_k"].tolist(), c["cu_p"].tolist()
    for b in range(c["B"]):
        Lq, Lk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        npg = cu_p[b + 1] - cu_p[b]
        off = int(qo_offset[b]) if qo_offset is not None else Lk - Lq
        for j in range(min(NB, -(-Lk // 128), npg)):
            page = int(c["kv_indices"][cu_p[b] + j])
            for h in range(Hq):
                kk = kd[page, h // G]  # [128 slots, 128]
                s = qd[cu_q[b]:cu_q[b + 1], h] @ kk.T  # [Lq, 128]
                x = 128 * j + torch.arange(128)
                vis = (x < Lk).view(1, -1).expand(Lq, -1)
                if causal:
                    vis = vis & (x.view(1, -1) <= torch.arange(Lq).view(-1, 1) + off)
                s = torch.where(vis, s, torch.tensor(-math.inf, dtype=torch.float64))
                if Lq:
                    out[h, j, cu_q[b]:cu_q[b + 1]] = s.max(dim=1).values
    return out.float()


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
            c["cu_k"].to(device), c["cu_p"].to(device), c["kv_indices"].to(device), None, 3, 256, ix.FMT_NVFP4,
            ix.SK_E4M3, False, False)
    torch.library.opcheck(ix._fp4_indexer_op, args)
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


def test_decode_indexer_errors(device):
    q = torch.randn(2, 4, 64, dtype=torch.float16, device=device)
    kc = torch.randn(32, 2, 64, dtype=torch.float16, device=device)
    r2t = torch.zeros(2, 32, dtype=torch.int32, device=device)
    sl = torch.tensor([5, 9], dtype=torch.int32, device=device)
    si = torch.tensor([0, 1], dtype=torch.int32, device=device)
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
