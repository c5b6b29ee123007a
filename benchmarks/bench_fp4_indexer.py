"""FP4 indexer block scores on tensor cores (GPU only): ``fp4_indexer_block_scores`` at M3 indexer shapes.

``run(msa, timing) -> list[dict]`` (``python benchmarks/benchmark.py --sections fp4_indexer``). One request, a
causal prefill chunk of ``T`` query tokens at the end of a ``ctx``-token context, Hq = 4 index-Q heads, Hkv = 1,
D = 128 (64 packed bytes), NVFP4 (E2M1 + E4M3 scales per 16), ``preordered_mma`` scales, shuffled page table:

* ``T=256 @ 32K`` (target <= 100 us on an H200), ``T=512 @ 1M`` (target <= 2 ms), ``T=4096 @ 128K`` (target
  >= 40% of the measured bf16 matmul rate in useful causal FLOPs).

Columns: ``us`` = CUDA-graph replay per call, input sets rotated so that they exceed 3x L2 (cold K pages);
``GFLOP`` useful = 2 * Hq * D * (number of visible (query, key) pairs); ``TFLOP/s`` and ``%mm`` (of
``timing.MATMUL_TFLOPS``, the measured bf16 8192^3 matmul rate); ``MB`` = bytes that must move (packed K and its
scales for the visible blocks, Q, scores written) and ``%copy`` = that over ``timing.COPY_BW``; ``tile`` = the
launch the runtime chose (BLOCK_M x BLOCK_H rows, BLOCK_N, warps, stages, KV chunk x chunks); ``ok`` (32K row):
scores equal an fp32 torch dequant-matmul reference within the tests' tolerance and its top-16 blocks per
(head, query) are identical.

``python benchmarks/bench_fp4_indexer.py [--sweep] [--quick]`` runs the section alone; ``--sweep`` also times
candidate ``Fp4IndexerConfig`` values per row (tiles x warps x stages x waves) to tune
``fp4_indexer.FP4_INDEXER_CONFIGS`` for this GPU.
"""

import importlib
import sys
from pathlib import Path

import torch

HQ, HKV, D = 4, 1, 128
ROWS = (("T=256 @ 32K", 256, 32768), ("T=512 @ 1M", 512, 1 << 20), ("T=4096 @ 128K", 4096, 131072))


def _e4m3_codes(shape, dev):
    """E4M3 scale bytes with exponent field 4..10 (values 2^-3 .. ~15), as the tests use."""
    return ((torch.randint(4, 11, shape, device=dev) << 3) | torch.randint(0, 8, shape, device=dev)).to(torch.uint8)


