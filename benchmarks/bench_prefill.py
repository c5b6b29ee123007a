"""Prefill benchmark: build_k2q_csr + sparse_atten_func on the MiniMax-M3 shape (H100/B200).

Shape: B = 1, Sq = Sk in {4K, 32K, 128K}, Hq = 64, Hkv = 4, D = 128, top-16, causal, bf16.
Selection (indexer-like): for every KV group and run of 64 tokens, the local block of each token plus
15 random distinct earlier blocks shared by the run (fewer when the token has fewer earlier blocks).

Reported per size: sparse_atten_func time (CUDA graph), sparse-effective TFLOP/s
(``4 * visible_selected_tokens * D`` per (token, Q head), summed), build_k2q_csr time, and the speedup
against dense causal torch SDPA (cuDNN and flash backends, K/V expanded to Hq heads).

Env (read by this benchmark only): ``MSA_BENCH_SIZES=32768`` limits the sizes, ``MSA_BENCH_NO_SDPA=1`` skips
the baselines, ``MSA_BENCH_PREFILL_CFG=bmt,bns,warps,stages[,list]`` runs the attention with that tile config
(``msa.tuning.override(prefill=...)``; the tables are in prefill_kernel.py).
Sweep: ``MSA_BENCH_SWEEP="8,64,8,2;8,128,8,3" MSA_BENCH_CSR_CHUNKS=2048,1024 python benchmarks/bench_prefill.py``
(one process, one size: attention per tile config, checked against the first config, and the CSR builder per
chunk size ``tuning.override(csr_chunk_entries=...)``, checked bit-exact).

``run(msa, timing)`` is the entry point; ``timing`` is ``benchmarks/timing.py``:
``bench_events(fn, inputs_list)`` / ``bench_graph(fn, inputs_list)`` return the median time in µs of
``fn(*inputs)`` over the (rotated) inputs. ``python benchmarks/bench_prefill.py`` runs it standalone.
"""


import contextlib
import os

import torch

HQ, HKV, D, TOPK, RUN = 64, 4, 128, 16, 64


