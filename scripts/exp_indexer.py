"""Decode-indexer experiment (GPU): score kernel alone, top-k alone, full call; sweep of the score launch table
(``msa.tuning.override(decode_scores=...)``)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_runtime  # noqa: E402
import timing  # noqa: E402
from benchmark import load_package  # noqa: E402

msa = load_package()
dev = torch.device("cuda")
BS, TOPK, D = 128, 16, 128
copy_bw = timing.measure_copy_bandwidth()
print(timing.device_name(), f"copy {copy_bw / 1e12:.2f} TB/s")


for b, ctx in ((1, 32768), (32, 131072)):
    ik, r2t, sl, sets, read = bench_runtime.indexer_case(timing, b, ctx, dev)
    NB = ctx // BS
    scale = D ** -0.5

    def score(q, sid):
        return msa.decode_block_scores(q, ik, r2t, sl, sid, NB, BS, sm_scale=scale)

    def full(q, sid):
        return msa.flash_decode_with_topk_idx(q, None, ik, None, r2t, sl, ctx, sid, BS, TOPK, 1, 2,
                                              disable_index_value=True)[1]
    sc = torch.randn(4, b, NB, device=dev)
    topk = lambda q, sid: msa.native_topk_from_scores(sc, sl, BS, TOPK, force_local_blocks=2)  # noqa: E731
    for name, fn in (("full", full), ("score", score), ("topk", topk)):
        g = timing.bench_graph(fn, sets)
        print(f"B={b} ctx={ctx} {name}: {g:.2f} us graph, {100 * read / (g * 1e-6) / copy_bw:.1f}% copy", flush=True)
    # B = 1 at 32K: every entry gives one tile per program (the plan cannot change), so only B = 32 is swept
    variants = [] if b == 1 else [dict(tn={128: tn}, progs_per_sm=pps, num_stages=ns, num_warps=nw)
                                  for tn in (64, 128) for pps in (4, 8) for ns in (3, 4) for nw in (4, 8)]
    for cfg in variants:
        try:
            with msa.tuning.override(decode_scores=cfg):
                g = timing.bench_graph(score, sets, replays=10)
        except Exception as e:  # noqa: BLE001
            print("fail", cfg, str(e)[:100])
            continue
        print(f"sweep B={b} {cfg}: {g:.2f} us {100 * read / (g * 1e-6) / copy_bw:.1f}%", flush=True)
    del ik, r2t, sets
