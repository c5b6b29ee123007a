#!/usr/bin/env python3
"""Main job (README command 1): MiniMax-M3-shaped sparse attention through the public API.

Steps, each checked against a float64 PyTorch reference and timed on a GPU:
  1. block scores -> native top-k selection with the local block forced (the M3 rule);
  2. sparse paged decode (`sparse_decode_atten_func`) over the selected blocks, and the same call
     through the CUDA-graph-safe `SparseDecodePagedAttentionWrapper`;
  3. a prefill chunk: `build_k2q_csr` + `sparse_atten_func` (causal) over the same cache.
On a GPU it then runs the benchmark tables (benchmarks/benchmark.py) unless --no-bench is given.
Without a GPU everything runs through the Triton interpreter at a small context (fp16).

Usage: python scripts/demo.py [--context N] [--batch B] [--no-bench]
"""

import argparse
import math
import os
import pathlib
import subprocess
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
REPO_ID = "flashrt/MiniMaxAI-msa-blackwell"
sys.path.insert(0, str(REPO))

from tests.reference import attention_ref, gather_paged, q2k_block_mask, visible_from_blocks  # noqa: E402


def log(msg):
    print(msg, flush=True)


def timed(fn, gpu, iters=50):
    """Median µs of fn() (CUDA events on a GPU, wall clock otherwise); returns (result, µs)."""
    out = fn()
    if not gpu:
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e3)
    ts.sort()
    return out, ts[len(ts) // 2]


def check(name, out, ref, *, atol, rows):
    err = (out.double().cpu() - ref.double().cpu()).abs().max().item()
    a, b = out.double().cpu().flatten(), ref.double().cpu().flatten()
    cos = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
    ok = err <= atol and cos >= 0.9999
    rows.append((name, f"max-abs {err:.2e}", f"cos {cos:.6f}", "PASS" if ok else "FAIL"))
    return ok


def main(argv=None):
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=32768 if gpu else 1024)
    ap.add_argument("--batch", type=int, default=8 if gpu else 1)
    ap.add_argument("--prefill", type=int, default=256 if gpu else 64,
                    help="prefill chunk length (the float64 reference is dense: keep it modest)")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LOCAL_KERNELS", f"{REPO_ID}={REPO}")
    from kernels import get_kernel

    msa = get_kernel(REPO_ID, version=1, trust_remote_code=True)
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float16
    B, Hq, Hkv, D, bs, topk = args.batch, 64, 4, 128, 128, 16
    G = Hq // Hkv
    ctx = args.context
    pages_per_req = math.ceil(ctx / bs)
    log(f"msa_blackwell demo on {torch.cuda.get_device_name() if gpu else 'CPU (Triton interpreter)'}; "
        f"native ops: {msa.has_native_ops()}")
    log(f"M3 shape: Hq {Hq}, Hkv {Hkv}, D {D}, block {bs}, top-{topk}; batch {B}, context {ctx}, {dtype}")
    torch.manual_seed(0)
    rows, timings = [], []

    # KV cache (paged HND, shuffled pages), lengths ragged below the context.
    num_pages = B * pages_per_req
    k = torch.randn(num_pages, Hkv, bs, D, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    page_table = torch.randperm(num_pages, device=dev).to(torch.int32).view(B, pages_per_req)
    lens = [ctx - (b * 37) % bs for b in range(B)]
    seqused_k = torch.tensor(lens, device=dev, dtype=torch.int32)

    # 1. selection: random block scores -> top-k with the local block forced.
    log("[1/3] top-k block selection (local block forced)")
    scores = torch.randn(Hkv, B, pages_per_req, device=dev, dtype=torch.float32)
    q2k, us = timed(lambda: msa.native_topk_from_scores(scores, seqused_k, bs, topk, force_local_blocks=1), gpu)
    ref_ok = True
    for b in range(B):
        n = math.ceil(lens[b] / bs)
        for g in range(Hkv):
            s = scores[g, b, :n].clone()
            s[n - 1] = float("inf")
            order = sorted(range(n), key=lambda j: (-s[j].item(), j))[:topk]
            want = order + [-1] * (topk - len(order))
            ref_ok &= q2k[g, b].tolist() == want
    rows.append(("top-k selection", "exact" if ref_ok else "MISMATCH", "", "PASS" if ref_ok else "FAIL"))
    timings.append(("native_topk_from_scores", us, None))

    # 2. decode.
    log("[2/3] sparse paged decode (functional and wrapper)")
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    call = lambda: msa.sparse_decode_atten_func(q, k, v, q2k, page_table=page_table, seqused_k=seqused_k,  # noqa: E731
                                                seqlen_q=1, max_seqlen_k=ctx, blk_kv=bs, return_softmax_lse=True)
    (out, lse), us = timed(call, gpu)
    wrapper = msa.SparseDecodePagedAttentionWrapper(blk_kv=bs)
    wrapper.plan(page_table=page_table, seqused_k=seqused_k, seqlen_q=1, max_seqlen_k=ctx, q2k_indices=q2k,
                 num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D)
    out_w = wrapper.run(q, k, v)
    ok = True
    for b in range(B):
        kb = gather_paged(k, page_table[b], lens[b])
        vb = gather_paged(v, page_table[b], lens[b])
        vis = visible_from_blocks(q2k_block_mask(q2k[:, b:b + 1], pages_per_req), 1, lens[b], block_size=bs)
        o_ref, lse_ref, _ = attention_ref(q[b:b + 1], kb, vb, vis, D ** -0.5)
        ok &= check(f"decode b={b}", out[b:b + 1], o_ref, atol=1e-2, rows=rows)
        ok &= bool(((lse[b].double().cpu() - lse_ref[0].cpu()).abs() <= 1e-3 * (1 + lse_ref[0].cpu().abs())).all())
    same = torch.equal(out, out_w)
    rows.append(("wrapper == functional", "bitwise" if same else "DIFFERS", "", "PASS" if same else "FAIL"))
    kv_bytes = B * Hkv * topk * bs * D * 2 * k.element_size()
    timings.append(("sparse_decode_atten_func", us, kv_bytes))

    # 3. prefill chunk over the first request's cache: the last T tokens attend causally.
    log("[3/3] prefill chunk: build_k2q_csr + sparse_atten_func (causal)")
    T = min(args.prefill, lens[0])
    Lk = lens[0]
    qp = torch.randn(T, Hq, D, device=dev, dtype=dtype)
    nbk = math.ceil(Lk / bs)
    pos = torch.arange(Lk - T, Lk, device=dev)
    local = (pos // bs).to(torch.int32)
    psc = torch.randn(Hkv, T, nbk, device=dev)
    psc = psc.masked_fill(torch.arange(nbk, device=dev).view(1, 1, -1) > local.view(1, -1, 1), float("-inf"))
    q2k_p = msa.native_topk_from_scores(psc, (pos + 1).to(torch.int32), bs, topk, force_local_blocks=1)
    cu_q = torch.tensor([0, T], device=dev, dtype=torch.int32)
    cu_k = torch.tensor([0, Lk], device=dev, dtype=torch.int32)
    row_ptr, q_idx = msa.build_k2q_csr(q2k_p, cu_q, cu_k, bs, total_k=Lk, max_seqlen_k=Lk, max_seqlen_q=T)
    pcall = lambda: msa.sparse_atten_func(  # noqa: E731
        qp, k, v, row_ptr, q_idx, topk, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=T, max_seqlen_k=Lk,
        blk_kv=bs, causal=True, page_table=page_table[:1], seqused_k=seqused_k[:1])
    out_p, us = timed(pcall, gpu, iters=20)
    kb = gather_paged(k, page_table[0], Lk)
    vb = gather_paged(v, page_table[0], Lk)
    vis = visible_from_blocks(q2k_block_mask(q2k_p, nbk), T, Lk, block_size=bs, causal=True)
    o_ref, _, _ = attention_ref(qp, kb, vb, vis, D ** -0.5)
    ok &= check("prefill chunk", out_p, o_ref, atol=1e-2, rows=rows)
    flops = 4 * int(vis.sum().item()) * G * D
    timings.append(("sparse_atten_func (prefill chunk)", us, None, flops))

    log("\n| check | error | cosine | result |\n|---|---|---|---|")
    for r in rows:
        log("| " + " | ".join(r) + " |")
    if gpu:
        props = torch.cuda.get_device_properties(0)
        log(f"\nTimings on {props.name} (CUDA events, eager, median):")
        for t in timings:
            name, us = t[0], t[1]
            extra = ""
            if len(t) > 2 and t[2]:
                extra = f"  {t[2] / (us * 1e-6) / 1e9:.0f} GB/s of selected K/V"
            if len(t) > 3 and t[3]:
                extra = f"  {t[3] / (us * 1e-6) / 1e12:.1f} TFLOP/s sparse-effective"
            log(f"  {name:38s} {us:9.1f} µs{extra}")
    all_ok = ok and ref_ok and same and all(r[3] == "PASS" for r in rows)
    log(f"\ndemo {'PASSED' if all_ok else 'FAILED'}")
    if gpu and not args.no_bench:
        log("\nRunning the benchmark tables (python benchmarks/benchmark.py --quick) ...")
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--quick"], check=False)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
