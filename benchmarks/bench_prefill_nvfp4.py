"""NVFP4-K/V prefill (``sparse_atten_nvfp4_kv_func``, staged and fused) vs bf16 ``sparse_atten_func`` (GPU only).

Shape (MiniMax-M3, as ``bench_prefill``): B = 1, Sq = Sk = 32K, Hq = 64, Hkv = 4, D = 128, top-16,
causal; the selection and the sparse FLOP count come from ``bench_prefill`` (``m3_selection``,
``sparse_flops``) and every variant runs on the same CSR. K/V: N(0,1) bf16 quantised with
``quantize_kv_bf16_to_nvfp4_128x4``; the bf16 baseline runs on the original bf16 K/V. Dense
``[S, Hkv, 64]`` and paged (a pool of ``2 S/128`` pages ``[., Hkv, 128, 64]``, shuffled page table) layouts.

Rows per (layout):
* ``bf16``: ``sparse_atten_func`` on bf16 Q/K/V (the reference time);
* ``nvfp4 bf16Q`` / ``nvfp4 fp8Q``: the op with its default path (staged: K/V decoded once into element tiles,
  then the element kernel, while the workspace fits ``prefill_kernel.NVFP4_STAGE_MAX_BYTES``);
* ``nvfp4 fused bf16Q`` / ``nvfp4 fused fp8Q``: the op with staging off (``tuning.override(
  prefill_nvfp4_stage_bytes=0)``: packed FP4 + scales read in the attention loop);
* ``dequant+bf16``: what an unfused implementation does (Triton dequantiser to bf16 for K and V, then
  ``sparse_atten_func``).
Columns: time per call (CUDA-graph replay, 3 rotating input sets), sparse-effective TFLOP/s, time
relative to bf16, K/V bytes per call (the K/V tensors, scales included), and ``max|d|``: the fused
output against ``sparse_atten_func`` on ``dequantize_nvfp4_128x4_to_bf16`` K/V (the §3.5 acceptance
construction, tolerance 2e-2).

Env (read by this benchmark only): ``MSA_BENCH_SIZES`` (default ``32768``);
``MSA_BENCH_NVFP4_SWEEP="8,64,8,3;8,32,8,2"`` adds one fused ``nvfp4 bf16Q`` row per listed tile config
``bmt,bns,warps,stages[,list]`` (timed inside ``msa.tuning.override(prefill_nvfp4=cfg)``). ``run(msa, timing)``
is the entry point (``python benchmarks/benchmark.py --sections prefill_nvfp4``);
``python benchmarks/bench_prefill_nvfp4.py`` runs it standalone on the source tree.
"""

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prefill import D, HKV, HQ, TOPK, m3_selection, sparse_flops  # noqa: E402

FP8 = torch.float8_e4m3fn


def _paged(x, perm, pool):
    """[S, Hkv, d] -> HND pool [pool, Hkv, 128, d] with the S / 128 pages at shuffled page ids ``perm`` (the other
    pages zero)."""
    S, h, d = x.shape
    P = S // 128
    pages = x.view(P, 128, h, d).permute(0, 2, 1, 3)
    out = torch.zeros((pool, h, 128, d), dtype=x.dtype, device=x.device)
    out[perm.long()] = pages
    return out


