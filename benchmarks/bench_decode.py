"""Sparse decode roofline (GPU only): M3 shape, Hq 64, Hkv 4, D 128, top-16 of 128-token blocks, bf16.

``run(msa, timing) -> list[dict]``. For B in {1, 8, 64, 256} and context {4K, 32K, 128K}:

* ``official``: ``sparse_decode_atten_func`` on a paged HND cache (eager and CUDA-graph replay);
* ``wrapper``: ``SparseDecodePagedAttentionWrapper.run(out=...)`` (graph replay; one launch);
* ``direct``: ``flash_decode_with_gqa_share_sparse`` on the token-major NHD cache (graph replay);
* ``torch``: gather the selected pages + SDPA (graph replay), the naive baseline;
* FP8 (e4m3) KV at B = 64 (target <= 0.6x the bf16 time);
* NVFP4 KV (packed E2M1 + 128x4 E4M3 scales + global scales, dequantised inside the decode kernel)
  next to bf16 and fp8 at B = 1 / 8 / 64 (32K): time ratio vs bf16 (target <= 0.4x at B = 64) and
  bytes (packed + scales) against the copy-bandwidth roofline; both NVFP4 nibble decoders (PTX / portable);
* a split-policy sweep at B = 1 / 8 (32K), showing the chosen ``num_splits`` per variant.

Environment: ``MSA_DECODE_BENCH=nvfp4`` runs only the NVFP4 comparison (and its sweep);
``MSA_DECODE_SWEEP=nvfp4`` sweeps NVFP4 launch configs (``msa.tuning.override(decode_nvfp4=...)`` candidates
for ``NVFP4_CONFIG_OVERRIDES``) at B = 1 / 8 / 64 instead of the bf16 split-policy sweep
(``msa.tuning.override(decode=...)``); ``MSA_DECODE_SWEEP=none`` skips sweeps.

Input sets share one big KV pool (several GB) but use different random page tables / block ids, so
the rotation touches far more than the 50 MB L2 (``timing.num_sets``). Bandwidth counts K+V bytes
of the selected blocks plus q and o; ``%copy`` relates it to the measured copy bandwidth.
"""

import importlib
import os

import torch
import torch.nn.functional as F

HQ, HKV, D, BS, TOPK = 64, 4, 128, 128, 16
POOL_PAGES = 12288  # 12288 pages x 4 heads x 128 x 128 x 2 B = 1.5 GiB per K (or V) in bf16


