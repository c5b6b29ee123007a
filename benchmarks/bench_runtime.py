"""A serving runtime's decode path (GPU only): direct token-major decode, small-batch latency, eager host
overhead and the decode indexer, M3 shapes.

``run(msa, timing) -> list[dict]``: tables 1, 3 and 4; ``run_latency`` (section ``latency``): table 2.

1. **direct vs paged**: ``sparse_decode_atten_func`` on a paged HND pool, the same kernel on the token-major
   pool's HND view (``NHD-view``), and ``flash_decode_with_gqa_share_sparse`` on the token-major pool through
   ``req_to_token`` (same selection), B in {1, 8, 64, 128}, 32K, bf16 and fp8 e4m3 caches, graph replay.
   ``x paged`` = time / paged time (target <= 1.1).
2. **small-batch latency** (B = 1 / 8, 32K, graph replay): the default launch next to split-policy and tile
   variants, and a read-only Triton kernel that loads the same K/V bytes (the floor a one-launch decode can reach).
3. **eager host overhead** (B = 1): wall time per call over 200 back-to-back calls with one synchronize at the
   end, for the five entry points a runtime calls per layer.
4. **decode indexer** (``flash_decode_with_topk_idx``, 4 index-Q heads, one index-K head, D 128,
   ``disable_index_value=True``, init 1 / local 2): B = 1 at 32K and B = 32 at 128K, graph and eager, with
   the bytes read (keys + ``req_to_token``) against the measured copy bandwidth.

Cold inputs: K/V pools of 6144 pages (1.6 GB per pool in bf16), fresh random page tables / ids per input set,
enough sets to exceed 3x the L2 (``timing.num_sets``).
"""

import importlib
import time

import torch
import triton
import triton.language as tl

HQ, HKV, D, BS, TOPK = 64, 4, 128, 128, 16
POOL_PAGES = 6144
CTX = 32768


