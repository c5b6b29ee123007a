"""Host-side profile of the eager decode entry points at B = 1 (GPU): wall per call and the top cProfile rows."""
import cProfile
import importlib
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from benchmark import load_package  # noqa: E402

msa = load_package()
lm = importlib.import_module(msa.__name__ + "._launch")
dk = importlib.import_module(msa.__name__ + ".decode_kernel")
import triton  # noqa: E402
from triton import knobs  # noqa: E402

dev = torch.device("cuda")
B, HQ, HKV, D, BS, P = 1, 64, 4, 128, 128, 2048
q = torch.randn(B, HQ, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(P, HKV, BS, D, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
pt = torch.randperm(P, device=dev)[:256].to(torch.int32).view(1, -1)
sk = torch.full((1,), 32768, device=dev, dtype=torch.int32)
idx = torch.randint(0, 256, (HKV, 1, 16), device=dev, dtype=torch.int32)
kc = torch.randn(P * BS, HKV, D, device=dev, dtype=torch.bfloat16)
r2t = torch.arange(32768, device=dev, dtype=torch.int32).view(1, -1)
sid = torch.zeros(1, device=dev, dtype=torch.int32)
w = msa.SparseDecodePagedAttentionWrapper().plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=32768,
                                                 q2k_indices=idx, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D)
o = torch.empty_like(q)
iq = torch.randn(1, 4, D, device=dev, dtype=torch.bfloat16)
ik = torch.randn(P * BS, 1, D, device=dev, dtype=torch.bfloat16)
scores = torch.randn(4, 1, 256, device=dev)
calls = {
    "wrapper": lambda: w.run(q, k, v, out=o),
    "indexer": lambda: msa.flash_decode_with_topk_idx(iq, None, ik, None, r2t, sk, 32768, sid, BS, 16, 1, 2,
                                                      disable_index_value=True),
    "topk": lambda: msa.native_topk_from_scores(scores, sk, BS, 16, force_local_blocks=2),
    "official": lambda: msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1,
                                                     max_seqlen_k=32768),
    "direct": lambda: msa.flash_decode_with_gqa_share_sparse(q, None, kc, kc, r2t, sk, sid, BS, idx),
    "empty": lambda: torch.empty((1, 64, 128), device=dev, dtype=torch.bfloat16),
}
print("triton", triton.__version__, "direct ok", lm._DIRECT_OK, "hooks", knobs.runtime.launch_enter_hook,
      knobs.runtime.launch_exit_hook)
_a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
_t = time.perf_counter() + 0.5
while time.perf_counter() < _t:  # GPU clocks out of idle before timing
    for _ in range(10):
        _a @ _a
    torch.cuda.synchronize()
for name, fn in calls.items():
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(500):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"{name}: host {1e6 * (t1 - t0) / 500:.1f} us/call, wall {1e6 * (t2 - t0) / 500:.1f} us/call")
print("direct ok", lm._DIRECT_OK)
for name in ("official", "wrapper", "direct", "indexer", "topk"):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        calls[name]()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
    print(name, "\n".join(line[:150] for line in s.getvalue().splitlines()[6:24]))