def _preorder(logical):
    """Logical [L, mn, 8] scale bytes -> preordered_mma storage (L, ceil(mn/128), 2, 32, 4, 4) (§5.14 formula)."""
    L, mn, Gs = logical.shape
    rm, rg = -(-mn // 128), -(-Gs // 4)
    dev = logical.device
    store = torch.zeros(L * rm * rg * 512, dtype=torch.uint8, device=dev)
    lidx = torch.arange(L, device=dev).view(-1, 1, 1)
    m = torch.arange(mn, device=dev).view(1, -1, 1)
    c = torch.arange(Gs, device=dev).view(1, 1, -1)
    off = lidx * 512 * rm * rg + (m // 128) * 512 * rg + (c // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + c % 4
    store[off.reshape(-1)] = logical.reshape(-1)
    return store.view(L, rm, rg, 32, 4, 4)


def _make_set(T, ctx, dev):
    pages = ctx // 128
    q = torch.randint(0, 256, (T, HQ, 64), dtype=torch.uint8, device=dev)
    k = torch.randint(0, 256, (pages, HKV, 128, 64), dtype=torch.uint8, device=dev)
    qs_log = _e4m3_codes((T, HQ, 8), dev)
    ks_log = _e4m3_codes((pages, HKV, 128, 8), dev)
    qs = _preorder(qs_log.permute(1, 0, 2).contiguous()).view(torch.float8_e4m3fn)
    ks = _preorder(ks_log.reshape(pages * HKV, 128, 8)).view(torch.float8_e4m3fn)
    kvi = torch.randperm(pages, device=dev).to(torch.int32)
    return dict(q=q, k=k, qs=qs, ks=ks, kvi=kvi, qs_log=qs_log, ks_log=ks_log)


def _counts(T, ctx):
    """(useful FLOPs, bytes that must move) of a causal chunk of the last T tokens of ctx."""
    i = torch.arange(T, dtype=torch.float64)
    vis = torch.clamp(i + (ctx - T) + 1, max=ctx).sum().item()
    flops = 2.0 * HQ * D * vis
    nb_vis = -(-ctx // 128)
    kbytes = nb_vis * 128 * HKV * (64 + 8) + nb_vis * 4
    qbytes = T * HQ * (64 + 8)
    obytes = HQ * nb_vis * T * 4
    return flops, kbytes + qbytes + obytes


def _reference_check(fn, s, T, ctx):
    """fp32 dequant + matmul reference (exact products, fp32 sums): scores close and top-16 blocks identical."""
    lut = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], device=s["q"].device)

    def deq(packed, scale_bytes):
        p = packed.long()
        vals = lut[torch.stack([p & 15, p >> 4], -1).reshape(*p.shape[:-1], 128)]
        sc = scale_bytes.view(torch.float8_e4m3fn).float().repeat_interleave(16, dim=-1)
        return vals * sc

    out = fn(s)
    qd = deq(s["q"], s["qs_log"])  # [T, Hq, 128]
    kd = deq(s["k"], s["ks_log"])[s["kvi"].long(), 0].reshape(ctx, 128)  # logical key order
    NB = ctx // 128
    ref = torch.empty(HQ, NB, T, device=out.device)
    x = torch.arange(ctx, device=out.device)
    for h in range(HQ):
        sc = qd[:, h] @ kd.T  # [T, ctx]
        sc = sc.masked_fill(x.view(1, -1) > torch.arange(T, device=out.device).view(-1, 1) + (ctx - T), float("-inf"))
        ref[h] = sc.view(T, NB, 128).amax(-1).T
    fin = torch.isfinite(ref)
    ok = bool(torch.equal(torch.isneginf(out), torch.isneginf(ref)))
    ok = ok and bool(torch.allclose(out[fin], ref[fin], atol=0.1, rtol=0.01))
    o = out.permute(0, 2, 1).reshape(-1, NB)
    r = ref.permute(0, 2, 1).reshape(-1, NB)
    to = torch.sort(torch.topk(o, 16, dim=1).indices, dim=1).values
    tr = torch.sort(torch.topk(r, 16, dim=1).indices, dim=1).values
    return ok and bool(torch.equal(to, tr))


def _fx(msa):
    return importlib.import_module(msa.__name__ + ".fp4_indexer")


def _case(msa, timing, T, ctx, dev):
    flops, nbytes = _counts(T, ctx)
    set_bytes = (ctx // 128) * 128 * HKV * 72 + T * HQ * 72
    quick = getattr(timing, "QUICK", False)
    n_sets = timing.num_sets(set_bytes, minimum=2, maximum=4 if quick else 32)
    sets = [_make_set(T, ctx, dev) for _ in range(n_sets)]
    cu_q = torch.tensor([0, T], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, ctx], dtype=torch.int32, device=dev)
    cu_p = torch.tensor([0, ctx // 128], dtype=torch.int32, device=dev)
    return flops, nbytes, sets, cu_q, cu_k, cu_p


def run(msa, timing, sweep=False):
    fx = _fx(msa)
    dev = torch.device("cuda")
    copy_bw = getattr(timing, "COPY_BW", None) or timing.measure_copy_bandwidth()
    mm = getattr(timing, "MATMUL_TFLOPS", None) or timing.measure_matmul_tflops()
    major = torch.cuda.get_device_capability()[0]
    rows = []
    sweep_rows = []
    for label, T, ctx in ROWS:
        flops, nbytes, sets, cu_q, cu_k, cu_p = _case(msa, timing, T, ctx, dev)

        def call(s):
            return msa.fp4_indexer_block_scores(s["q"], s["k"], s["qs"], s["ks"], cu_q, cu_k, cu_p, max_seqlen_q=T,
                                                max_seqlen_k=ctx, kv_indices=s["kvi"], fp4_format="nvfp4",
                                                causal=True, scale_layout="preordered_mma")

        ok = _reference_check(call, sets[0], T, ctx) if ctx <= 32768 else None
        us = timing.bench_graph(call, [(s,) for s in sets])
        cfg = fx.config_for(major, T)
        bm, bh = fx.tile_for(cfg, HQ // HKV, T)
        NB = ctx // 128
        chunk, n_chunks = fx.plan_chunks(cfg, triton_cdiv(T, bm) * HKV * triton_cdiv(HQ // HKV, bh), NB,
                                         torch.cuda.get_device_properties(0).multi_processor_count)
        tf = flops / (us * 1e-6) / 1e12
        rows.append({"shape": label, "us": us, "GFLOP": flops / 1e9, "TFLOP/s": tf, "%mm": 100 * tf / mm,
                     "MB": nbytes / 1e6, "%copy": 100 * nbytes / (us * 1e-6) / copy_bw,
                     "tile": f"{bm}x{bh} N{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} c{chunk}x{n_chunks}",
                     "ok": ok})
        if sweep:
            sweep_rows += _sweep(fx, label, T, ctx, sets, cu_q, cu_k, cu_p, flops, mm, timing)
    timing.print_table(rows, ["shape", "us", "GFLOP", "TFLOP/s", "%mm", "MB", "%copy", "tile", "ok"],
                       title=f"fp4_indexer_block_scores (Hq {HQ}, Hkv {HKV}, D {D}, nvfp4 preordered, causal; "
                             f"bf16 matmul {mm:.0f} TFLOP/s, copy {copy_bw / 1e12:.2f} TB/s)")
    if sweep:
        timing.print_table(sweep_rows, ["shape", "rows", "block_n", "warps", "stages", "waves", "us", "TFLOP/s", "%mm"],
                           title="fp4 indexer configuration sweep")
    return rows


def triton_cdiv(a, b):
    return -(-a // b)


def _sweep(fx, label, T, ctx, sets, cu_q, cu_k, cu_p, flops, mm, timing):
    """Time candidate configurations through ``fp4_indexer._launch`` (same kernel, explicit config)."""
    NB = ctx // 128
    out = torch.empty(HQ, NB, T, dtype=torch.float32, device="cuda")
    res = []
    # candidates around the sm_90 entries: 8 warps, 128 / 256 rows, 64 / 128-slot sub-tiles, 2-3 stages, 4-8 waves
    tiles = [(128, 128, 8), (128, 64, 8), (256, 64, 8), (256, 128, 8)]
    for rows, bn, warps in tiles:
        for stages in (2, 3):
            for waves in (4, 8):
                cfg = fx.Fp4IndexerConfig(rows=rows, wide_rows=rows, block_n=bn, num_warps=warps, num_stages=stages,
                                           waves=waves)

                def call(s, cfg=cfg):
                    fx._launch(s["q"], s["k"], s["qs"].view(torch.uint8), s["ks"].view(torch.uint8), cu_q, cu_k, cu_p,
                               s["kvi"], None, T, NB, fx.FMT_NVFP4, fx.SK_E4M3, True, True, out, cfg=cfg)
                try:
                    us = timing.bench_graph(call, [(s,) for s in sets], replays=10)
                except Exception as e:  # a tile that does not fit this GPU
                    print(f"# sweep {label} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                tf = flops / (us * 1e-6) / 1e12
                res.append({"shape": label, "rows": rows, "block_n": bn, "warps": warps, "stages": stages,
                            "waves": waves, "us": us, "TFLOP/s": tf, "%mm": 100 * tf / mm})
    best = min(res, key=lambda r: r["us"]) if res else None
    if best:
        print(f"# sweep {label}: best {best}")
    return res


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="FP4 indexer benchmark (GPU)")
    ap.add_argument("--sweep", action="store_true", help="also time candidate configurations")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA GPU; nothing to time here")
        return 0
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    timing = importlib.import_module("timing")
    from benchmark import load_package

    msa = load_package()
    print(f"# {timing.device_name()}, torch {torch.__version__}")
    timing.COPY_BW = timing.measure_copy_bandwidth()
    timing.MATMUL_TFLOPS = timing.measure_matmul_tflops()
    timing.QUICK = args.quick
    run(msa, timing, sweep=args.sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
