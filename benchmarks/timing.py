"""Timing helpers shared by the benchmark sections (GPU only).

- ``bench_events(fn, inputs)``: eager median, CUDA events around each call, rotating input sets.
- ``bench_graph(fn, inputs)``: one CUDA graph that replays ``fn`` over every input set in turn;
  median per call over many replays (launch gaps shrink to graph-node gaps).
- ``bench_wall(fn, inputs)``: host wall clock per eager call incl. launch overhead (synchronised).
- ``measure_copy_bandwidth()``: a large device-to-device copy, bytes read + written per second.
- ``measure_matmul_tflops()``: an 8192^3 bf16 matmul on random data.

Rotating input sets keeps them cold: give enough sets that their total exceeds the L2 (50 MB on H100).
"""

import statistics
import time

import torch

_L2_FLUSH = None


def _flush_l2():
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _L2_FLUSH.zero_()


def device_name() -> str:
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)"


def _event_us(fn, *args) -> float:
    """µs between CUDA events recorded around ``fn(*args)`` (waits for the end event)."""
    s = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    s.record()
    fn(*args)
    e.record()
    e.synchronize()
    return s.elapsed_time(e) * 1e3


def _wall_us(fn, *args) -> float:
    """Host wall-clock µs of ``fn(*args)`` followed by a device synchronize."""
    t0 = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6


def _median_eager(fn, inputs, warmup, iters, timed) -> float:
    """``warmup`` calls, a synchronize, then the median of ``timed(fn, *inputs[i % len(inputs)])`` (µs) over
    ``iters`` eager calls."""
    n = len(inputs)
    for i in range(warmup):
        fn(*inputs[i % n])
    torch.cuda.synchronize()
    return statistics.median([timed(fn, *inputs[i % n]) for i in range(iters)])


def bench_events(fn, inputs, *, warmup=5, iters=200, flush=False) -> float:
    """Median µs per eager call; ``fn(*inputs[i % len(inputs)])``."""

    def timed(f, *args):
        if flush:
            _flush_l2()
        return _event_us(f, *args)

    return _median_eager(fn, inputs, warmup, iters, timed)


def bench_wall(fn, inputs, *, warmup=5, iters=200) -> float:
    """Median host wall-clock µs per eager call (call + synchronize): what a non-graphed caller sees."""
    return _median_eager(fn, inputs, warmup, iters, _wall_us)


def bench_graph(fn, inputs, *, replays=30, warmup=2) -> float:
    """Median µs per call from CUDA-graph replays of ``fn`` over all input sets (one graph, len(inputs) calls)."""
    n = len(inputs)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n):
            fn(*inputs[i])
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            fn(*inputs[i])
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = [_event_us(g.replay) / n for _ in range(replays)]
    del g
    return statistics.median(times)


def num_sets(bytes_per_set: int, *, minimum=4, maximum=64, l2_multiple=3) -> int:
    """How many input sets make the rotation exceed ``l2_multiple`` x L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    need = (l2_multiple * l2 + bytes_per_set - 1) // max(1, bytes_per_set)
    return int(max(minimum, min(maximum, need)))


def measure_copy_bandwidth(nbytes=1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = bench_events(lambda: b.copy_(a), [()], warmup=3, iters=20)
    return 2 * a.numel() / (us * 1e-6)


def measure_matmul_tflops(n=8192) -> float:
    """bf16 matmul rate in TFLOP/s on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    us = bench_events(lambda: a @ b, [()], warmup=3, iters=10)
    return 2 * n**3 / (us * 1e-6) / 1e12


def print_table(rows, columns, title=None):
    """Fixed-width table of dict rows."""
    if title:
        print(f"\n## {title}")
    if not rows:
        print("(no rows)")
        return
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.rjust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)
