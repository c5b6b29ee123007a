"""NVFP4 quantiser / dequantiser throughput (GPU only).

``run(msa, timing)``: quantise a large paged KV tensor ``[P, Hkv, 128, 128]`` bf16 (contiguous and the
strided NHD->HND view) and dequantise it back (Triton ``native_nvfp4_dequant_swizzled_to_bf16``
and the pure-PyTorch ``dequantize_nvfp4_128x4_to_bf16``).

Bandwidth columns:
* ``GB/s``: logical bytes (input read once + outputs written) per second; ``%copy`` relates it to
  ``timing.COPY_BW`` (measured device copy bandwidth, read + write).
* ``GB/s(traffic)``: the quantiser reads its input twice (whole-tensor amax pass, then the quantise
  pass, as §5.8 requires); this column counts both reads.
"""

import importlib

import torch


def _fn(msa, name):
    f = getattr(msa, name, None)
    if f is None:
        f = getattr(importlib.import_module(msa.__name__ + ".nvfp4"), name)
    return f


def run(msa, timing):
    quantize = _fn(msa, "quantize_bf16_to_nvfp4_128x4")
    native_dequant = _fn(msa, "native_nvfp4_dequant_swizzled_to_bf16")
    dequant = _fn(msa, "dequantize_nvfp4_128x4_to_bf16")
    copy_bw = getattr(timing, "COPY_BW", None) or timing.measure_copy_bandwidth()
    rows = []
    for pages in (256, 2048):
        shape = (pages, 4, 128, 128)
        n = pages * 4 * 128 * 128
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        nhd = torch.randn(pages * 128, 4, 128, device="cuda", dtype=torch.bfloat16)
        hnd = nhd.view(pages, 128, 4, 128).permute(0, 2, 1, 3)
        out_bytes = n // 2 + (n // 16)
        for label, inp in (("contig", x), ("HND view", hnd)):
            us_e = timing.bench_events(quantize, [(inp,)])
            us_g = timing.bench_graph(quantize, [(inp,)])
            logical = 2 * n + out_bytes
            traffic = 4 * n + out_bytes
            best = min(us_e, us_g)
            rows.append({"op": f"quantize {label}", "shape": "x".join(map(str, shape)), "MB in": 2 * n / 1e6,
                         "us eager": us_e, "us graph": us_g, "GB/s": logical / best / 1e3,
                         "%copy": 100 * logical / (best * 1e-6) / copy_bw,
                         "GB/s(traffic)": traffic / best / 1e3,
                         "%copy(traffic)": 100 * traffic / (best * 1e-6) / copy_bw})
        q = quantize(x)
        us_e = timing.bench_events(native_dequant, [(q.data, q.scale_128x4, q.global_scale)])
        us_g = timing.bench_graph(native_dequant, [(q.data, q.scale_128x4, q.global_scale)])
        best = min(us_e, us_g)
        logical = out_bytes + 2 * n
        rows.append({"op": "native dequant", "shape": "x".join(map(str, shape)), "MB in": out_bytes / 1e6,
                     "us eager": us_e, "us graph": us_g, "GB/s": logical / best / 1e3,
                     "%copy": 100 * logical / (best * 1e-6) / copy_bw})
        if pages <= 256:
            us_t = timing.bench_events(dequant, [(q,)], iters=20)
            rows.append({"op": "torch dequant", "shape": "x".join(map(str, shape)), "MB in": out_bytes / 1e6,
                         "us eager": us_t, "GB/s": logical / us_t / 1e3,
                         "%copy": 100 * logical / (us_t * 1e-6) / copy_bw})
        del x, nhd, hnd, q
        torch.cuda.empty_cache()
    timing.print_table(rows, ["op", "shape", "MB in", "us eager", "us graph", "GB/s", "%copy", "GB/s(traffic)",
                              "%copy(traffic)"],
                       title=f"NVFP4 quantise/dequantise ({timing.device_name()}, copy {copy_bw / 1e9:.0f} GB/s)")
