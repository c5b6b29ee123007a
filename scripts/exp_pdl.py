"""Programmatic-dependent-launch A/B (GPU): graph-replayed decode latency at B = 1 / 8 (official paged API, 32K,
M3 shape) and the decode indexer at B = 1 / 32, with the ``pdl`` flag of the decode / block-score launch tables
off and on (``msa.tuning.override``), alternating twice so clock drift shows.

    python scripts/exp_pdl.py
"""
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import timing  # noqa: E402
import bench_runtime as br  # noqa: E402
from benchmark import load_package  # noqa: E402

msa = load_package()
tuning = importlib.import_module(msa.__name__ + ".tuning")
dev = torch.device("cuda")
print(f"# {torch.cuda.get_device_name()}  PDL supported by this Triton: "
      f"{importlib.import_module(msa.__name__ + '._launch').PDL_SUPPORTED}", flush=True)


def flags(pdl):
    return dict(decode=dict(pdl=int(pdl)), decode_scores=dict(pdl=int(pdl)))


kc = torch.randn(br.POOL_PAGES * br.BS, br.HKV, br.D, dtype=torch.bfloat16, device=dev)
k_hnd = kc.view(br.POOL_PAGES, br.BS, br.HKV, br.D).permute(0, 2, 1, 3).contiguous()
v_hnd = torch.randn_like(k_hnd)
del kc
for b in (1, 8):
    sets = br._sets(b, 38 if b == 1 else 8, dev)

    def off(q, pt, sk, idx, r2t, sid):
        return msa.sparse_decode_atten_func(q, k_hnd, v_hnd, idx, page_table=pt, seqused_k=sk, seqlen_q=1,
                                            max_seqlen_k=br.CTX)
    for pdl in (False, True, False, True):
        with tuning.override(**flags(pdl)):
            g = timing.bench_graph(off, sets)
        print(f"pdl decode B={b} pdl={int(pdl)}: {g:.2f} us graph", flush=True)
del k_hnd, v_hnd
for b, ctx in ((1, 32768), (32, 131072)):
    ik, r2t, sl, isets, _ = br.indexer_case(timing, b, ctx, dev)

    def full(q, sid):
        return msa.flash_decode_with_topk_idx(q, None, ik, None, r2t, sl, ctx, sid, br.BS, br.TOPK, 1, 2,
                                              disable_index_value=True)[1]
    for pdl in (False, True, False, True):
        with tuning.override(**flags(pdl)):
            g = timing.bench_graph(full, isets)
        print(f"pdl indexer B={b} ctx={ctx} pdl={int(pdl)}: {g:.2f} us graph", flush=True)
    del ik, r2t
