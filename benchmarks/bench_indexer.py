"""Decode indexer (block scores + top-k selection) of MiniMax-M3 against a torch baseline (GPU only).

``run(msa, timing) -> list[dict]`` (``python benchmarks/benchmark.py --sections indexer``). M3 decode indexer
shapes (docs/API.md §4, §6.1): index queries
``q [B, 4, 128]`` bf16, a one-head index-key cache ``k_cache [max_slots, 1, 128]`` bf16 (token-major,
128-token pages in shuffled order through ``req_to_token``), ``block_size 128``, ``topk 16``,
``init_blocks 0``, ``local_blocks 1``, ``score_type "max"``, ``disable_index_value=True``; every request
has the full context ``L`` (so the local block is ``L / 128 - 1``). Contexts 32K and 128K, B in {1, 8, 32}
(target shape: 128K, B = 32).

Rows:
* ``ours``: ``flash_decode_with_topk_idx`` (block-max scores kernel + ``native_topk_from_scores`` with the
  local block forced), eager (CUDA events) and CUDA-graph replay;
* ``torch``: gather the index keys of every token (``k_cache[req_to_token[slot_ids]]``), one bf16 x bf16 -> fp32
  ``bmm`` per request, mask ``x >= L``, block max, local block set to ``+inf``, ``torch.topk(16)``, ``-inf`` -> ``-1``.

Columns: ``MB read`` = index keys + ``req_to_token`` entries of all ``B * L`` tokens (the bytes any
implementation must read); ``roof us`` = ``MB read`` / measured copy bandwidth (``timing.COPY_BW``,
read + write bytes per second); ``%roof`` = ``roof us`` / our best time; ``x ev`` / ``x graph`` = torch time /
our time. ``sel`` (printed, not asserted): rows ``(head, request)`` whose selected set equals the torch
baseline's; ``ties`` counts the differing rows whose differing blocks score within 1e-5 (relative) of
each other in the fp32 baseline (a tie broken the other way), ``bad`` the others.

Input sets rotate (``timing.num_sets``): each set owns its own region of the cache, so the rotation
touches more than 3x the L2 and every call reads cold index keys.
"""

import torch

HQ, HKV, D, BS, TOPK = 4, 1, 128, 128, 16


def _make(b, ctx, n_sets, dev):
    """Shared k_cache / req_to_token for ``n_sets`` sets of B requests; per set (q, slot_ids)."""
    pages_per_req = ctx // BS
    n_req = n_sets * b
    k_cache = torch.randn(n_req * ctx, HKV, D, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(n_req * pages_per_req, device=dev).view(n_req, pages_per_req)
    r2t = (perm.unsqueeze(-1) * BS + torch.arange(BS, device=dev)).view(n_req, ctx).to(torch.int32)
    seq_lens = torch.full((b,), ctx, device=dev, dtype=torch.int32)
    sets = []
    for s in range(n_sets):
        q = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16)
        slot_ids = torch.arange(s * b, (s + 1) * b, device=dev, dtype=torch.int32)
        sets.append((q, k_cache, r2t, seq_lens, slot_ids))
    return k_cache, r2t, sets


_OUT_DTYPE = [True]  # torch.bmm(..., out_dtype=fp32) available (probed once in run())


def _bmm_f32(a, b):
    """bf16 x bf16 -> fp32 (fp32 accumulation, no bf16 rounding of the scores)."""
    if _OUT_DTYPE[0]:
        return torch.bmm(a, b, out_dtype=torch.float32)  # torch >= 2.8 on CUDA
    return torch.bmm(a.float(), b.float())


