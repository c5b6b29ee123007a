"""Shared test utilities: the package loaded as users load it, comparisons, poisoning."""

import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
REPO_ID = "flashrt/MiniMaxAI-msa-blackwell"
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def load_msa():
    """``get_kernel`` through ``LOCAL_KERNELS`` (offline), exactly as users load the Hub package.

    ``MSA_TEST_SOURCE_TREE=1`` is a developer shortcut that imports ``torch-ext/msa_blackwell``
    without a build (no native ops); CI sets it only for the newest-Triton subset (scripts/test_next_triton.sh).
    """
    if os.environ.get("MSA_TEST_SOURCE_TREE") == "1":
        import importlib
        import sys

        sys.path.insert(0, str(REPO / "torch-ext"))
        return importlib.import_module("msa_blackwell")
    import kernels

    os.environ.setdefault("LOCAL_KERNELS", f"{REPO_ID}={REPO}")
    return kernels.get_kernel(REPO_ID, version=1)


msa = load_msa()


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or a sentinel (ints) so unwritten outputs are caught."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-12345)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().flatten()
    b = b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    return float((a @ b) / (na * nb).clamp_min(1e-300))


def assert_close_attn(out, ref, *, atol=1e-2, min_cos=0.9999, what="output"):
    """The project gate: cosine >= 0.9999 and max-abs <= atol against the float64 reference."""
    out_d = out.double().cpu()
    ref_d = ref.double().cpu()
    assert out_d.shape == ref_d.shape, f"{what}: shape {tuple(out_d.shape)} != {tuple(ref_d.shape)}"
    assert torch.isfinite(out_d).all(), f"{what}: non-finite values"
    err = (out_d - ref_d).abs().max().item() if out_d.numel() else 0.0
    cos = cosine(out_d, ref_d)
    assert err <= atol, f"{what}: max-abs {err:.3e} > {atol}"
    assert cos >= min_cos, f"{what}: cosine {cos:.6f} < {min_cos}"


def assert_lse_close(lse, ref, *, atol=1e-3, rtol=1e-3):
    """Finite entries within atol/rtol; empty rows exactly -inf."""
    lse = lse.double().cpu()
    ref = ref.double().cpu()
    inf_ref = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), inf_ref), "LSE -inf pattern differs from the reference"
    fin = ~inf_ref
    torch.testing.assert_close(lse[fin], ref[fin], atol=atol, rtol=rtol)


def random_index_row(nb: int, topk: int, kind: str) -> torch.Tensor:
    """One index row of ``topk`` block ids for a request with ``nb`` blocks.

    kind "valid": distinct valid ids, -1 padded; anything else: adversarial ids in [-2, nb + 3)
    (negatives, out-of-range and duplicates anywhere).
    """
    if kind == "valid":
        r = torch.randperm(max(nb, 1))[:topk]
        return torch.cat([r, torch.full((topk - r.numel(),), -1)]) if r.numel() < topk else r
    return torch.randint(-2, nb + 3, (topk,))



def owner_ref(cu_q, t):
    """The query-row owner rule of docs/POLICIES.md section 1 in plain Python: the request a binary search over
    ``cu_q`` (a list of B + 1 ints) finds for row ``t`` (probe ``mid = (lo + hi + 1) // 2`` over ``[0, B]``, go
    right iff ``cu_q[mid] <= t``), if that request's range holds ``t``; else None (the row has no owner)."""
    B = len(cu_q) - 1
    lo, hi = 0, B
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cu_q[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo < B and cu_q[lo] <= t < cu_q[lo + 1] else None

# ---- generic helpers for compile / CUDA-graph tests (tests/test_compile.py, tests/test_cuda_graph.py) ----

GRAPH_STEPS = int(os.environ.get("MSA_GRAPH_STEPS", "4"))  # replays per graph test (scripts/sanitize.sh uses fewer)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bitwise_equal(got, want, what="output"):
    """Recursively compare tensors (and tuples / lists / None / dataclasses / scalars) bit for bit.

    Floating tensors are compared through an integer view, so NaN payloads, -0.0 and -inf count.
    """
    import dataclasses

    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{what}: {type(got).__name__} is not a tensor"
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert got.device == want.device, f"{what}: device {got.device} != {want.device}"
        a, b = got.detach().contiguous(), want.detach().contiguous()
        if a.dtype.is_floating_point or a.dtype.is_complex or a.element_size() == 1:
            a, b = a.view(_INT_VIEW[a.element_size()]), b.view(_INT_VIEW[b.element_size()])
        if not torch.equal(a, b):
            bad = (a != b).nonzero()
            raise AssertionError(f"{what}: {bad.shape[0]} of {a.numel()} elements differ, first at "
                                 f"{tuple(bad[0].tolist())}: {got[tuple(bad[0])]} vs {want[tuple(bad[0])]}")
    elif isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), f"{what}: structure differs"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_bitwise_equal(g, w, f"{what}[{i}]")
    elif dataclasses.is_dataclass(want) and not isinstance(want, type):
        assert type(got) is type(want), f"{what}: {type(got).__name__} != {type(want).__name__}"
        for f in dataclasses.fields(want):
            assert_bitwise_equal(getattr(got, f.name), getattr(want, f.name), f"{what}.{f.name}")
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


def capture_cuda_graph(fn, *, warmup=1):
    """Warm ``fn`` up on a side stream (settles autotuning / lazy init), then capture one call.

    Returns ``(graph, result)``: ``result`` is what the captured call returned; its tensors live in the
    graph's memory pool and are rewritten by every ``graph.replay()``.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    torch.cuda.synchronize()
    return graph, result


def replay_steps(graph, outs, refill, check, eager, steps=None):
    """Per step (``1 .. GRAPH_STEPS`` unless ``steps`` is given): new metadata (``refill(step)``), poisoned
    outputs, replay, ``check(what)`` against float64, and the outputs bit for bit against ``eager()`` (the same
    kernels and launch policy, run eagerly). ``outs``: the tensors the captured call wrote (``graph``'s pool)."""
    for step in range(1, GRAPH_STEPS + 1) if steps is None else steps:
        refill(step)
        for t in outs:
            poison_like(t)
        graph.replay()
        torch.cuda.synchronize()
        what = f"replay {step}"
        check(what)
        assert_bitwise_equal(tuple(outs), tuple(eager()), f"{what} vs eager")
