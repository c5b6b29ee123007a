"""``build_k2q_csr`` (KV-major CSR builder, docs/API.md §5.3) on the MiniMax-M3 selection (GPU only).

``run(msa, timing) -> list[dict]``. Selection as ``bench_prefill`` (``m3_selection``: per KV group and run of
64 tokens, the local block of each token plus 15 random distinct earlier blocks), Hkv = 4, top-16:

* B = 1, S in {4K, 32K, 128K} (a prefill chunk of one request);
* B = 8 requests of S / 8 tokens each (varlen: batch-local ids, 8 interleaved level-major row maps).

Columns: ``ev`` eager time with CUDA events, ``graph`` CUDA-graph replay (µs per call; input sets rotate,
``timing.num_sets``), ``entries`` = Hkv * total_q * topK, ``Gentry/s`` = entries / graph time, and ``same`` =
bit-identical to the first measured chunk size (always True: the output does not depend on it).

Env (read by this benchmark only): ``MSA_BENCH_SIZES`` (default ``4096,32768,131072``); ``MSA_BENCH_CSR_CHUNKS``
(e.g. ``1024,2048``) adds one row per chunk size, timed inside ``msa.tuning.override(csr_chunk_entries=...)``
(default: the table's size only). ``python benchmarks/bench_csr.py`` runs it standalone on the source tree.
"""

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_prefill import HKV, TOPK, m3_selection  # noqa: E402

BS = 128


def _inputs(S: int, batch: int, n_sets: int, dev):
    """``n_sets`` argument tuples ``(q2k, cu_q, cu_k)`` of ``batch`` equal requests of ``S // batch`` tokens."""
    per = S // batch
    cu = torch.arange(0, batch + 1, device=dev, dtype=torch.int32) * per
    sets = []
    for s in range(n_sets):
        q2k = torch.cat([m3_selection(per, HKV, TOPK, dev, seed=s * batch + b) for b in range(batch)], dim=1)
        sets.append((q2k.contiguous(), cu, cu))
    return sets, per


def run(msa, timing):
    dev = torch.device("cuda")
    sizes = [int(x) for x in os.environ.get("MSA_BENCH_SIZES", "4096,32768,131072").split(",")]
    chunks = [int(x) for x in os.environ.get("MSA_BENCH_CSR_CHUNKS", "").split(",") if x.strip()] or [None]
    rows = []
    for S in sizes:
        for batch in (1, 8):
            n_sets = timing.num_sets(HKV * S * TOPK * 4 * 3)  # q2k read + ~2x its size of CSR written
            sets, per = _inputs(S, batch, n_sets, dev)

            def build(q2k, cu_q, cu_k):
                return msa.build_k2q_csr(q2k, cu_q, cu_k, BS, total_k=S, max_seqlen_k=per, max_seqlen_q=per)

            first = None
            for ch in chunks:
                with msa.tuning.override(csr_chunk_entries=ch) if ch else contextlib.nullcontext():
                    out = build(*sets[0])
                    first = first or out
                    same = all(torch.equal(a, b) for a, b in zip(out, first))
                    ev = timing.bench_events(build, sets)
                    gr = timing.bench_graph(build, sets)
                entries = HKV * S * TOPK
                rows.append({"bench": "csr", "S": S, "B": batch, "chunk": ch or "table", "ev": ev, "graph": gr,
                             "entries": entries, "Gentry/s": entries / (gr * 1e-6) / 1e9, "same": same})
            del sets
    timing.print_table(rows, ["S", "B", "chunk", "ev", "graph", "entries", "Gentry/s", "same"],
                       title="build_k2q_csr, M3 selection (Hkv 4, top-16), µs per call")
    return rows


if __name__ == "__main__":
    from standalone import run_section

    run_section(run, 3)
