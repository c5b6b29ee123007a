"""Benchmarks of msa_blackwell.

Two entry points:

* ``kernels benchmark ./`` (or the Hub repo id) discovers the ``Benchmark`` subclass below: eager
  host-timed calls of the M3-shaped decode and top-k, each verified against a torch reference.
* ``python benchmarks/benchmark.py [--sections topk,decode,prefill,indexer] [--quick]``: the project's
  roofline tables (CUDA events and CUDA-graph replay, cold inputs rotated past L2, measured copy
  bandwidth / matmul rate, card named). Sections live in ``bench_<name>.py`` next to this file.
"""

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

try:
    from kernels.benchmark import Benchmark
except ImportError:  # kernels without the benchmark extra: keep the script usable
    class Benchmark:  # type: ignore[no-redef]
        seed = None
        device = "cpu"

        def __init__(self):
            self.kernel = None
            self.out = None

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REPO_ID = "flashrt/MiniMaxAI-msa-blackwell"
# section name -> module (and function, default ``run``), where not bench_<name>.run
SECTION_MODULES = {"latency": "bench_runtime:run_latency", "runtime_base": "bench_runtime:run_base"}


class MsaDecodeBenchmark(Benchmark):
    """M3 decode shape (Hq 64, Hkv 4, D 128, top-16 of 128-token pages), B = 8, bf16."""

    seed = 0

    def setup_decode(self):
        B, Hq, Hkv, D, topk, pages_per_req = 8, 64, 4, 128, 16, 256
        dev = self.device
        self.q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16)
        self.k = torch.randn(B * pages_per_req, Hkv, 128, D, device=dev, dtype=torch.bfloat16)
        self.v = torch.randn_like(self.k)
        self.page_table = torch.randperm(B * pages_per_req, device=dev, dtype=torch.int64).to(torch.int32).view(B, -1)
        self.seqused_k = torch.full((B,), pages_per_req * 128, device=dev, dtype=torch.int32)
        ids = torch.stack([torch.randperm(pages_per_req - 1, device=dev)[: topk - 1] for _ in range(Hkv * B)])
        local = torch.full((Hkv * B, 1), pages_per_req - 1, device=dev)
        self.q2k = torch.cat([ids, local], 1).to(torch.int32).view(Hkv, B, topk).contiguous()

    def benchmark_decode(self):
        self.out = self.kernel.sparse_decode_atten_func(
            self.q, self.k, self.v, self.q2k, page_table=self.page_table, seqused_k=self.seqused_k,
            seqlen_q=1, max_seqlen_k=int(self.page_table.shape[1]) * 128, blk_kv=128)

    def verify_decode(self):
        B, Hq, D = self.q.shape
        Hkv = self.k.shape[1]
        G = Hq // Hkv
        outs = []
        for b in range(B):
            heads = []
            for g in range(Hkv):
                pages = self.page_table[b, self.q2k[g, b].long()].long()
                kk = self.k[pages, g].reshape(-1, D).float()
                vv = self.v[pages, g].reshape(-1, D).float()
                qq = self.q[b, g * G:(g + 1) * G].float()
                p = torch.softmax(qq @ kk.T * D ** -0.5, -1)
                heads.append(p @ vv)
            outs.append(torch.cat(heads, 0))
        return torch.stack(outs).to(self.q.dtype)

    def setup_topk(self):
        self.scores = torch.randn(4, 64, 1024, device=self.device, dtype=torch.float32)
        self.lens = torch.randint(1, 1024 * 128, (64,), device=self.device, dtype=torch.int32)

    def benchmark_topk(self):
        self.out = self.kernel.native_topk_from_scores(self.scores, self.lens, 128, 16)

    def verify_topk(self):
        nb = (self.lens.long() + 127) // 128
        ar = torch.arange(self.scores.shape[-1], device=self.scores.device)
        s = self.scores.masked_fill(ar.view(1, 1, -1) >= nb.view(1, -1, 1), float("-inf"))
        vals, idx = torch.topk(s, 16, dim=-1)
        return torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx).to(torch.int32)


def load_package():
    os.environ.setdefault("LOCAL_KERNELS", f"{REPO_ID}={REPO}")
    import kernels

    return kernels.get_kernel(REPO_ID, version=1, trust_remote_code=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="msa_blackwell roofline benchmarks (GPU)")
    ap.add_argument("--sections", default="topk,decode,prefill,indexer")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA GPU; nothing to time here")
        return 0
    sys.path.insert(0, str(HERE))
    timing = importlib.import_module("timing")
    msa = load_package()
    print(f"# msa_blackwell benchmarks on {timing.device_name()}")
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, date {time.strftime('%Y-%m-%d')}")
    bw = timing.measure_copy_bandwidth()
    tf = timing.measure_matmul_tflops()
    print(f"# measured device-to-device copy: {bw / 1e12:.2f} TB/s (read+write); bf16 matmul: {tf:.0f} TFLOP/s")
    timing.COPY_BW = bw
    timing.MATMUL_TFLOPS = tf
    timing.QUICK = args.quick
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        mod_name, _, fn_name = SECTION_MODULES.get(name, f"bench_{name}").partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            print(f"\n## {name}: section not available ({e})")
            continue
        getattr(mod, fn_name or "run")(msa, timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
