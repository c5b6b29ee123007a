#!/usr/bin/env python3
"""Main job (README command 1): an M3-shaped sparse attention decode step and prefill chunk, end to end.

Index scores -> top-k selection -> sparse attention, through the public API of the package.

Shape: Hq 64, Hkv 4, D 128, 128-token blocks, top-16, M3 indexer (4 index-Q heads, one shared index-K
head); paged KV with a shuffled page table, B requests with ragged lengths up to the context.

  decode:  flash_decode_with_topk_idx (block-max scores over the index-K cache, local block forced)
           -> sparse_decode_atten_func (and SparseDecodePagedAttentionWrapper, bitwise equal);
  prefill: the last T tokens of request 0, causal against its whole cache:
           quantize_bf16_to_nvfp4_128x4 (index q) -> fp4_indexer_block_scores -> native_topk_from_scores
           (local block forced) -> build_k2q_csr -> sparse_atten_func.

Every stage is checked (scores vs float64, atol 0.1 / rtol 0.01; selection and CSR exact; attention vs
float64 ``attention_ref`` on the selected blocks: cos >= 0.9999, max-abs <= 1e-2, LSE 1e-3) and, on a
GPU, timed (median CUDA events, several input sets rotated, L2 flushed before each eager call; and
CUDA-graph replay) against a roofline from the measured copy bandwidth and bf16 matmul rate. On a GPU
it then runs the benchmark tables (benchmarks/benchmark.py --quick) unless --no-bench is given.
Without a GPU everything runs through the Triton interpreter at a small context (fp16).

Usage: python scripts/demo.py [--context N] [--batch B] [--prefill T] [--sets S] [--no-bench]
"""

import argparse
import importlib
import os
import pathlib
import subprocess
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "benchmarks"))

import long_context as lc  # noqa: E402

STAGES = [  # (timing key, check-row op, label)
    ("decode indexer", "decode indexer block scores", "decode: flash_decode_with_topk_idx (scores + top-k)"),
    ("decode attention", "sparse_decode_atten_func", "decode: sparse_decode_atten_func"),
    ("quantise index q", None, "prefill: quantize_bf16_to_nvfp4_128x4 (index q)"),
    ("fp4 indexer scores", "fp4_indexer_block_scores (nvfp4, causal)", "prefill: fp4_indexer_block_scores"),
    ("top-k", "native_topk_from_scores (local forced)", "prefill: native_topk_from_scores"),
    ("build_k2q_csr", "build_k2q_csr", "prefill: build_k2q_csr"),
    ("prefill attention", "sparse_atten_func (prefill chunk)", "prefill: sparse_atten_func"),
]


def fmt_si(x, unit):
    if x is None or x == 0:
        return "-"
    for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= f:
            return f"{x / f:.1f} {p}{unit}"
    return f"{x:.0f} {unit}"


def fmt_num(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def print_checks(rows):
    lc.log("\n| stage | check | shape | cos | max-abs | LSE err | note | ours | peer |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join([
            r["stage"], r["op"], r["shape"],
            "-" if r["cos"] is None else f"{r['cos']:.6f}",
            "-" if r["max_abs"] is None else f"{r['max_abs']:.2e}",
            "-" if r["lse_err"] is None else f"{r['lse_err']:.1e}",
            r.get("note", "") or "",
            "PASS" if r["ours"] else "FAIL", "PASS" if r["peer"] else "FAIL"]) + " |", flush=True)
    print("ours: cos >= 0.9999, max-abs <= 1e-2, LSE atol=rtol 1e-3 (scores: atol 0.1 / rtol 0.01, -inf exact; "
          "selection / CSR exact); peer: cos >= 0.999, max-abs <= 5e-2", flush=True)


def time_stages(msa, c, sets, results, timing, iters):
    """{key: (eager µs, graph µs or None)} for each stage over the rotated input sets."""
    fns = {
        "decode indexer": (lambda qi: lc.decode_indexer(msa, c, qi), [(s.qi_dec,) for s in sets]),
        "decode attention": (lambda q, idx: lc.decode_attention(msa, c, q, idx),
                             [(s.q_dec, r.idx_dec) for s, r in zip(sets, results)]),
        "quantise index q": (lambda x: lc.quantize_index_q(msa, x), [(s.qi_pre_pad,) for s in sets]),
        "fp4 indexer scores": (lambda qf, qs: lc.prefill_scores(msa, c, qf, qs),
                               [(r.q_fp4, r.q_scale) for r in results]),
        "top-k": (lambda sc: lc.prefill_topk(msa, c, sc), [(r.scores,) for r in results]),
        "build_k2q_csr": (lambda q2k: lc.prefill_csr(msa, c, q2k), [(r.q2k,) for r in results]),
        "prefill attention": (lambda q, rp, qi: lc.prefill_attention(msa, c, q, rp, qi),
                              [(s.q_pre, r.rp, r.qi) for s, r in zip(sets, results)]),
    }
    out = {}
    for key, _, label in STAGES:
        fn, inputs = fns[key]
        lc.log(f"  timing {label} ({len(inputs)} input sets)")
        eager = timing.bench_events(fn, inputs, warmup=3, iters=iters, flush=True)
        try:
            graph = timing.bench_graph(fn, inputs, replays=20)
        except Exception as e:  # noqa: BLE001 - report, keep the eager number
            lc.log(f"    CUDA-graph capture failed ({type(e).__name__}: {str(e)[:120]}); eager only")
            graph = None
        out[key] = (eager, graph)
    return out


