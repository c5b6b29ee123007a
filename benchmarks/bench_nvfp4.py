"""NVFP4 quantiser / dequantiser throughput (GPU only).

``run(msa, timing) -> list[dict]``. bf16 inputs, D = 128 (API.md §5.8 / §5.9 / §7.1):

* ``L2-fit``: ``[16384, 4, 128]`` (16 MiB): the quantise pass re-reads the input from L2;
* ``32K KV``: ``[32768, 4, 128]`` (32 MiB, one K or V of a 32K-token prefill), contiguous and as the paged
  HND view ``[256, 4, 128, 128]`` of a token-major NHD cache (strided rows);
* ``large``: ``[131072, 8, 128]`` (256 MiB, far beyond L2: both input passes come from HBM);
* ``kv pair``: ``quantize_kv_bf16_to_nvfp4_128x4(k, v)`` with K and V ``[32768, 4, 128]`` (one shared op
  call: 2 launches), and the same as two ``quantize_bf16_to_nvfp4_128x4`` calls (4 launches);
* native (Triton) and pure-PyTorch dequantisers of the 32K and large outputs.

Input sets rotate (``timing.num_sets``) so that every call starts cold (the sets together exceed 3x L2).

Bandwidth columns (``best`` = the smaller of eager and graph time):
* ``GB/s`` / ``%copy``: logical bytes (input read once + packed data + scales written) per second, and
  that rate over ``timing.COPY_BW`` (measured device copy bandwidth, read + write). Target >= 70%.
* ``GB/s(2 reads)`` / ``%copy(2 reads)``: the bytes actually moved by the two passes §5.8 needs (the
  whole-tensor amax must be known before any element is encoded, so the input is read twice: amax pass,
  then quantise pass). For an input that does not fit in L2 the logical rate is bounded by
  ``logical / traffic`` = 2.56 / 4.56 = 56% of copy bandwidth even at 100% of the traffic rate.
* ``ok``: the Triton dequantiser of the result equals the PyTorch one bit for bit (quantise rows), and
  the fused K/V call equals two single calls (kv rows). Printed, never asserted (tests assert).
"""

import importlib

import torch

D = 128


def _fn(msa, name):
    f = getattr(msa, name, None)
    if f is None:
        f = getattr(importlib.import_module(msa.__name__ + ".nvfp4"), name)
    return f


