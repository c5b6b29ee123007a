"""PDL A/B (GPU): decode latency B = 1 / 8 (official paged, 32K, M3) and the decode indexer B = 1 / 32 with the
programmatic-dependent-launch flag of the decode / score configs off and on (graph replay, rotated sets)."""
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import timing  # noqa: E402
import bench_runtime as br  # noqa: E402
from benchmark import load_package  # noqa: E402

msa = load_package()
dk = importlib.import_module(msa.__name__ + ".decode_kernel")
dec = importlib.import_module(msa.__name__ + ".decode")
ix = importlib.import_module(msa.__name__ + ".indexer")
dev = torch.device("cuda")
major = torch.cuda.get_device_capability()[0]
kc = torch.randn(br.POOL_PAGES * br.BS, br.HKV, br.D, dtype=torch.bfloat16, device=dev)
k_hnd = kc.view(br.POOL_PAGES, br.BS, br.HKV, br.D).permute(0, 2, 1, 3).contiguous()
v_hnd = torch.randn_like(k_hnd)
del kc
base_dec = dict(dk.DECODE_CONFIGS[major])
base_sc = dict(ix.decode_score_config(major))
for b in (1, 8):
    sets = br._sets(b, 38 if b == 1 else 8, dev)

    def off(q, pt, sk, idx, r2t, sid):
        return msa.sparse_decode_atten_func(q, k_hnd, v_hnd, idx, page_table=pt, seqused_k=sk, seqlen_q=1,
                                            max_seqlen_k=br.CTX)
    for pdl in (False, True, False, True):
        dk.DECODE_CONFIGS[major] = dict(base_dec, pdl=pdl)
        dk.make_plan.cache_clear()
        dec._SIG.clear()
        g = timing.bench_graph(off, [s for s in sets])
        print(f"pdl decode B={b} pdl={pdl}: {g:.2f} us graph", flush=True)
dk.DECODE_CONFIGS[major] = base_dec
dk.make_plan.cache_clear()
dec._SIG.clear()
for b, ctx in ((1, 32768), (32, 131072)):
    ik, r2t, sl, isets, _ = br.indexer_case(timing, b, ctx, dev)

    def full(q, sid):
        return msa.flash_decode_with_topk_idx(q, None, ik, None, r2t, sl, ctx, sid, br.BS, br.TOPK, 1, 2,
                                              disable_index_value=True)[1]
    for pdl in (False, True, False, True):
        ix.DECODE_SCORE_CONFIGS[major] = dict(base_sc, pdl=pdl)
        g = timing.bench_graph(full, isets)
        print(f"pdl indexer B={b} ctx={ctx} pdl={pdl}: {g:.2f} us graph", flush=True)
    ix.DECODE_SCORE_CONFIGS[major] = base_sc
    del ik, r2t