def main(argv=None):
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=32768 if gpu else 4096, help="KV length of request 0")
    ap.add_argument("--batch", type=int, default=8 if gpu else 2, help="decode requests")
    ap.add_argument("--prefill", type=int, default=256 if gpu else 16, help="prefill chunk length T")
    ap.add_argument("--sets", type=int, default=4, help="input sets rotated in the timing (GPU)")
    ap.add_argument("--iters", type=int, default=50, help="timed eager calls per stage (GPU)")
    ap.add_argument("--no-bench", action="store_true", help="skip benchmarks/benchmark.py --quick")
    args = ap.parse_args(argv)
    if args.context < 1 or args.batch < 1 or args.prefill < 1:
        ap.error("--context, --batch and --prefill must be >= 1")
    msa = lc.load_msa()
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float16
    timing = importlib.import_module("timing") if gpu else None
    card = timing.device_name() if gpu else "CPU (Triton interpreter)"
    lc.log(f"msa_blackwell demo on {card}; native ops: {msa.has_native_ops()}")
    lc.log(f"M3 shape: Hq {lc.HQ}, Hkv {lc.HKV}, D {lc.D}, block {lc.BS}, top-{lc.TOPK}, index heads {lc.HIDX} "
           f"(+1 shared index-K head); decode batch {args.batch}, context {args.context}, prefill chunk "
           f"{min(args.prefill, args.context)}; {dtype}")
    lc.log("building the paged KV cache (shuffled pages), the index-K cache and its NVFP4 copy")
    c = lc.make_case(msa, ctx=args.context, batch=args.batch, chunk=args.prefill, device=dev, dtype=dtype)
    sets = [lc.make_queries(c, seed=0)]
    rows, r0 = lc.checked_pipeline(msa, c, sets[0], wrapper=True)
    print_checks(rows)
    ok = all(r["ours"] for r in rows)

    if gpu:
        lc.log(f"\ntiming: {args.sets} input sets, L2 flushed before every eager call; measuring the card")
        bw = timing.measure_copy_bandwidth()
        tf = timing.measure_matmul_tflops()
        sets += [lc.make_queries(c, seed=i) for i in range(1, max(1, args.sets))]
        results = [r0] + [lc.run_pipeline(msa, c, s) for s in sets[1:]]
        times = time_stages(msa, c, sets, results, timing, args.iters)
        model = lc.stage_model(c, r0, c.k.element_size())
        lc.log(f"\nTimings on {card}: device copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {tf:.0f} TFLOP/s; "
               f"eager = CUDA events around each call (cold L2), graph = CUDA-graph replay over the sets")
        print("| stage | µs eager | µs graph | bytes | FLOPs | roofline µs | bound | % of roofline (graph) "
              "| % of roofline (eager) |\n|---|---:|---:|---:|---:|---:|---|---:|---:|")
        tot = {"decode": [0.0, 0.0, 0.0], "prefill": [0.0, 0.0, 0.0]}
        for key, _, label in STAGES:
            nbytes, flops = model[key]
            t_mem = nbytes / bw * 1e6
            t_cmp = flops / (tf * 1e12) * 1e6
            roof = max(t_mem, t_cmp)
            eager, graph = times[key]
            part = tot[label.split(":")[0]]
            part[0] += eager
            part[1] += graph if graph is not None else eager
            part[2] += roof
            print(f"| {label} | {eager:.1f} | {fmt_num(graph)} | {fmt_si(nbytes, 'B')} | {fmt_si(flops, 'FLOP')} | "
                  f"{roof:.2f} | {'memory' if t_mem >= t_cmp else 'compute'} | "
                  f"{'-' if graph is None else f'{100 * roof / graph:.1f}%'} | {100 * roof / eager:.1f}% |")
        for name, (e, g, rf) in tot.items():
            print(f"| **{name} total** | {e:.1f} | {g:.1f} | | | {rf:.2f} | | {100 * rf / g:.1f}% | "
                  f"{100 * rf / e:.1f}% |")
        print("roofline = max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate); bytes = the "
              "unique bytes a perfect kernel moves (selected K/V pages, index cache, scores, ids); "
              "% of roofline = roofline µs / measured µs.", flush=True)
    else:
        lc.log("\nWall-clock seconds of each checked call (Triton interpreter on CPU; no roofline without a GPU):")
        by_op = {r["op"]: r for r in rows}
        for key, op, label in STAGES:
            if op in by_op:
                lc.log(f"  {label:55s} {by_op[op]['call_s']:8.2f} s")

    lc.log(f"\ndemo {'PASSED' if ok else 'FAILED'} ({sum(r['ours'] for r in rows)}/{len(rows)} checks pass our gate)")
    if gpu and not args.no_bench:
        del c, sets
        torch.cuda.empty_cache()
        lc.log("\nRunning the benchmark tables (python benchmarks/benchmark.py --quick) ...")
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--quick"], check=False,
                       env=dict(os.environ))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