def _sets(b, n_sets, dev, ctx=CTX):
    maxp = ctx // BS
    out = []
    for _ in range(n_sets):
        q = torch.randn(b, HQ, D, dtype=torch.bfloat16, device=dev)
        pt = torch.stack([torch.randperm(POOL_PAGES, device=dev)[:maxp] for _ in range(b)]).to(torch.int32)
        sk = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        r = torch.rand(HKV, b, maxp - 1, device=dev).argsort(-1)[..., : TOPK - 1]
        idx = torch.cat([r, torch.full((HKV, b, 1), maxp - 1, device=dev)], -1).to(torch.int32).contiguous()
        x = torch.arange(maxp * BS, device=dev)
        r2t = (pt.long()[:, x // BS] * BS + x % BS).to(torch.int32)
        out.append((q, pt, sk, idx, r2t, torch.arange(b, device=dev, dtype=torch.int32)))
    return out


def _bytes(b, kv_elem):
    return b * HKV * TOPK * BS * D * 2 * kv_elem + 2 * b * HQ * D * 2


@triton.jit
def _read_only_kernel(K, V, PT, IDX, OUT, B, TOPK_C: tl.constexpr, BS_C: tl.constexpr, D_C: tl.constexpr,
                      HKV_C: tl.constexpr, MAXP: tl.constexpr, CH: tl.constexpr):
    """Sum of the selected K/V pages (one program per (b, g, chunk of CH blocks)): a decode's bytes, no math."""
    pid = tl.program_id(0)
    nch: tl.constexpr = TOPK_C // CH
    c = pid % nch
    bg = pid // nch
    g = bg % HKV_C
    b = bg // HKV_C
    rows = tl.arange(0, BS_C)
    cols = tl.arange(0, D_C)
    acc = tl.zeros([BS_C, D_C], tl.float32)
    for i in range(CH):
        j = tl.load(IDX + (g * B + b).to(tl.int64) * TOPK_C + c * CH + i)
        page = tl.load(PT + b.to(tl.int64) * MAXP + j).to(tl.int64)
        off = ((page * HKV_C + g) * BS_C + rows[:, None]) * D_C + cols[None, :]
        acc += tl.load(K + off).to(tl.float32) + tl.load(V + off).to(tl.float32)
    tl.store(OUT + pid * D_C + cols, tl.sum(acc, 0))


def _table_direct(msa, timing, k_hnd, v_hnd, kc, vc, copy_bw, dk, kv_names=("bf16", "fp8")):
    dev = k_hnd.device
    k_view = kc.view(POOL_PAGES, BS, HKV, D).permute(0, 2, 1, 3)
    v_view = vc.view(POOL_PAGES, BS, HKV, D).permute(0, 2, 1, 3)
    rows = []
    for kv_name in kv_names:
        if kv_name == "fp8":
            kh, vh = k_hnd.to(torch.float8_e4m3fn), v_hnd.to(torch.float8_e4m3fn)
            kt, vt = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
            kvv, vvv = kt.view(POOL_PAGES, BS, HKV, D).permute(0, 2, 1, 3), vt.view(POOL_PAGES, BS, HKV, D).permute(0, 2, 1, 3)
            elem = 1
        else:
            kh, vh, kt, vt, kvv, vvv, elem = k_hnd, v_hnd, kc, vc, k_view, v_view, 2
        for b in (1, 8, 64, 128):
            sets = _sets(b, timing.num_sets(_bytes(b, elem)), dev)

            def paged(q, pt, sk, idx, r2t, sid, k=kh, v=vh):
                return msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1,
                                                    max_seqlen_k=CTX)

            def view(q, pt, sk, idx, r2t, sid):
                return paged(q, pt, sk, idx, r2t, sid, k=kvv, v=vvv)

            def direct(q, pt, sk, idx, r2t, sid):
                return msa.flash_decode_with_gqa_share_sparse(q, None, kt, vt, r2t, sk, sid, BS, idx)

            t_paged = timing.bench_graph(paged, sets)
            res = {"paged HND": t_paged, "paged NHD-view": timing.bench_graph(view, sets)}
            res["direct token-major"] = timing.bench_graph(direct, sets)
            nbytes = _bytes(b, elem)
            for name, us in res.items():
                rows.append({"path": name, "KV": kv_name, "B": b, "us graph": us, "x paged": us / t_paged,
                             "%copy": 100 * nbytes / (us * 1e-6) / copy_bw})
                print("row", name, kv_name, b, f"{us:.2f}", flush=True)
            del sets
    timing.print_table(rows, ["path", "KV", "B", "us graph", "x paged", "%copy"],
                       title=f"Direct token-major vs paged decode, 32K, top-16 ({timing.device_name()})")
    return rows


def _table_latency(msa, timing, k_hnd, v_hnd, copy_bw, dk):
    dev = k_hnd.device
    rows = []
    # decode-table changes (tuning.override(decode=...)) of this device's entry
    variants = [dict(), dict(combine_budget=256 * 1024), dict(combine_budget=64 * 1024),
                dict(block_n={128: 32}, combine_budget=512 * 1024)]
    for b in (1,):
        sets = _sets(b, timing.num_sets(_bytes(b, 2)), dev)
        for var in variants:
            with msa.tuning.override(decode=var or None):
                p = dk.make_plan(dev, B=b, Hkv=HKV, G=HQ // HKV, SQ=1, D=D, BS=BS, topk=TOPK, hint_blocks=0)
                us = timing.bench_graph(lambda q, pt, sk, idx, r2t, sid: msa.sparse_decode_atten_func(
                    q, k_hnd, v_hnd, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=CTX), sets)
            var_s = ", ".join(f"{k}={v[128] if isinstance(v, dict) else v}" for k, v in var.items()) or "default"
            rows.append({"B": b, "variant": var_s, "splits": p.num_splits, "BLOCK_N": p.BLOCK_N, "us graph": us,
                         "%copy": 100 * _bytes(b, 2) / (us * 1e-6) / copy_bw})
            print("lat", b, var_s, f"{us:.2f}", flush=True)
        for ch in (1, 2, 4):
            o = torch.empty(b * HKV * (TOPK // ch), D, device=dev, dtype=torch.float32)
            us = timing.bench_graph(lambda q, pt, sk, idx, r2t, sid: _read_only_kernel[(b * HKV * (TOPK // ch),)](
                k_hnd, v_hnd, pt, idx, o, b, TOPK, BS, D, HKV, CTX // BS, ch, num_warps=8), sets)
            rows.append({"B": b, "variant": f"read-only kernel, {ch} block(s)/program", "splits": TOPK // ch,
                         "us graph": us, "%copy": 100 * _bytes(b, 2) / (us * 1e-6) / copy_bw})
        del sets
    timing.print_table(rows, ["B", "variant", "splits", "BLOCK_N", "us graph", "%copy"],
                       title="Small-batch decode latency, 32K, top-16 (graph replay)")
    return rows


def _spin_gpu(ms=300.0):
    """Keep the GPU busy for ``ms`` so its clocks leave the idle state before an eager timing loop."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t_end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < t_end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def _wall_loop(fn, args, n=200, parts=False):
    """Median over 5 loops of ``n`` back-to-back eager calls with one synchronize: wall us per call. With
    ``parts`` also, from 5 loops issued while the GPU sleeps (``torch.cuda._sleep`` longer than the issue time):
    the host us per call (pure host cost: the GPU cannot stall the issue) and the GPU us per call between events
    around the queued calls (pure GPU time of back-to-back eager launches)."""
    _spin_gpu()
    for _ in range(10):
        fn(*args)
    torch.cuda.synchronize()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e6 / n)
    if not parts:
        return med(walls)
    hosts, gpus = [], []
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = int(3 * med(walls) * n * 2.0e3)  # ~3x the loop's wall time at <= 2 GHz
    for _ in range(5):
        torch.cuda._sleep(cycles)
        e0.record()
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        t1 = time.perf_counter()
        e1.record()
        torch.cuda.synchronize()
        hosts.append((t1 - t0) * 1e6 / n)
        gpus.append(e0.elapsed_time(e1) * 1e3 / n)
    return med(walls), med(hosts), med(gpus)


def _table_eager(msa, timing, k_hnd, v_hnd, kc, vc):
    dev = k_hnd.device
    q, pt, sk, idx, r2t, sid = _sets(1, 1, dev)[0]
    w = msa.SparseDecodePagedAttentionWrapper().plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=CTX,
                                                     q2k_indices=idx, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D)
    o = torch.empty_like(q)
    iq = torch.randn(1, 4, D, device=dev, dtype=torch.bfloat16)
    ik = torch.randn(POOL_PAGES * BS, 1, D, device=dev, dtype=torch.bfloat16)
    scores = torch.randn(4, 1, CTX // BS, device=dev)
    calls = {
        "sparse_decode_atten_func": lambda: msa.sparse_decode_atten_func(
            q, k_hnd, v_hnd, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=CTX),
        "wrapper.run(out=)": lambda: w.run(q, k_hnd, v_hnd, out=o),
        "flash_decode_with_gqa_share_sparse": lambda: msa.flash_decode_with_gqa_share_sparse(
            q, None, kc, vc, r2t, sk, sid, BS, idx),
        "flash_decode_with_topk_idx (init 1, local 2)": lambda: msa.flash_decode_with_topk_idx(
            iq, None, ik, None, r2t, sk, CTX, sid, BS, TOPK, 1, 2, disable_index_value=True),
        "native_topk_from_scores (local 2)": lambda: msa.native_topk_from_scores(scores, sk, BS, TOPK,
                                                                                force_local_blocks=2),
    }
    rows = []
    for name, fn in calls.items():
        wall, host, between = _wall_loop(fn, (), parts=True)
        gpu = timing.bench_graph(lambda: fn(), [()])
        rows.append({"call (B = 1, 32K)": name, "eager wall us/call": wall, "host us/call (GPU busy)": host,
                     "GPU us/call (queued)": between, "graph us": gpu})
        print("eager", name, f"{wall:.1f}", f"{host:.1f}", f"{between:.1f}", f"{gpu:.2f}", flush=True)
    timing.print_table(rows, ["call (B = 1, 32K)", "eager wall us/call", "host us/call (GPU busy)",
                              "GPU us/call (queued)", "graph us"],
                       title="Eager host overhead: 200 back-to-back calls, one synchronize (target <= 15 us)")
    return rows


def indexer_case(timing, b, ctx, dev):
    """Decode-indexer inputs (4 index-Q heads, 1 key head): ``(index-K cache, req_to_token, seq_lens, input sets
    [(q, slot_ids)], bytes read per call)``; pages shuffled, enough sets to rotate past the L2."""
    read = b * ctx * (D * 2 + 4)
    n_sets = timing.num_sets(read, minimum=2, maximum=16)
    pages = ctx // BS
    n_req = n_sets * b
    ik = torch.randn(n_req * ctx, 1, D, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(n_req * pages, device=dev).view(n_req, pages)
    r2t = (perm.unsqueeze(-1) * BS + torch.arange(BS, device=dev)).view(n_req, ctx).to(torch.int32)
    sl = torch.full((b,), ctx, device=dev, dtype=torch.int32)
    sets = [(torch.randn(b, 4, D, device=dev, dtype=torch.bfloat16),
             torch.arange(s * b, (s + 1) * b, device=dev, dtype=torch.int32)) for s in range(n_sets)]
    return ik, r2t, sl, sets, read


def _table_indexer(msa, timing, copy_bw):
    dev = torch.device("cuda")
    rows = []
    for b, ctx in ((1, 32768), (32, 131072)):
        ik, r2t, sl, sets, read = indexer_case(timing, b, ctx, dev)

        def full(q, sid, init=1):
            return msa.flash_decode_with_topk_idx(q, None, ik, None, r2t, sl, ctx, sid, BS, TOPK, init, 2,
                                                  disable_index_value=True)[1]

        for name, fn in (("indexer init 1 / local 2", full),
                         ("indexer init 0 / local 2", lambda q, sid: full(q, sid, 0))):
            g = timing.bench_graph(fn, sets)
            e = _wall_loop(fn, sets[0], n=50)
            rows.append({"call": name, "B": b, "ctx": ctx, "MB": read / 1e6, "us graph": g, "eager wall us": e,
                         "%copy": 100 * read / (g * 1e-6) / copy_bw})
            print("idx", name, b, ctx, f"{g:.1f}", f"{e:.1f}", flush=True)
        del ik, r2t, sets
    timing.print_table(rows, ["call", "B", "ctx", "MB", "us graph", "eager wall us", "%copy"],
                       title="Decode indexer (4 index heads, 1 key head, D 128, top-16)")
    return rows


def run(msa, timing, latency_only=False, base=False):
    dev = torch.device("cuda")
    dk = importlib.import_module(msa.__name__ + ".decode_kernel")
    copy_bw = getattr(timing, "COPY_BW", None) or timing.measure_copy_bandwidth()
    kc = torch.randn(POOL_PAGES * BS, HKV, D, dtype=torch.bfloat16, device=dev)
    vc = torch.randn(POOL_PAGES * BS, HKV, D, dtype=torch.bfloat16, device=dev)
    k_hnd = kc.view(POOL_PAGES, BS, HKV, D).permute(0, 2, 1, 3).contiguous()
    v_hnd = vc.view(POOL_PAGES, BS, HKV, D).permute(0, 2, 1, 3).contiguous()
    rows = []
    if latency_only:
        return _table_latency(msa, timing, k_hnd, v_hnd, copy_bw, dk)
    rows += _table_eager(msa, timing, k_hnd, v_hnd, kc, vc)
    rows += _table_indexer(msa, timing, copy_bw)
    rows += _table_direct(msa, timing, k_hnd, v_hnd, kc, vc, copy_bw, dk, ("bf16",) if base else ("bf16", "fp8"))
    return rows


def run_base(msa, timing):
    """Tables 1 (bf16 only), 3 and 4: the before-measurement on a checkout of an earlier commit."""
    return run(msa, timing, base=True)


def run_latency(msa, timing):
    return run(msa, timing, latency_only=True)