def _make_sets(b, ctx, n_sets, dev):
    """Per set: q [B, 64, 128], page_table [B, maxp], seqused_k [B], q2k [4, B, 16] (distinct ids, local last)."""
    maxp = -(-ctx // BS)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(b, HQ, D, dtype=torch.bfloat16, device=dev)
        pt = torch.randint(0, POOL_PAGES, (b, maxp), dtype=torch.int32, device=dev)
        sk = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        nb = maxp
        r = torch.rand(HKV, b, nb - 1, device=dev).argsort(-1)[..., : TOPK - 1] if nb > 1 else \
            torch.empty(HKV, b, 0, dtype=torch.long, device=dev)
        local = torch.full((HKV, b, 1), nb - 1, dtype=torch.long, device=dev)
        idx = torch.cat([r, local], -1)
        if idx.shape[-1] < TOPK:
            idx = torch.cat([idx, torch.full((HKV, b, TOPK - idx.shape[-1]), -1, device=dev, dtype=torch.long)], -1)
        sets.append((q, pt, sk, idx.to(torch.int32).contiguous()))
    return sets


def _torch_naive(q, k, v, pt, sk, idx):
    """Gather the selected pages per (request, KV head), mask by length, SDPA (GQA)."""
    b = q.shape[0]
    valid = idx >= 0
    ids = idx.clamp(min=0).long()  # [Hkv, B, K]
    pages = torch.gather(pt.long().unsqueeze(0).expand(HKV, -1, -1), 2, ids)  # [Hkv, B, K]
    heads = torch.arange(HKV, device=q.device).view(HKV, 1, 1).expand_as(pages)
    ks = k[pages, heads]  # [Hkv, B, K, 128, D]
    vs = v[pages, heads]
    ks = ks.permute(1, 0, 2, 3, 4).reshape(b, HKV, TOPK * BS, D)
    vs = vs.permute(1, 0, 2, 3, 4).reshape(b, HKV, TOPK * BS, D)
    x = ids.permute(1, 0, 2).unsqueeze(-1) * BS + torch.arange(BS, device=q.device)  # [B, Hkv, K, 128]
    ok = (x < sk.view(b, 1, 1, 1)) & valid.permute(1, 0, 2).unsqueeze(-1)
    mask = ok.reshape(b, HKV, 1, TOPK * BS).repeat_interleave(HQ // HKV, 1)
    return F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=mask, enable_gqa=True).squeeze(2)


def _bytes(b, kv_elem):
    return b * HKV * TOPK * BS * D * 2 * kv_elem + 2 * b * HQ * D * 2


def _bytes_nvfp4(b):
    """Selected K+V bytes of NVFP4: D/2 packed bytes + D/16 scale bytes per row, plus q and o (bf16)."""
    return b * HKV * TOPK * BS * (D // 2 + D // 16) * 2 + 2 * b * HQ * D * 2


def _official(msa, k, v, ctx):
    """``fn(q, pt, sk, idx)``: ``sparse_decode_atten_func`` (one token per request) on the paged caches k / v."""
    return lambda q, pt, sk, idx: msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1,
                                                               max_seqlen_k=ctx)


def _wrapper_sets(msa, sets, ctx):
    """Input sets for ``w.run``: per set of ``_make_sets``, a wrapper planned on its metadata, q, an output."""
    wsets = []
    for (q, pt, sk, idx) in sets:
        w = msa.SparseDecodePagedAttentionWrapper().plan(
            page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=ctx, q2k_indices=idx,
            num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D)
        wsets.append((w, q, torch.empty_like(q)))
    return wsets


def _plan(dk, dev, b, **kw):
    """The decode launch plan for ``b`` one-token requests of the M3 shape (``kw``: e.g. ``nvfp4=True``)."""
    return dk.make_plan(dev, B=b, Hkv=HKV, G=HQ // HKV, SQ=1, D=D, BS=BS, topk=TOPK, hint_blocks=0, **kw)


def _roofline(nbytes, us, copy_bw):
    """Row columns relating ``nbytes`` moved in ``us`` to the copy bandwidth: MB, roofline us, %copy."""
    return {"MB": nbytes / 1e6, "roofline us": nbytes / copy_bw * 1e6, "%copy": 100 * nbytes / (us * 1e-6) / copy_bw}


def run_nvfp4(msa, timing, dk, k_hnd, v_hnd, copy_bw, quick):
    """NVFP4 KV vs bf16 / fp8 KV (graph replay, 32K): rows, ratios, bytes vs the copy roofline, decoders, sweep."""
    dev = k_hnd.device
    qk, qv = msa.quantize_kv_bf16_to_nvfp4_128x4(k_hnd, v_hnd)
    k8, v8 = k_hnd.to(torch.float8_e4m3fn), v_hnd.to(torch.float8_e4m3fn)
    ctx = 32768
    rows = []

    def fp4_call(q, pt, sk, idx):
        return msa.sparse_decode_atten_func(q, qk.data, qv.data, idx, page_table=pt, seqused_k=sk, seqlen_q=1,
                                            max_seqlen_k=ctx, k_scale_128x4=qk.scale_128x4,
                                            v_scale_128x4=qv.scale_128x4, k_global_scale=qk.global_scale,
                                            v_global_scale=qv.global_scale)

    for b in ((64,) if quick else (1, 8, 64)):
        sets = _make_sets(b, ctx, timing.num_sets(_bytes_nvfp4(b)), dev)
        us = {}
        for name, (k, v, nbytes) in (("bf16", (k_hnd, v_hnd, _bytes(b, 2))), ("fp8 e4m3", (k8, v8, _bytes(b, 1)))):
            us[name] = timing.bench_graph(_official(msa, k, v, ctx), sets)
            rows.append({"B": b, "KV": name, "us graph": us[name], **_roofline(nbytes, us[name], copy_bw),
                         "x bf16": us[name] / us["bf16"]})
        p = _plan(dk, dev, b, nvfp4=True)

        def fp4_row(kv, t):
            rows.append({"B": b, "KV": kv, "us graph": t, **_roofline(_bytes_nvfp4(b), t, copy_bw),
                         "x bf16": t / us["bf16"], "x fp8": t / us["fp8 e4m3"], "splits": p.num_splits})

        decs = ("1", "0") if b == 64 else ("1",)
        for d in decs:
            with msa.tuning.override(decode_fp4_decoder=int(d)):
                t = timing.bench_graph(fp4_call, sets)
            fp4_row(f"nvfp4 dec{d}" + (" (ptx)" if d == "1" else " (portable)"), t)
            print("row nvfp4", b, d, f"{t:.2f} us ({t / us['bf16']:.3f}x bf16)", flush=True)
        if b == 64:  # the wrapper (plan once, one launch per run, no per-call memset), default decoder
            wsets = _wrapper_sets(msa, sets, ctx)
            fp4_row("nvfp4 wrapper", timing.bench_graph(lambda w, q, o: w.run(q, qk, qv, out=o), wsets))
            del wsets
        del sets
    timing.print_table(rows, ["B", "KV", "splits", "us graph", "MB", "roofline us", "%copy", "x bf16", "x fp8"],
                       title="NVFP4 KV vs bf16 / fp8 KV, 32K, graph replay (target at B = 64: x bf16 <= 0.4); "
                             "MB = selected K+V (+ q, o) bytes, roofline = MB / copy BW")

    # NVFP4 launch-config sweep (NVFP4_CONFIG_OVERRIDES candidates x decoder)
    sweep = []
    if os.environ.get("MSA_DECODE_SWEEP", "") == "nvfp4":
        # variants change fields of this device's NVFP4 entry (tuning.override(decode_nvfp4=...)); each sets warps,
        # BLOCK_N and stages, the entry's m_cap cap (needed to compile on sm_10x / sm_12x) is kept. "default" = the
        # shipped table.
        w4, w8 = {64: 4, 128: 4, 256: 8}, {64: 4, 128: 8, 256: 8}
        bn128 = {64: 64, 128: 128, 256: 32}
        # (variant, packed-byte access mode decode_fp4_prefetch: 0 bytes / 1 int32 words / 2 words + register
        # prefetch of the next tile). The earlier sweep's losers (8 warps at BLOCK_N 64, ctas_per_sm 4 / 8) are
        # dropped; "pf" variants are the ones to compare against "default pf0".
        bn64 = {64: 64, 128: 64, 256: 32}
        c4 = dict(num_warps=w4, block_n=bn128, num_stages=2)  # the sm_90 default since the first sweep
        variants = [(None, "0"), (None, "1"), (None, "2"),
                    (dict(c4, num_stages=1), "0"), (dict(c4, num_stages=1), "2"), (dict(c4, num_stages=3), "2"),
                    (dict(c4, ctas_per_sm=2), "0"), (dict(c4, ctas_per_sm=2), "2"),
                    (dict(num_warps=w8, block_n=bn128, num_stages=2), "2"),
                    (dict(num_warps=w4, block_n=bn64, num_stages=3), "0"),
                    (dict(num_warps=w4, block_n=bn64, num_stages=3), "2"),
                    (dict(num_warps=w8, block_n=bn64, num_stages=3), "0")]
        for b in (1, 8, 64):
            sets = _make_sets(b, ctx, timing.num_sets(_bytes_nvfp4(b)), dev)
            for var, pf in variants:
                for d in ("1", "0") if (var is None and pf == "0") else ("1",):
                    try:
                        with msa.tuning.override(decode_nvfp4=var, decode_fp4_decoder=int(d),
                                                 decode_fp4_prefetch=int(pf)):
                            p = _plan(dk, dev, b, nvfp4=True)
                            t = timing.bench_graph(fp4_call, sets)
                        r = {"B": b, "variant": ("default" if var is None else str(var)) + f" dec{d} pf{pf}",
                             "splits": p.num_splits, "warps": p.num_warps, "stages": p.num_stages, "us graph": t,
                             "%copy": 100 * _bytes_nvfp4(b) / (t * 1e-6) / copy_bw}
                        sweep.append(r)
                        print("sweep nvfp4", {k2: (round(v2, 2) if isinstance(v2, float) else v2)
                                              for k2, v2 in r.items()}, flush=True)
                    except Exception as e:  # a variant that does not compile / fit must not hide the others
                        print("sweep nvfp4", b, var, d, pf, "FAILED", type(e).__name__, str(e)[:200], flush=True)
            del sets
        timing.print_table(sweep, ["B", "variant", "splits", "warps", "stages", "us graph", "%copy"],
                           title="NVFP4 launch-config sweep (32K, graph replay; set the winner in "
                                 "decode_kernel.NVFP4_CONFIG_OVERRIDES / FP4_DEC_GPU_DEFAULT / FP4_PF_GPU_DEFAULT)")
    del qk, qv, k8, v8
    torch.cuda.empty_cache()
    return rows + sweep


def run(msa, timing):
    dev = torch.device("cuda")
    dk = importlib.import_module(msa.__name__ + ".decode_kernel")
    copy_bw = getattr(timing, "COPY_BW", None) or timing.measure_copy_bandwidth()
    quick = getattr(timing, "QUICK", False)
    # token-major NHD pools; the official API reads their permuted HND view in place, plus a contiguous HND pool
    kc = torch.randn(POOL_PAGES * BS, HKV, D, dtype=torch.bfloat16, device=dev)
    vc = torch.randn(POOL_PAGES * BS, HKV, D, dtype=torch.bfloat16, device=dev)
    k_view = kc.view(POOL_PAGES, BS, HKV, D).permute(0, 2, 1, 3)
    v_view = vc.view(POOL_PAGES, BS, HKV, D).permute(0, 2, 1, 3)
    k_hnd = k_view.contiguous()
    v_hnd = v_view.contiguous()
    rows = []
    if os.environ.get("MSA_DECODE_BENCH", "") == "nvfp4":
        del kc, vc, k_view, v_view
        return run_nvfp4(msa, timing, dk, k_hnd, v_hnd, copy_bw, quick)

    def row(kind, b, ctx, us, eager=None, kv_elem=2, **extra):
        nbytes = _bytes(b, kv_elem)
        r = {"path": kind, "B": b, "ctx": ctx, "us graph": us, "us eager": eager, "GB/s": nbytes / us / 1e3,
             "%copy": 100 * nbytes / (us * 1e-6) / copy_bw}
        r.update(extra)
        rows.append(r)
        print("row", kind, b, ctx, f"{us:.2f} us", extra, flush=True)
        return r

    batches = (1, 8, 64) if quick else (1, 8, 64, 256)
    ctxs = (32768,) if quick else (4096, 32768, 131072)
    for b in batches:
        n_sets = timing.num_sets(_bytes(b, 2))
        for ctx in ctxs:
            sets = _make_sets(b, ctx, n_sets, dev)

            official = _official(msa, k_hnd, v_hnd, ctx)
            us_g = timing.bench_graph(official, sets)
            us_e = None if quick else timing.bench_events(official, sets)
            p = _plan(dk, dev, b)
            row("official HND", b, ctx, us_g, us_e, splits=p.num_splits)
            if ctx == 32768 and not quick:
                row("official NHD-view", b, ctx, timing.bench_graph(_official(msa, k_view, v_view, ctx), sets),
                    splits=p.num_splits)
            if ctx == 32768:
                wsets = _wrapper_sets(msa, sets, ctx)
                row("wrapper", b, ctx, timing.bench_graph(lambda w, q, o: w.run(q, k_hnd, v_hnd, out=o), wsets),
                    None if quick else timing.bench_events(lambda w, q, o: w.run(q, k_hnd, v_hnd, out=o), wsets),
                    splits=p.num_splits)
                dsets = []
                for (q, pt, sk, idx) in sets:
                    x = torch.arange(pt.shape[1] * BS, device=dev)
                    r2t = (pt.long()[:, x // BS] * BS + x % BS).to(torch.int32)
                    dsets.append((q, r2t, sk, torch.arange(b, device=dev, dtype=torch.int32), idx))
                row("direct token-major", b, ctx, timing.bench_graph(
                    lambda q, r2t, sk, sid, idx: msa.flash_decode_with_gqa_share_sparse(
                        q, None, kc, vc, r2t, sk, sid, BS, idx), dsets), splits=p.num_splits)
                del dsets, wsets
                if b <= 64 and not quick:
                    row("torch gather+SDPA", b, ctx, timing.bench_graph(
                        lambda q, pt, sk, idx: _torch_naive(q, k_hnd, v_hnd, pt, sk, idx), sets))
            del sets
    timing.print_table(rows, ["path", "B", "ctx", "splits", "us graph", "us eager", "GB/s", "%copy"],
                       title=f"Sparse decode, M3 shape ({timing.device_name()}, copy {copy_bw / 1e9:.0f} GB/s)")

    # FP8 KV at B = 64 (32K): target <= 0.6x the bf16 time
    fp8_rows = []
    k8 = k_hnd.to(torch.float8_e4m3fn)
    v8 = v_hnd.to(torch.float8_e4m3fn)
    b, ctx = 64, 32768
    sets = _make_sets(b, ctx, timing.num_sets(_bytes(b, 1)), dev)
    us = {}
    for name, (k, v) in (("bf16", (k_hnd, v_hnd)), ("fp8 e4m3", (k8, v8))):
        us[name] = timing.bench_graph(_official(msa, k, v, ctx), sets)
        r = row(f"official {name} KV", b, ctx, us[name], kv_elem=2 if name == "bf16" else 1)
        fp8_rows.append(r)
    fp8_rows[-1]["fp8/bf16"] = us["fp8 e4m3"] / us["bf16"]
    timing.print_table(fp8_rows, ["path", "B", "ctx", "us graph", "GB/s", "%copy", "fp8/bf16"],
                       title="FP8 KV vs bf16 KV (target fp8/bf16 <= 0.6)")
    del k8, v8, sets

    # NVFP4 KV next to bf16 / fp8 (B = 1 / 8 / 64)
    rows += run_nvfp4(msa, timing, dk, k_hnd, v_hnd, copy_bw, quick)

    # split-policy / tile sweep (32K): which configuration wins on this card. Rows are printed as
    # they are measured. MSA_DECODE_SWEEP=wide adds tile-size / pipelining variants and B = 64.
    sweep = []
    wide = os.environ.get("MSA_DECODE_SWEEP", "") == "wide"
    variants = [dict(), dict(combine_budget=64 * 1024), dict(combine_budget=256 * 1024), dict(min_tiles_split=2),
                dict(min_tiles_split=4), dict(ctas_per_sm=1)]
    if wide:
        variants += [dict(num_stages=2), dict(num_stages=4), dict(num_warps={128: 8}),
                     dict(block_n={128: 128}, num_stages=2), dict(block_n={128: 128}, num_stages=3),
                     dict(block_n={128: 128}, num_stages=2, combine_budget=256 * 1024),
                     dict(block_n={128: 128}, num_stages=2, num_warps={128: 8})]
    elif not quick:
        variants += [dict(num_stages=2), dict(num_warps={128: 8}), dict(block_n={128: 128}, num_stages=2)]
    sweep_b = (1, 8, 64) if wide else ((1, 8) if not quick else (1,))
    if os.environ.get("MSA_DECODE_SWEEP", "") in ("none", "nvfp4"):
        sweep_b = ()
    for b in sweep_b:
        sets = _make_sets(b, 32768, timing.num_sets(_bytes(b, 2)), dev)
        for var in variants:
            if b == 64 and ("combine_budget" in var):
                continue
            try:
                with msa.tuning.override(decode=var or None):  # {} = the table's entry
                    p = _plan(dk, dev, b)
                    us_g = timing.bench_graph(_official(msa, k_hnd, v_hnd, 32768), sets)
                    r = {"B": b, "variant": str(var) if var else "default", "splits": p.num_splits,
                         "tiles/split": p.tiles_per_split, "us graph": us_g,
                         "%copy": 100 * _bytes(b, 2) / (us_g * 1e-6) / copy_bw}
                    if wide and b == 64:
                        k8 = k_hnd[:4096].to(torch.float8_e4m3fn)
                        v8 = v_hnd[:4096].to(torch.float8_e4m3fn)
                        sets8 = [(q, pt % 4096, sk, idx) for (q, pt, sk, idx) in sets]
                        r["us fp8"] = timing.bench_graph(_official(msa, k8, v8, 32768), sets8)
                        del k8, v8, sets8
                sweep.append(r)
                print("sweep", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            except Exception as e:  # a variant that does not compile / fit must not hide the others
                print("sweep", b, var, "FAILED", type(e).__name__, str(e)[:200], flush=True)
        del sets
    timing.print_table(sweep, ["B", "variant", "splits", "tiles/split", "us graph", "us fp8", "%copy"],
                       title="Split-policy sweep (official API, 32K, graph replay)")
    del kc, vc, k_hnd, v_hnd
    torch.cuda.empty_cache()
    return rows + sweep