def run(msa, timing):
    dev = torch.device("cuda")
    sizes = [int(x) for x in os.environ.get("MSA_BENCH_SIZES", "32768").split(",")]
    dequant = getattr(msa, "native_nvfp4_dequant_swizzled_to_bf16")
    sweep = [c for c in os.environ.get("MSA_BENCH_NVFP4_SWEEP", "").split(";") if c.strip()]
    rows = []
    for S in sizes:
        assert S % 128 == 0
        torch.manual_seed(0)
        q2k = m3_selection(S, HKV, TOPK, dev)
        cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
        flops = sparse_flops(q2k, S, HQ, D)
        rp, qi = msa.build_k2q_csr(q2k, cu, cu, 128, total_k=S, max_seqlen_k=S, max_seqlen_q=S)
        P = S // 128
        for layout in ("dense", "paged"):
            paged = layout == "paged"
            # paged: a pool of twice the context's pages (the staged path gathers the page table's pages)
            perm = torch.randperm(2 * P, device=dev)[:P].to(torch.int32)
            pt = perm.view(1, P)
            sets = []
            for _ in range(3):
                q = torch.randn(S, HQ, D, device=dev, dtype=torch.bfloat16)
                k = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16)
                v = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16)
                if paged:
                    k, v = _paged(k, perm, 2 * P), _paged(v, perm, 2 * P)
                qk, qv = msa.quantize_kv_bf16_to_nvfp4_128x4(k, v)
                sets.append(dict(q=q, q8=q.to(FP8), k=k, v=v, qk=qk, qv=qv))
            extra = dict(page_table=pt) if paged else {}
            kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S, max_seqlen_k=S, causal=True, **extra)

            def bf16(q, k, v):
                return msa.sparse_atten_func(q, k, v, rp, qi, TOPK, **kw)

            def fused(q, kd, vd, ks, vs, kg, vg):
                return msa.sparse_atten_nvfp4_kv_func(q, kd, vd, ks, vs, kg, vg, rp, qi, TOPK, **kw)

            def unfused(q, kd, vd, ks, vs, kg, vg):
                return msa.sparse_atten_func(q, dequant(kd, ks, kg), dequant(vd, vs, vg), rp, qi, TOPK, **kw)

            def nv_args(s, qname):
                return (s[qname], s["qk"].data, s["qv"].data, s["qk"].scale_128x4, s["qv"].scale_128x4,
                        s["qk"].global_scale, s["qv"].global_scale)

            s0 = sets[0]
            ref = msa.sparse_atten_func(s0["q"], msa.dequantize_nvfp4_128x4_to_bf16(s0["qk"]),
                                        msa.dequantize_nvfp4_128x4_to_bf16(s0["qv"]), rp, qi, TOPK, **kw).float()
            bf16_kv_bytes = 2 * s0["k"].numel() * 2
            nv_kv_bytes = 2 * (s0["qk"].data.numel() + s0["qk"].scale_128x4.numel())
            t_bf16 = timing.bench_graph(bf16, [(s["q"], s["k"], s["v"]) for s in sets])
            variants = [("bf16", t_bf16, bf16_kv_bytes, None)]
            todo = [("nvfp4 bf16Q", fused, "q", None), ("nvfp4 fp8Q", fused, "q8", None),
                    ("nvfp4 fused bf16Q", fused, "q", "fused"), ("nvfp4 fused fp8Q", fused, "q8", "fused"),
                    ("dequant+bf16", unfused, "q", None)]
            todo += [(f"nvfp4 fused bf16Q cfg {c}", fused, "q", c) for c in sweep]
            for name, fn, qn, cfg in todo:
                try:
                    ov = dict(prefill_nvfp4_stage_bytes=0) if cfg else {}
                    if cfg and cfg != "fused":
                        ov["prefill_nvfp4"] = cfg
                    with msa.tuning.override(**ov) if ov else contextlib.nullcontext():
                        err = (fn(*nv_args(s0, qn)).float() - ref).abs().max().item()
                        t = timing.bench_graph(fn, [nv_args(s, qn) for s in sets])
                    variants.append((name, t, nv_kv_bytes, err))
                except Exception as e:  # noqa: BLE001 - report and continue
                    print(f"{layout} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            for name, t, kvb, err in variants:
                rows.append({"bench": "prefill_nvfp4", "S": S, "layout": layout, "variant": name, "us": t,
                             "sparse_tflops": flops / (t * 1e-6) / 1e12, "x_bf16": t / t_bf16,
                             "KV MB": kvb / 1e6, "max|d|": err})
            del sets, ref
            torch.cuda.empty_cache()
    if hasattr(timing, "print_table"):
        timing.print_table(rows, ["S", "layout", "variant", "us", "sparse_tflops", "x_bf16", "KV MB", "max|d|"],
                           title="NVFP4-K/V prefill vs bf16, M3 shape (Hq 64, Hkv 4, D 128, top-16, causal), graph replay")
    return rows


if __name__ == "__main__":
    from standalone import run_section

    run_section(run, 4)
