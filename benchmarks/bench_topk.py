"""Native top-k from block scores vs ``torch.topk`` (GPU only).

``run(msa, timing) -> list[dict]``. Shapes ``[4, B, nblocks]`` fp32, B in {1, 8, 64}, nblocks in
{256, 1024, 8192}, k = 16, block size 128, every block valid (seq_lens = nblocks * 128).

Columns:
* ``ours ev`` / ``ours graph``: ``native_topk_from_scores`` (the CUDA op when built), eager with CUDA events
  and as CUDA-graph replays (µs per call);
* ``topk ev`` / ``topk graph``: plain ``torch.topk(score, 16, dim=-1)`` on the same inputs (no masking, no
  padding: a lower bound of what a torch implementation costs);
* ``x ev`` / ``x graph``: speedup torch.topk / ours (target >= 3 for nblocks >= 1024; ours <= 5 µs eager at
  [4, 64, 1024]);
* ``fallback ev``: the package's own pure-PyTorch path (``topk_from_scores_torch``), for reference.

Input sets rotate (``timing.num_sets``) so that their total exceeds the L2 and every call reads cold scores.
"""

import importlib

import torch

H, K, BS = 4, 16, 128


def run(msa, timing):
    dev = torch.device("cuda")
    topk_mod = importlib.import_module(msa.__name__ + ".topk")
    fallback = topk_mod.topk_from_scores_torch
    quick = getattr(timing, "QUICK", False)
    rows = []
    for nb in (256, 1024, 8192):
        for b in (1, 8, 64):
            n_sets = timing.num_sets(H * b * nb * 4)
            sets = []
            for _ in range(n_sets):
                score = torch.randn(H, b, nb, device=dev)
                seq_lens = torch.full((b,), nb * BS, dtype=torch.int32, device=dev)
                sets.append((score, seq_lens))

            def ours(s, sl):
                return msa.native_topk_from_scores(s, sl, BS, K)

            def ref(s, sl):
                return torch.topk(s, K, dim=-1)

            def fb(s, sl):
                return fallback(s, sl, BS, K)

            # sanity: same selection as torch.topk on distinct random scores
            got = ours(*sets[0])
            want = torch.topk(sets[0][0], K, dim=-1).indices.to(torch.int32)
            assert torch.equal(got, want), f"top-k mismatch at [{H}, {b}, {nb}]"

            o_ev = timing.bench_events(ours, sets)
            o_gr = timing.bench_graph(ours, sets)
            t_ev = timing.bench_events(ref, sets)
            t_gr = timing.bench_graph(ref, sets)
            f_ev = None if quick else timing.bench_events(fb, sets, iters=50)
            rows.append({
                "shape": f"{H}x{b}x{nb}",
                "k": K,
                "native": bool(msa.has_native_ops()),
                "ours ev": o_ev,
                "ours graph": o_gr,
                "topk ev": t_ev,
                "topk graph": t_gr,
                "x ev": t_ev / o_ev,
                "x graph": t_gr / o_gr,
                "fallback ev": f_ev,
            })
    timing.print_table(rows, COLUMNS, title=f"top-k from scores (k={K}) on {timing.device_name()}")
    return rows


COLUMNS = ["shape", "k", "native", "ours ev", "ours graph", "topk ev", "topk graph", "x ev", "x graph",
           "fallback ev"]