def _probe_out_dtype(dev):
    z = torch.zeros(1, 1, 1, device=dev, dtype=torch.bfloat16)
    try:
        _OUT_DTYPE[0] = torch.bmm(z, z, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        _OUT_DTYPE[0] = False


def torch_select(q, k_cache, r2t, seq_lens, slot_ids, return_scores=False):
    """The torch baseline: ``topk_idx int32 [Hq, B, 16]`` (and the fp32 block scores ``[B, Hq, NB]``)."""
    b = q.shape[0]
    width = r2t.shape[1]
    nbw = width // BS
    g = HQ // HKV
    tok = r2t.index_select(0, slot_ids).long()  # [B, W]
    kg = k_cache[tok]  # [B, W, Hkv, D]
    kt = kg.permute(0, 2, 3, 1).reshape(b * HKV, D, width)  # view for Hkv = 1
    s = _bmm_f32(q.reshape(b * HKV, g, D), kt).view(b, HQ, width)
    x = torch.arange(width, device=q.device)
    s = s.masked_fill(x.view(1, 1, -1) >= seq_lens.view(-1, 1, 1), float("-inf"))
    blk = s.view(b, HQ, nbw, BS).amax(-1)  # [B, Hq, NB]
    nb = (seq_lens + BS - 1) // BS
    j = torch.arange(nbw, device=q.device)
    forced = blk.masked_fill(j.view(1, 1, -1) == (nb - 1).view(-1, 1, 1), float("inf"))
    vals, idx = torch.topk(forced, TOPK, dim=-1)
    idx = torch.where(vals == float("-inf"), torch.full_like(idx, -1), idx)
    out = idx.permute(1, 0, 2).to(torch.int32).contiguous()
    return (out, blk) if return_scores else out


def _compare(ours, ref, blk):
    """(same ordered rows, same-set rows, differing rows explained by near-ties, other differing rows, rows)."""
    ours, ref, blk = ours.cpu(), ref.cpu(), blk.cpu().permute(1, 0, 2)  # blk -> [Hq, B, NB]
    same_order = int((ours == ref).all(-1).sum())
    same_set = (ours.sort(-1).values == ref.sort(-1).values).all(-1)
    ties = bad = 0
    for h, b in (~same_set).nonzero().tolist():
        a, r = set(ours[h, b].tolist()), set(ref[h, b].tolist())
        only = sorted((a - r) | (r - a))
        sc = [float(blk[h, b, j]) if j >= 0 else float("-inf") for j in only]
        lo, hi = min(sc), max(sc)
        if all(v != float("-inf") for v in sc) and hi - lo <= 1e-5 * max(1.0, abs(hi)):
            ties += 1
        else:
            bad += 1
    return same_order, int(same_set.sum()), ties, bad, same_set.numel()


def run(msa, timing):
    dev = torch.device("cuda")
    copy_bw = getattr(timing, "COPY_BW", None) or timing.measure_copy_bandwidth()
    quick = getattr(timing, "QUICK", False)
    select = msa.flash_decode_with_topk_idx
    _probe_out_dtype(dev)
    print(f"# torch baseline matmul: {'bmm(bf16, bf16, out_dtype=fp32)' if _OUT_DTYPE[0] else 'bmm(fp32, fp32)'}")

    def ours(q, k_cache, r2t, seq_lens, slot_ids):
        return select(q, None, k_cache, None, r2t, seq_lens, int(r2t.shape[1]), slot_ids, BS, TOPK, 0, 1,
                      score_type="max", disable_index_value=True)[1]

    configs = [(32, 131072), (1, 32768)] if quick else [(b, ctx) for ctx in (32768, 131072) for b in (1, 8, 32)]
    rows = []
    for b, ctx in configs:
        read = b * ctx * (D * 2 * HKV + 4)  # index keys + req_to_token entries
        n_sets = timing.num_sets(read, minimum=1, maximum=32)
        k_cache, r2t, sets = _make(b, ctx, n_sets, dev)
        got = ours(*sets[0])
        ref, blk = torch_select(*sets[0], return_scores=True)
        same_order, same_set, ties, bad, n = _compare(got, ref, blk)
        del ref, blk
        roof = read / copy_bw * 1e6

        def iters_for(fn):  # ~0.5 s of eager timing per row, 10..200 calls
            est = timing.bench_events(fn, sets, warmup=1, iters=3)
            return int(max(10, min(200, 5e5 / max(est, 1.0))))

        o_ev = timing.bench_events(ours, sets, iters=iters_for(ours))
        o_gr = timing.bench_graph(ours, sets)
        t_ev = timing.bench_events(torch_select, sets, iters=iters_for(torch_select))
        t_gr = timing.bench_graph(torch_select, sets)
        best = min(o_ev, o_gr)
        rows.append({"B": b, "ctx": ctx, "MB read": read / 1e6, "roof us": roof, "ours ev": o_ev, "ours graph": o_gr,
                     "%roof": 100 * roof / best, "torch ev": t_ev, "torch graph": t_gr, "x ev": t_ev / o_ev,
                     "x graph": t_gr / o_gr, "sel": f"{same_set}/{n}", "order": f"{same_order}/{n}", "ties": ties,
                     "bad": bad})
        print(f"selection B={b} ctx={ctx}: ours {o_gr:.1f} us graph / {o_ev:.1f} us eager, torch {t_gr:.1f} / "
              f"{t_ev:.1f} us, roofline {roof:.1f} us; same set {same_set}/{n} (ties {ties}, bad {bad})", flush=True)
        del k_cache, r2t, sets, got
        torch.cuda.empty_cache()
    timing.print_table(rows, COLUMNS, title=f"M3 decode selection (indexer + top-{TOPK}, Hq {HQ}, index key heads "
                                            f"{HKV}, D {D}) on {timing.device_name()}, copy {copy_bw / 1e9:.0f} GB/s")
    return rows


COLUMNS = ["B", "ctx", "MB read", "roof us", "ours ev", "ours graph", "%roof", "torch ev", "torch graph", "x ev",
           "x graph", "sel", "order", "ties", "bad"]