def m3_selection(S: int, hkv: int, topk: int, device, run: int = RUN, seed: int = 0) -> torch.Tensor:
    """[hkv, S, topk] int32: local block first, then up to topk-1 random earlier blocks per run of tokens."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = -(-S // 128)
    nruns = -(-S // run)
    t = torch.arange(S, device=device)
    local = (t // 128).to(torch.int32)
    run_loc = (torch.arange(nruns, device=device) * run) // 128           # local block of each run's first token
    scores = torch.rand((hkv, nruns, nb), generator=gen, device=device)
    allowed = torch.arange(nb, device=device).view(1, 1, -1) < run_loc.view(1, -1, 1)
    scores = torch.where(allowed, scores, torch.full_like(scores, -1.0))
    k = min(topk - 1, nb)
    vals, ids = torch.topk(scores, k, dim=2) if k > 0 else (scores[..., :0], scores[..., :0].long())
    ids = torch.where(vals >= 0, ids, torch.full_like(ids, -1)).to(torch.int32)  # [hkv, nruns, k]
    out = torch.full((hkv, S, topk), -1, dtype=torch.int32, device=device)
    out[:, :, 0] = local.view(1, -1)
    if k > 0:
        out[:, :, 1:1 + k] = ids[:, t // run, :]
    return out


def sparse_flops(q2k: torch.Tensor, S: int, hq: int, d: int) -> float:
    """Sum over (token, Q head) of 4 * |visible selected tokens| * D (causal, Sq == Sk)."""
    hkv = q2k.shape[0]
    ids = q2k.long()
    ids_sorted = torch.sort(torch.where(ids < 0, torch.full_like(ids, 1 << 40), ids), dim=2).values
    first = torch.ones_like(ids_sorted, dtype=torch.bool)
    first[:, :, 1:] = ids_sorted[:, :, 1:] != ids_sorted[:, :, :-1]
    valid = first & (ids_sorted < (1 << 40))
    lim = torch.arange(S, device=q2k.device).view(1, -1, 1)
    vis = (lim - 128 * ids_sorted + 1).clamp(0, 128)
    vis = torch.where(valid, vis, torch.zeros_like(vis))
    total = float(vis.sum().item())
    return 4.0 * total * (hq // hkv) * d


def run(msa, timing) -> list:
    cfg = os.environ.get("MSA_BENCH_PREFILL_CFG")
    with msa.tuning.override(prefill=cfg) if cfg else contextlib.nullcontext():
        return _run(msa, timing)


def _run(msa, timing) -> list:
    dev = torch.device("cuda")
    results = []
    sizes = [int(x) for x in os.environ.get("MSA_BENCH_SIZES", "4096,32768,131072").split(",")]
    skip_sdpa = os.environ.get("MSA_BENCH_NO_SDPA") == "1"
    for S in sizes:
        torch.manual_seed(0)
        q2k = m3_selection(S, HKV, TOPK, dev)
        cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
        flops = sparse_flops(q2k, S, HQ, D)
        n_in = 2 if S >= 131072 else 3
        inputs = []
        for _ in range(n_in):
            q = torch.randn(S, HQ, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16)
            rp, qi = msa.build_k2q_csr(q2k, cu, cu, 128, total_k=S, max_seqlen_k=S, max_seqlen_q=S)
            inputs.append((q, k, v, rp, qi))

        def attn(q, k, v, rp, qi):
            return msa.sparse_atten_func(q, k, v, rp, qi, TOPK, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S,
                                         max_seqlen_k=S, causal=True)

        def build(x):
            return msa.build_k2q_csr(x, cu, cu, 128, total_k=S, max_seqlen_k=S, max_seqlen_q=S)

        t_attn = timing.bench_graph(attn, inputs)
        q2ks = [(m3_selection(S, HKV, TOPK, dev, seed=s),) for s in range(3)]
        t_build = timing.bench_graph(build, q2ks)
        row = {"bench": "prefill", "S": S, "B": 1, "Hq": HQ, "Hkv": HKV, "D": D, "topk": TOPK, "causal": True,
               "attn_us": t_attn, "sparse_tflops": flops / (t_attn * 1e-6) / 1e12, "build_k2q_csr_us": t_build,
               "attn_plus_build_us": t_attn + t_build}
        # dense causal SDPA baselines
        dense_flops = 4.0 * HQ * D * S * (S + 1) / 2
        for name, backend in (() if skip_sdpa else (("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"))):
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                be = getattr(SDPBackend, backend)
                sd_inputs = []
                for (q, k, v, _, _) in inputs[:2]:
                    qh = q.view(1, S, HQ, D).transpose(1, 2)
                    kh = k.repeat_interleave(HQ // HKV, dim=1).view(1, S, HQ, D).transpose(1, 2)
                    vh = v.repeat_interleave(HQ // HKV, dim=1).view(1, S, HQ, D).transpose(1, 2)
                    sd_inputs.append((qh, kh, vh))

                def sdpa(qh, kh, vh, be=be):
                    with sdpa_kernel([be]):
                        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)

                n_it = 100 if S <= 8192 else (20 if S <= 32768 else 3)
                t = timing.bench_events(sdpa, sd_inputs, warmup=2, iters=n_it)
                row[f"sdpa_{name}_us"] = t
                row[f"sdpa_{name}_dense_tflops"] = dense_flops / (t * 1e-6) / 1e12
                row[f"speedup_vs_{name}"] = t / t_attn
                row[f"speedup_vs_{name}_incl_build"] = t / (t_attn + t_build)
                del sd_inputs
            except Exception as e:  # noqa: BLE001 - report and continue (e.g. OOM or backend unavailable)
                row[f"sdpa_{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            torch.cuda.empty_cache()
        results.append(row)
        del inputs
        torch.cuda.empty_cache()
    if hasattr(timing, "print_table"):
        cols = ["S", "topk", "attn_us", "sparse_tflops", "build_k2q_csr_us", "sdpa_cudnn_us", "speedup_vs_cudnn",
                "sdpa_flash_us", "speedup_vs_flash"]
        timing.print_table(results, cols, title="Sparse prefill, M3 shape, B=1, causal, top-16 (graph replay)")
        for r in results:
            errs = {k: v for k, v in r.items() if k.endswith("_error")}
            if errs:
                print("S", r["S"], errs)
    return results


class _LocalTiming:
    """Fallback timing for standalone runs (CUDA events, median of 20 after warm-up)."""

    @staticmethod
    def bench_events(fn, inputs_list, iters=20):
        for x in inputs_list:
            fn(*x)
        torch.cuda.synchronize()
        ts = []
        for it in range(iters):
            x = inputs_list[it % len(inputs_list)]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(*x)
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) * 1e3)
        return sorted(ts)[len(ts) // 2]

    bench_graph = bench_events


def sweep(msa, timing, cfgs, csr_chunks, S=32768):
    """Tuning: time attention (graph replay) per tile config (``tuning.override(prefill=cfg)``) and build_k2q_csr
    per chunk size (``tuning.override(csr_chunk_entries=ch)``) at one size, each checked against the first one."""
    dev = torch.device("cuda")
    q2k = m3_selection(S, HKV, TOPK, dev)
    cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
    flops = sparse_flops(q2k, S, HQ, D)
    inputs = []
    for _ in range(3):
        q = torch.randn(S, HQ, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16)
        rp, qi = msa.build_k2q_csr(q2k, cu, cu, 128, total_k=S, max_seqlen_k=S, max_seqlen_q=S)
        inputs.append((q, k, v, rp, qi))
    ref_csr = (rp.clone(), qi.clone())

    def attn(q, k, v, rp, qi):
        return msa.sparse_atten_func(q, k, v, rp, qi, TOPK, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S,
                                     max_seqlen_k=S, causal=True)

    q2ks = [(m3_selection(S, HKV, TOPK, dev, seed=s),) for s in range(3)]
    for ch in csr_chunks:
        try:
            with msa.tuning.override(csr_chunk_entries=ch):
                rp, qi = msa.build_k2q_csr(q2k, cu, cu, 128, total_k=S, max_seqlen_k=S, max_seqlen_q=S)
                same = torch.equal(rp, ref_csr[0]) and torch.equal(qi, ref_csr[1])
                t = timing.bench_graph(lambda x: msa.build_k2q_csr(x, cu, cu, 128, total_k=S, max_seqlen_k=S,
                                                                   max_seqlen_q=S), q2ks)
            print(f"CSR chunk {ch}: build {t:.0f} us, identical {same}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"CSR chunk {ch}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    ref = None
    for cfg in cfgs:
        try:
            with msa.tuning.override(prefill=cfg):
                o = attn(*inputs[0]).float()
                if ref is None:
                    ref = o
                err = (o - ref).abs().max().item()
                t = timing.bench_graph(attn, inputs)
            print(f"CFG {cfg}: attn {t:.0f} us, {flops / (t * 1e-6) / 1e12:.1f} TFLOP/s, max|d| vs first {err:.2e}",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"CFG {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import timing as _timing  # noqa: F401
    except ImportError:
        _timing = _LocalTiming()
    if os.environ.get("MSA_BENCH_SWEEP"):  # "cfg;cfg;..." [+ MSA_BENCH_CSR_CHUNKS="2048,1024"], packaged build
        from benchmark import load_package

        sweep(load_package(), _timing, os.environ["MSA_BENCH_SWEEP"].split(";"),
              [int(x) for x in os.environ.get("MSA_BENCH_CSR_CHUNKS", "2048").split(",")],
              int(os.environ.get("MSA_BENCH_SIZES", "32768")))
        sys.exit(0)
    from standalone import run_section

    run_section(run, 2, _timing)