def _bytes(n_elems, rows):
    """(logical, traffic) bytes of quantising ``n_elems`` bf16 elements in ``rows`` rows of D."""
    scales = -(-rows // 128) * 128 * (D // 16)
    out = n_elems // 2 + scales
    return 2 * n_elems + out, 4 * n_elems + out


def _row(op, shape, mb, us_e, us_g, logical, traffic, copy_bw, ok=None):
    best = min(u for u in (us_e, us_g) if u is not None)
    r = {"op": op, "shape": shape, "MB in": mb, "us eager": us_e, "us graph": us_g,
         "GB/s": logical / best / 1e3, "%copy": 100 * logical / (best * 1e-6) / copy_bw, "ok": ok}
    if traffic is not None:
        r["GB/s(2 reads)"] = traffic / best / 1e3
        r["%copy(2 reads)"] = 100 * traffic / (best * 1e-6) / copy_bw
    return r


def _equal_q(a, b):
    return (torch.equal(a.data, b.data) and torch.equal(a.scale_128x4, b.scale_128x4)
            and torch.equal(a.global_scale, b.global_scale))


def run(msa, timing):
    quantize = _fn(msa, "quantize_bf16_to_nvfp4_128x4")
    quantize_kv = _fn(msa, "quantize_kv_bf16_to_nvfp4_128x4")
    native_dequant = _fn(msa, "native_nvfp4_dequant_swizzled_to_bf16")
    dequant = _fn(msa, "dequantize_nvfp4_128x4_to_bf16")
    copy_bw = getattr(timing, "COPY_BW", None) or timing.measure_copy_bandwidth()
    quick = getattr(timing, "QUICK", False)
    dev = torch.device("cuda")
    rows = []

    def quant_case(label, make, rows_, n_elems, dequant_rows=False):
        n_sets = timing.num_sets(2 * n_elems, minimum=1, maximum=16)
        sets = [(make(),) for _ in range(n_sets)]
        q = quantize(sets[0][0])
        ok = torch.equal(native_dequant(q.data, q.scale_128x4, q.global_scale).view(torch.int16),
                         dequant(q).view(torch.int16))
        us_e = timing.bench_events(quantize, sets)
        us_g = timing.bench_graph(quantize, sets)
        logical, traffic = _bytes(n_elems, rows_)
        shape = "x".join(map(str, sets[0][0].shape))
        rows.append(_row(f"quantize {label}", shape, 2 * n_elems / 1e6, us_e, us_g, logical, traffic, copy_bw, ok))
        if dequant_rows:
            qs = [(p.data, p.scale_128x4, p.global_scale) for p in (quantize(s[0]) for s in sets)]
            out_b = n_elems // 2 + -(-rows_ // 128) * 128 * (D // 16)
            us_e = timing.bench_events(native_dequant, qs)
            us_g = timing.bench_graph(native_dequant, qs)
            rows.append(_row("native dequant", shape, out_b / 1e6, us_e, us_g, out_b + 2 * n_elems, None, copy_bw))
            if n_elems <= (1 << 22) * 4 and not quick:
                us_t = timing.bench_events(dequant, [(q,)], iters=20)
                rows.append(_row("torch dequant", shape, out_b / 1e6, us_t, None, out_b + 2 * n_elems, None,
                                 copy_bw))
            del qs
        del sets, q
        torch.cuda.empty_cache()

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16)

    # L2-resident input (the quantise pass re-reads it from L2)
    quant_case("L2-fit", lambda: randn(16384, 4, D), 16384 * 4, 16384 * 4 * D)
    # 32K-token K (or V): contiguous, and the paged HND view of a token-major NHD cache
    T = 32768
    quant_case("32K KV", lambda: randn(T, 4, D), T * 4, T * 4 * D, dequant_rows=True)
    quant_case("32K KV HND view", lambda: randn(T, 4, D).view(T // 128, 128, 4, D).permute(0, 2, 1, 3),
               T * 4, T * 4 * D)
    # far beyond L2
    if not quick:
        quant_case("large", lambda: randn(131072, 8, D), 131072 * 8, 131072 * 8 * D, dequant_rows=True)

    # K and V of a 32K-token prefill: one fused call vs two single calls
    n = T * 4 * D
    n_sets = timing.num_sets(4 * n, minimum=1, maximum=16)
    kv_sets = [(randn(T, 4, D), randn(T, 4, D) * 8) for _ in range(n_sets)]
    qk, qv = quantize_kv(*kv_sets[0])
    ok = _equal_q(qk, quantize(kv_sets[0][0])) and _equal_q(qv, quantize(kv_sets[0][1]))

    def two_calls(k, v):
        return quantize(k), quantize(v)

    logical, traffic = _bytes(n, T * 4)
    for label, fn in (("quantize_kv fused", quantize_kv), ("quantize k, v (2 calls)", two_calls)):
        us_e = timing.bench_events(fn, kv_sets)
        us_g = timing.bench_graph(fn, kv_sets)
        rows.append(_row(label, f"2x{T}x4x{D}", 4 * n / 1e6, us_e, us_g, 2 * logical, 2 * traffic, copy_bw, ok))
    del kv_sets, qk, qv
    torch.cuda.empty_cache()

    timing.print_table(rows, COLUMNS,
                       title=f"NVFP4 quantise/dequantise ({timing.device_name()}, copy {copy_bw / 1e9:.0f} GB/s)")
    return rows


COLUMNS = ["op", "shape", "MB in", "us eager", "us graph", "GB/s", "%copy", "GB/s(2 reads)", "%copy(2 reads)", "ok"]
