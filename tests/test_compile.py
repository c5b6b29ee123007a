"""Custom-op registration and torch.compile coverage (API.md 3.6, 3.7).

* ``test_op_inventory``: the ops registered under the package's op namespace (the namespace of
  ``_registry.add_op_namespace_prefix``; found through the dispatcher and cross-checked against the
  ``CustomOpDef`` objects of the package modules) must equal ``EXPECTED_OPS``. A new op therefore
  fails this test until it gets an opcheck case in ``OPCHECK_CASES`` below.
* ``test_opcheck[<op>]``: ``torch.library.opcheck`` (schema, autograd registration, fake tensor, AOT
  dispatch with dynamic shapes) on every op with small valid inputs, adversarial ids included:
  fp16/fp32 on CPU through the Triton interpreter, bf16 (and fp8 KV) on a GPU.
* ``test_compile_*``: ``torch.compile(fullgraph=True)`` over every public entry point that launches a
  kernel, compared bit for bit with the eager call (the same kernels run). A recording backend checks
  that dynamo produced exactly one graph and that the package's op is a node of it (the kernel launch is
  opaque to dynamo, not traced through). Backend: ``aot_eager`` on CPU (fullgraph still catches every
  graph break), ``inductor`` on a GPU. ``test_public_surface_covered`` ties ``__all__`` to these tests.

Shapes are tiny: the CPU part must stay well under two minutes on a loaded 2-core machine.
"""

import importlib
import sys
import warnings

import pytest
import torch
from torch.library import opcheck

from .helpers import assert_bitwise_equal, msa
from .test_csr import make_case as csr_case
from .test_decode import make_problem as decode_problem
from .test_decode_direct import make_direct
from .test_fp4_indexer import _make_case as fp4_case
from .test_fp4_indexer import _preorder
from .test_prefill import make_inputs as prefill_inputs
from .test_prefill import to_paged
from .test_topk import make_inputs as topk_inputs

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

NS = msa._registry.add_op_namespace_prefix("x").split("::")[0]
csr_mod = importlib.import_module(msa.__name__ + ".csr")
dec_mod = importlib.import_module(msa.__name__ + ".decode")
ix_mod = importlib.import_module(msa.__name__ + ".indexer")
fx_mod = importlib.import_module(msa.__name__ + ".fp4_indexer")
kern_mod = importlib.import_module(msa.__name__ + ".decode_kernel")

# Triton-backed custom ops (torch.library.custom_op, always registered).
TRITON_OPS = {
    "build_k2q_csr",
    "k2q_to_q2k",
    "sparse_decode_fwd",
    "sparse_decode_fwd_out",
    "sparse_prefill_fwd",
    "sparse_prefill_nvfp4_fwd",
    "fp4_indexer_block_scores",
    "decode_block_scores",
    "nvfp4_quantize_128x4",
    "nvfp4_dequant_swizzled_to_bf16",
}
# C++/CUDA ops of the compiled extension (TORCH_LIBRARY_EXPAND; only in a built variant, CUDA kernels only).
NATIVE_OPS = {"msa_topk_from_scores", "msa_topk_from_scores_forced"}
EXPECTED_OPS = TRITON_OPS | NATIVE_OPS


def _registered_ops():
    """Op names (without namespace) that the dispatcher knows under this build's namespace."""
    prefix = NS + "::"
    return {n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}


def _custom_op_defs():
    """``CustomOpDef`` objects defined at module level in the package's modules."""
    from torch._library.custom_ops import CustomOpDef

    found = {}
    pkg = msa.__name__
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == pkg or name.startswith(pkg + ".")):
            continue
        for obj in vars(mod).values():
            if isinstance(obj, CustomOpDef):
                found[obj._qualname] = obj
    return found


def _op(name):
    """The default overload of one of the package's ops."""
    return getattr(getattr(torch.ops, NS), name).default


@pytest.fixture
def dt(device):
    """Attention dtype: fp16 under the interpreter (its bf16 is wrong), bf16 on a GPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# inventory
# ------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
def test_op_inventory():
    registered = _registered_ops()
    want = TRITON_OPS | (NATIVE_OPS if msa.has_native_ops() else set())
    assert registered == want, (f"ops under {NS}: new (add an opcheck case and a compile test): "
                                f"{sorted(registered - want)}; missing: {sorted(want - registered)}")
    assert set(OPCHECK_CASES) == EXPECTED_OPS, "every expected op needs an opcheck case"
    defs = _custom_op_defs()
    assert {q.split("::", 1)[1] for q in defs} == TRITON_OPS, sorted(defs)
    assert all(q.startswith(NS + "::") for q in defs), sorted(defs)
    # every op has a fake (meta) implementation for torch.compile
    from torch._library.simple_registry import singleton

    for name in registered:
        assert singleton.find(f"{NS}::{name}").fake_impl.kernel is not None, f"{name} has no fake implementation"


# ------------------------------------------------------------------------------------------------
# opcheck: one or more argument tuples per op (op name -> builder(device, dtype) -> [(label, args)])
# ------------------------------------------------------------------------------------------------


def _all_cases(device):
    """Every opcheck case on a GPU; under the (slow) interpreter one case per op plus cheap extras. The
    CPU-skipped variants (dense / paged / no-global-scale / seqlen_q > 1) still run through the interpreter
    in the compile tests below and in the per-op test files."""
    return device.type == "cuda"


def _case_build_k2q_csr(device, dtype):
    # ids in [-2, nb + 3): negatives, out of range and duplicates; non-contiguous q2k
    q2k, cu_q, cu_k = csr_case([6, 0, 3], [300, 40, 130], 2, 3, device=device)
    total_k = int(cu_k[-1])
    rows = csr_mod.default_total_rows(total_k, 3)
    cases = [("as_is", (q2k, cu_q, cu_k, rows, csr_mod.max_kv_blocks_bound(None, total_k)), None),
             ("rows_cut", (q2k, cu_q, cu_k, 2, 1), None)]
    if device.type == "cpu" and csr_mod.interpreter_active():
        cases.append(("triton_on_cpu", (q2k, cu_q, cu_k, rows, 3), "force_triton"))
    return cases


def _case_k2q_to_q2k(device, dtype):
    q2k, cu_q, cu_k = csr_case([5, 2], [260, 129], 2, 3, device=device)
    rp, qi = msa.build_k2q_csr(q2k, cu_q, cu_k, 128, total_k=int(cu_k[-1]))
    return [("roundtrip", (rp, qi, cu_q, cu_k, 7, 3), None)]


def _case_sparse_decode_fwd(device, dtype):
    q, k, v, idx, pt, sk = decode_problem([200, 0, 129], hkv=2, g=4, topk=3, dtype=dtype, device=device)
    hnd = kern_mod.LAYOUT_HND
    out = [("hnd_sparse_lse", (q, k, v, idx, pt, sk, None, None, hnd, 128, 1, True, 128 ** -0.5, 3, True), None)]
    if _all_cases(device):
        out.append(("hnd_dense", (q, k, v, None, pt, sk, None, None, hnd, 128, 1, True, 128 ** -0.5, 3, False), None))
        q2, k2, v2, idx2, pt2, sk2 = decode_problem([130, 3], hkv=1, g=2, sq=2, topk=3, dtype=dtype, device=device)
        out.append(("hnd_mtp_noncausal", (q2, k2, v2, idx2, pt2, sk2, None, None, hnd, 128, 2, False, 0.1, 2, True),
                    None))
    p = make_direct([200, 0, 70], hkv=2, g=2, topk=3, dtype=dtype, device=device, idx_dtype=torch.int64)
    qd, kd, vd, r2t, sl, sid, tidx = p
    sink = torch.randn(4, 64, device=device)
    out.append(("token_major_sink", (qd, kd, vd, tidx, r2t, sl, sid, sink, kern_mod.LAYOUT_TOKEN, 64, 1, True, 0.125,
                                     0, False), None))
    if device.type == "cuda":
        f8 = torch.float8_e4m3fn
        out.append(("hnd_fp8_kv", (q, k.to(f8), v.to(f8), idx, pt, sk, None, None, hnd, 128, 1, True, 128 ** -0.5, 3,
                                   True), None))
    return out


def _case_sparse_decode_fwd_out(device, dtype):
    q, k, v, idx, pt, sk = decode_problem([300, 129], hkv=2, g=4, topk=4, dtype=dtype, device=device)
    w = msa.SparseDecodePagedAttentionWrapper().plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=300,
                                                     q2k_indices=idx, num_qo_heads=8, num_kv_heads=2, head_dim=128)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=device)
    # mutates out / lse and the split workspaces (counter is left zeroed by the kernel): opcheck covers mutation
    args = (q, k, v, idx, pt, sk, out, lse, w.O_partial, w._ml_partial, w._counter, 1, True, 128 ** -0.5,
            w._hint_blocks, True, 0, 0)
    forced_split = (q, k, v, None, pt, sk, out, lse, w.O_partial, w._ml_partial, w._counter, 1, True, 128 ** -0.5,
                    w._hint_blocks, True, 1 << 30, 0)
    return [("planned", args, None), ("dense_no_split", forced_split, None)]


def _nvfp4_paged_kv(k, v):
    """Packed NVFP4 pages ``[P, Hkv, 128, 64]`` + flat scale bytes + global scales (the kernel's arguments)."""
    kq, vq = msa.quantize_kv_bf16_to_nvfp4_128x4(k, v)
    return kq, vq, (kq.data, vq.data, kq.scale_128x4.reshape(-1), vq.scale_128x4.reshape(-1), kq.global_scale,
                    vq.global_scale)


def _case_sparse_decode_nvfp4_fwd(device, dtype):  # (the interpreter is slow on NVFP4 tiles: small)
    q, k, v, idx, pt, sk = decode_problem([200, 0], hkv=1, g=2, topk=3, dtype=dtype, device=device, extra_pages=1)
    _, _, (kd, vd, ks, vs, kg, vg) = _nvfp4_paged_kv(k, v)
    s = 128 ** -0.5
    hnd = kern_mod.LAYOUT_HND
    cases = [("nvfp4_sparse_lse", (q, kd, vd, idx, pt, sk, None, None, hnd, 128, 1, True, s, 3, True, ks, vs, kg, vg),
              None)]
    if _all_cases(device):
        cases.append(("nvfp4_dense_no_global", (q, kd, vd, None, pt, sk, None, None, hnd, 128, 1, False, s, 3, False,
                                                ks, vs, None, None), None))
    return cases


def _case_sparse_decode_nvfp4_fwd_out(device, dtype):
    q, k, v, idx, pt, sk = decode_problem([200, 3], hkv=1, g=2, topk=3, dtype=dtype, device=device, extra_pages=1)
    _, _, (kd, vd, ks, vs, kg, vg) = _nvfp4_paged_kv(k, v)
    w = msa.SparseDecodePagedAttentionWrapper().plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=200,
                                                     q2k_indices=idx, num_qo_heads=2, num_kv_heads=1, head_dim=128)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=device)
    return [("nvfp4_planned", (q, kd, vd, idx, pt, sk, out, lse, w.O_partial, w._ml_partial, w._counter, 1, True,
                               128 ** -0.5, w._hint_blocks, True, 0, 0, ks, vs, kg, vg), None)]


def _case_sparse_prefill_fwd(device, dtype):
    inp = prefill_inputs([3, 0, 5], [200, 7, 130], 4, 2, 2, dtype, device)  # ids in [-1, nb + 1]
    base = (inp["q"], inp["k"], inp["v"], inp["rp"], inp["qi"], inp["cu_q"], inp["cu_k"])
    cases = [("dense_causal_tau", base + (None, None, 2, True, 0.08, 0.5, True), None)]
    if _all_cases(device):
        kp, vp, pt = to_paged(inp["k"], inp["v"], inp["lk"], inp["cu_k"])
        sk = torch.tensor(inp["lk"], dtype=torch.int32, device=device)
        cases.append(("paged_seqused", (inp["q"], kp, vp) + base[3:] + (pt, sk, 2, False, 0.1, 1.0, False), None))
    return cases


def _case_sparse_prefill_nvfp4_fwd(device, dtype):
    inp = prefill_inputs([3, 0, 5], [200, 7, 130], 2, 1, 2, dtype, device)
    kq = msa.quantize_bf16_to_nvfp4_128x4(inp["k"])
    vq = msa.quantize_bf16_to_nvfp4_128x4(inp["v"])
    csr = (inp["rp"], inp["qi"], inp["cu_q"], inp["cu_k"])
    dense = (inp["q"], kq.data, vq.data, kq.scale_128x4, vq.scale_128x4, kq.global_scale, vq.global_scale) + csr
    cases = [("dense_causal_tau", dense + (None, None, 2, True, 0.08, 0.5, True), None)]
    if _all_cases(device):
        kp, vp, pt = to_paged(inp["k"], inp["v"], inp["lk"], inp["cu_k"])
        kpq = msa.quantize_bf16_to_nvfp4_128x4(kp)
        vpq = msa.quantize_bf16_to_nvfp4_128x4(vp)
        sk = torch.tensor(inp["lk"], dtype=torch.int32, device=device)
        paged = (inp["q"], kpq.data, vpq.data, kpq.scale_128x4, vpq.scale_128x4, None, None) + csr
        cases.append(("paged_seqused_no_global", paged + (pt, sk, 2, False, 0.1, 1.0, False), None))
    return cases


def _case_fp4_indexer_block_scores(device, dtype):
    c = fp4_case("nvfp4", Hq=2, Hkv=1, seq_q=[3, 0, 2], seq_k=[130, 9, 300], pages=[2, 1, 2])  # req 2 lacks a page
    d = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    pub = (d["q"], d["k"], d["qs"], d["ks"], d["cu_q"], d["cu_k"], d["cu_p"], d["kv_indices"], None, 3, 300,
           fx_mod.FMT_NVFP4, fx_mod.SK_E4M3, False, False)
    m = fp4_case("mxfp4", Hq=2, Hkv=2, seq_q=[4, 1], seq_k=[200, 50], pages=[2, 1])
    Gs = m["qs"].shape[-1]
    P, hkv = m["k"].shape[:2]
    qs = _preorder(m["qs"].permute(1, 0, 2).contiguous()).to(device)
    ks = _preorder(m["ks"].reshape(P * hkv, 128, Gs)).to(device)
    qo = torch.tensor([150, -2], dtype=torch.int32, device=device)
    pre = (m["q"].to(device), m["k"].to(device), qs, ks, m["cu_q"].to(device), m["cu_k"].to(device),
           m["cu_p"].to(device), m["kv_indices"].to(device), qo, 4, 200, fx_mod.FMT_MXFP4, fx_mod.SK_E8M0, True, True)
    return [("nvfp4_public", pub, None), ("mxfp4_preordered_causal_qo", pre, None)]


def _case_decode_block_scores(device, dtype):
    q = torch.randn(3, 4, 64, device=device).to(dtype)
    kc = torch.randn(200, 2, 64, device=device).to(dtype)
    r2t = torch.randint(-200, 400, (5, 112), dtype=torch.int32, device=device)  # negative / wrapping slots
    seq_lens = torch.tensor([100, 0, 150], dtype=torch.int32, device=device)  # 150 > width: clamped
    slot_ids = torch.tensor([4, 0, 2], dtype=torch.int64, device=device)
    return [("max", (q, kc, r2t, seq_lens, slot_ids, 7, 16, 0.125, False), None),
            ("lse", (q, kc, r2t, seq_lens, slot_ids, 7, 16, 0.125, True), None)]


def _case_nvfp4_quantize_128x4(device, dtype):
    x = (torch.randn(5, 32, device=device) * 3).to(dtype)
    xs = (torch.randn(4, 3, 64, device=device)).to(dtype).transpose(0, 1)  # non-contiguous [3, 4, 64]
    return [("2d", (x,), None), ("3d_strided", (xs,), None)]


def _case_nvfp4_dequant_swizzled_to_bf16(device, dtype):
    q = msa.quantize_bf16_to_nvfp4_128x4((torch.randn(6, 2, 32, device=device) * 5).to(dtype))
    return [("tensor_gs", (q.data, q.scale_128x4, q.global_scale, 1.0), None),
            ("float_gs", (q.data, q.scale_128x4, None, 0.5), None)]


def _case_topk(force):
    def build(device, dtype):
        if device.type != "cuda":
            pytest.skip("native op has only a CUDA kernel")
        if not msa.has_native_ops():
            pytest.skip("native ops not built (source-tree mode)")
        score, seq_lens = topk_inputs(3, 6, 300, 16, device)  # ties, -inf / NaN / +inf, lengths 0, < 0, too long
        out = torch.empty(3, 6, 16, dtype=torch.int32, device=device)
        if force is None:
            return [("native", (score, seq_lens, 16, 16, out), None)]
        # forced op: (force_init_blocks, force_local_blocks)
        return [("native_local", (score, seq_lens, 16, 16, 0, force, out), None),
                ("native_init_local", (score, seq_lens, 16, 16, 3, force, out), None)]
    return build


OPCHECK_CASES = {
    "build_k2q_csr": _case_build_k2q_csr,
    "k2q_to_q2k": _case_k2q_to_q2k,
    "sparse_decode_fwd": lambda device, dtype: (_case_sparse_decode_fwd(device, dtype)
                                                + _case_sparse_decode_nvfp4_fwd(device, dtype)),
    "sparse_decode_fwd_out": lambda device, dtype: (_case_sparse_decode_fwd_out(device, dtype)
                                                    + _case_sparse_decode_nvfp4_fwd_out(device, dtype)),
    "sparse_prefill_fwd": _case_sparse_prefill_fwd,
    "sparse_prefill_nvfp4_fwd": _case_sparse_prefill_nvfp4_fwd,
    "fp4_indexer_block_scores": _case_fp4_indexer_block_scores,
    "decode_block_scores": _case_decode_block_scores,
    "nvfp4_quantize_128x4": _case_nvfp4_quantize_128x4,
    "nvfp4_dequant_swizzled_to_bf16": _case_nvfp4_dequant_swizzled_to_bf16,
    "msa_topk_from_scores": _case_topk(None),
    "msa_topk_from_scores_forced": _case_topk(2),
}
_CI_OPS = {"sparse_decode_fwd_out", "nvfp4_quantize_128x4", "build_k2q_csr", "decode_block_scores"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.kernels_ci) if n in _CI_OPS else n
                                  for n in sorted(EXPECTED_OPS)])
def test_opcheck(device, dt, name):
    if name not in _registered_ops():
        pytest.skip(f"{name} is not registered in this build")
    op = _op(name)
    for label, args, mode in OPCHECK_CASES[name](device, dt):
        old = csr_mod._FORCE_TRITON_ON_CPU
        csr_mod._FORCE_TRITON_ON_CPU = mode == "force_triton"
        try:
            # all four default checks: test_schema, test_autograd_registration, test_faketensor,
            # test_aot_dispatch_dynamic (mutated workspaces / out buffers are declared, so all apply)
            # except test_schema with fp8 tensor arguments: its mutation check calls torch.allclose, which
            # torch does not implement for float8_e4m3fn ("mul_cuda" not implemented) - a torch limitation
            has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
            utils = tuple(u for u in ("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic") if not (has_fp8 and u == "test_schema"))
            res = opcheck(op, args, test_utils=utils)
        except Exception as e:  # name the case in the failure
            raise AssertionError(f"opcheck {name}[{label}] failed: {e}") from e
        finally:
            csr_mod._FORCE_TRITON_ON_CPU = old
        assert all(v == "SUCCESS" for v in res.values()), (name, label, res)


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------


class _Recorder:
    """Dynamo backend that records the graphs (and the package ops in them) and delegates to a real one."""

    def __init__(self, device):
        self.inner = "inductor" if device.type == "cuda" else "aot_eager"
        self.graphs = 0
        self.ops = set()

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        for n in gm.graph.nodes:
            schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
            if schema is not None and schema.name.startswith(NS + "::"):
                self.ops.add(schema.name.split("::", 1)[1])
        return lookup_backend(self.inner)(gm, example_inputs)


def compiled_equals_eager(device, fn, *args, ops=(), fresh=None):
    """``torch.compile(fn, fullgraph=True)(*args)`` == ``fn(*args)`` bit for bit; one graph holding ``ops``.

    ``fresh``: optional callable returning new ``args`` for the eager run (for functions writing into
    buffers passed as arguments). Returns the compiled result.
    """
    rec = _Recorder(device)
    got = torch.compile(fn, fullgraph=True, backend=rec)(*args)
    want = fn(*(fresh() if fresh is not None else args))
    assert rec.graphs == 1, f"{rec.graphs} graphs"
    assert set(ops) <= rec.ops, f"graph lacks ops {sorted(set(ops) - rec.ops)} (has {sorted(rec.ops)})"
    assert_bitwise_equal(got, want, "compiled vs eager")
    return got


def _topk_ops(force):
    """Package ops expected in a graph calling native_topk_from_scores on this device / build."""
    if not (msa.has_native_ops() and torch.cuda.is_available()):
        return ()  # PyTorch fallback: plain aten ops
    return ("msa_topk_from_scores_forced",) if force else ("msa_topk_from_scores",)


@pytest.mark.kernels_ci
def test_compile_sparse_decode_atten_func(device, dt):
    q, k, v, idx, pt, sk = decode_problem([300, 0, 700], hkv=2, g=4, topk=4, dtype=dt, device=device)

    def sparse(q, k, v, idx, pt, sk):
        return msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=700,
                                            return_softmax_lse=True)

    def dense(q, k, v, pt, sk):
        return msa.sparse_decode_atten_func(q, k, v, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=700,
                                            causal=False, softmax_scale=0.05)

    compiled_equals_eager(device, sparse, q, k, v, idx, pt, sk, ops=("sparse_decode_fwd",))
    compiled_equals_eager(device, dense, q, k, v, pt, sk, ops=("sparse_decode_fwd",))


def test_compile_decode_wrapper_run(device, dt):
    q, k, v, idx, pt, sk = decode_problem([300, 129, 1], hkv=2, g=4, topk=4, dtype=dt, device=device)
    w = msa.SparseDecodePagedAttentionWrapper().plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=300,
                                                     q2k_indices=idx, num_qo_heads=8, num_kv_heads=2, head_dim=128)

    def into(q, k, v, out, lse):  # plan outside, run (with caller buffers) inside the graph
        return w.run(q, k, v, return_softmax_lse=True, out=out, lse=lse)

    def bufs():
        return (q, k, v, torch.full_like(q, float("nan")),
                torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=device))

    got = compiled_equals_eager(device, into, *bufs(), ops=("sparse_decode_fwd_out",), fresh=bufs)
    assert_bitwise_equal(got, w.run(q, k, v, return_softmax_lse=True), "wrapper vs its own eager run")
    compiled_equals_eager(device, lambda q, k, v: w.run(q, k, v), q, k, v, ops=("sparse_decode_fwd_out",))


def test_compile_decode_nvfp4_kv(device, dt):
    """NVFP4 K/V decode (package extension of 5.1/5.2): raw packed tensors + scales, Nvfp4QuantizedTensor K/V,
    and the planned wrapper's run."""
    q, k, v, idx, pt, sk = decode_problem([200, 0], hkv=1, g=2, topk=3, dtype=dt, device=device, extra_pages=1)
    kq, vq, _ = _nvfp4_paged_kv(k, v)

    def raw(q, kd, vd, ks, vs, kg, vg, idx, pt, sk):
        return msa.sparse_decode_atten_func(q, kd, vd, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=200,
                                            return_softmax_lse=True, k_scale_128x4=ks, v_scale_128x4=vs,
                                            k_global_scale=kg, v_global_scale=vg)

    def quantized(q, kq, vq, pt, sk):  # dense, Nvfp4QuantizedTensor K/V
        return msa.sparse_decode_atten_func(q, kq, vq, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=200)

    compiled_equals_eager(device, raw, q, kq.data, vq.data, kq.scale_128x4, vq.scale_128x4, kq.global_scale,
                          vq.global_scale, idx, pt, sk, ops=("sparse_decode_fwd",))
    compiled_equals_eager(device, quantized, q, kq, vq, pt, sk, ops=("sparse_decode_fwd",))
    w = msa.SparseDecodePagedAttentionWrapper().plan(page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=200,
                                                     q2k_indices=idx, num_qo_heads=2, num_kv_heads=1, head_dim=128)
    compiled_equals_eager(device, lambda q, kq, vq: w.run(q, kq, vq, return_softmax_lse=True), q, kq, vq,
                          ops=("sparse_decode_fwd_out",))


def test_compile_flash_decode_with_gqa_share_sparse(device, dt):
    q, k, v, r2t, sl, sid, idx = make_direct([300, 0, 129], hkv=2, g=4, topk=4, dtype=dt, device=device,
                                             idx_dtype=torch.int64)
    sink = torch.randn(8, 64, device=device)

    def f(q, sink, k, v, r2t, sl, sid, idx):
        return msa.flash_decode_with_gqa_share_sparse(q, sink, k, v, r2t, sl, sid, 64, idx, 0.2)

    compiled_equals_eager(device, f, q, sink, k, v, r2t, sl, sid, idx, ops=("sparse_decode_fwd",))


@pytest.mark.kernels_ci
def test_compile_sparse_atten_func(device, dt):
    inp = prefill_inputs([3, 5], [200, 130], 4, 2, 2, dt, device)
    kp, vp, pt = to_paged(inp["k"], inp["v"], inp["lk"], inp["cu_k"])
    sk = torch.tensor(inp["lk"], dtype=torch.int32, device=device)

    def dense(q, k, v, rp, qi, cq, ck):
        return msa.sparse_atten_func(q, k, v, rp, qi, 2, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=5,
                                     max_seqlen_k=200, causal=True, return_softmax_lse=True,
                                     return_temperature_lse=True, lse_temperature_scale=0.7)

    def paged(q, k, v, rp, qi, cq, ck, pt, sk):
        return msa.sparse_atten_func(q, k, v, rp, qi, 2, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=5,
                                     max_seqlen_k=200, page_table=pt, seqused_k=sk)

    a = (inp["q"], inp["k"], inp["v"], inp["rp"], inp["qi"], inp["cu_q"], inp["cu_k"])
    compiled_equals_eager(device, dense, *a, ops=("sparse_prefill_fwd",))
    compiled_equals_eager(device, paged, a[0], kp, vp, *a[3:], pt, sk, ops=("sparse_prefill_fwd",))


def test_compile_build_k2q_csr_and_prefill(device, dt):
    """build_k2q_csr is device-side on CUDA; its CPU path may sync (API.md 3.6) but sits inside the custom op,
    so it compiles without graph breaks on both. CSR build + prefill in one graph."""
    inp = prefill_inputs([4, 3], [260, 100], 2, 1, 3, dt, device)
    builder = msa.SparseK2qCsrBuilderSm100()

    def csr_only(q2k, cq, ck):
        a = msa.build_k2q_csr(q2k, cq, ck, 128, total_k=360, max_seqlen_k=260)
        b = builder(q2k, cq, ck, total_k=360, total_rows=3)
        return a, b

    def pipeline(q, k, v, q2k, cq, ck):
        rp, qi = msa.build_k2q_csr(q2k, cq, ck, 128, total_k=360)
        return msa.sparse_atten_func(q, k, v, rp, qi, 3, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4,
                                     max_seqlen_k=260, causal=True, return_softmax_lse=True)

    compiled_equals_eager(device, csr_only, inp["q2k"], inp["cu_q"], inp["cu_k"], ops=("build_k2q_csr",))
    compiled_equals_eager(device, pipeline, inp["q"], inp["k"], inp["v"], inp["q2k"], inp["cu_q"], inp["cu_k"],
                          ops=("build_k2q_csr", "sparse_prefill_fwd"))


def test_compile_sparse_atten_nvfp4_kv_func(device, dt):
    inp = prefill_inputs([3, 2], [150, 60], 2, 1, 2, dt, device)
    kq = msa.quantize_bf16_to_nvfp4_128x4(inp["k"])
    vq = msa.quantize_bf16_to_nvfp4_128x4(inp["v"])

    def f(q, kd, vd, ks, vs, kg, vg, rp, qi, cq, ck):
        return msa.sparse_atten_nvfp4_kv_func(q, kd, vd, ks, vs, kg, vg, rp, qi, 2, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                              max_seqlen_q=3, max_seqlen_k=150, causal=True, return_softmax_lse=True)

    compiled_equals_eager(device, f, inp["q"], kq.data, vq.data, kq.scale_128x4, vq.scale_128x4, kq.global_scale,
                          vq.global_scale, inp["rp"], inp["qi"], inp["cu_q"], inp["cu_k"],
                          ops=("sparse_prefill_nvfp4_fwd",))


def test_compile_fp4_indexer_block_scores(device):
    f8 = torch.float8_e4m3fn
    c = fp4_case("nvfp4", Hq=2, Hkv=1, seq_q=[3, 2], seq_k=[130, 300], pages=[2, 2])
    d = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}

    def public(q, k, qs, ks, cq, ck, cp, kvi):
        return msa.fp4_indexer_block_scores(q, k, qs, ks, cq, ck, cp, max_seqlen_q=3, max_seqlen_k=300,
                                            kv_indices=kvi, fp4_format="nvfp4", scale_layout="public")

    compiled_equals_eager(device, public, d["q"], d["k"], d["qs"].view(f8), d["ks"].view(f8), d["cu_q"], d["cu_k"],
                          d["cu_p"], d["kv_indices"], ops=("fp4_indexer_block_scores",))
    Gs = c["qs"].shape[-1]
    qs = _preorder(c["qs"].permute(1, 0, 2).contiguous()).view(f8).to(device)
    ks = _preorder(c["ks"].reshape(-1, 128, Gs)).view(f8).to(device)
    qo = torch.tensor([200, 7], dtype=torch.int32, device=device)

    def pre(q, k, qs, ks, cq, ck, cp, kvi, qo):
        return msa.fp4_indexer_block_scores(q, k, qs, ks, cq, ck, cp, max_seqlen_q=3, max_seqlen_k=300,
                                            kv_indices=kvi, fp4_format="nvfp4", causal=True, qo_offset=qo)

    compiled_equals_eager(device, pre, d["q"], d["k"], qs, ks, d["cu_q"], d["cu_k"], d["cu_p"], d["kv_indices"], qo,
                          ops=("fp4_indexer_block_scores",))


def _indexer_problem(device, dtype, *, B=3, hkv=2, g=2, D=64, width=112, max_slots=200):
    q_idx = torch.randn(B, hkv, D, device=device).to(dtype)  # index queries: one head per KV group (M3)
    k_idx = torch.randn(max_slots, 1, D, device=device).to(dtype)  # one shared index-key head
    q = torch.randn(B, hkv * g, D, device=device).to(dtype)
    kc = torch.randn(max_slots, hkv, D, device=device).to(dtype)
    vc = torch.randn(max_slots, hkv, D, device=device).to(dtype)
    r2t = torch.randint(-max_slots, 2 * max_slots, (B + 2, width), dtype=torch.int32, device=device)
    seq_lens = torch.tensor([100, 0, 150][:B], dtype=torch.int32, device=device)  # 0 and > width
    slot_ids = torch.tensor([4, 0, 2][:B], dtype=torch.int32, device=device)
    return q_idx, k_idx, q, kc, vc, r2t, seq_lens, slot_ids


def test_compile_flash_decode_with_topk_idx(device, dt):
    q_idx, k_idx, q, kc, vc, r2t, sl, sid = _indexer_problem(device, dt, hkv=1 if device.type == "cpu" else 2)

    def m3(q_idx, k_idx, r2t, sl, sid):  # M3 configuration: init 0, local 1, no value
        return msa.flash_decode_with_topk_idx(q_idx, None, k_idx, None, r2t, sl, 112, sid, 16, 4, 0, 1,
                                              disable_index_value=True)

    def forced_init(q, kc, vc, r2t, sl, sid):  # init + local blocks -> the native top-k too; dense o
        return msa.flash_decode_with_topk_idx(q, None, kc, vc, r2t, sl, 112, sid, 16, 4, 1, 2, sm_scale=0.1,
                                              score_type="lse")

    def select_then_attend(q_idx, k_idx, q, kc, vc, r2t, sl, sid):
        _, idx, _ = msa.flash_decode_with_topk_idx(q_idx, None, k_idx, None, r2t, sl, 112, sid, 16, 4, 0, 1,
                                                   disable_index_value=True)
        return idx, msa.flash_decode_with_gqa_share_sparse(q, None, kc, vc, r2t, sl, sid, 16, idx)

    compiled_equals_eager(device, m3, q_idx, k_idx, r2t, sl, sid, ops=("decode_block_scores",) + _topk_ops(1))
    compiled_equals_eager(device, forced_init, q, kc, vc, r2t, sl, sid,
                          ops=("decode_block_scores", "sparse_decode_fwd") + _topk_ops(1))
    compiled_equals_eager(device, select_then_attend, q_idx, k_idx, q, kc, vc, r2t, sl, sid,
                          ops=("decode_block_scores", "sparse_decode_fwd") + _topk_ops(1))


@pytest.mark.kernels_ci
def test_compile_native_topk_from_scores(device):
    score, seq_lens = topk_inputs(2, 5, 50, 16, device)
    compiled_equals_eager(device, lambda s, sl: msa.native_topk_from_scores(s, sl, 16, 8), score, seq_lens,
                          ops=_topk_ops(0))
    compiled_equals_eager(device, lambda s, sl: msa.native_topk_from_scores(s, sl, 16, 8, force_local_blocks=2),
                          score, seq_lens, ops=_topk_ops(2))
    # non-contiguous scores (the wrapper copies on the device)
    st = score.transpose(0, 1).contiguous().transpose(0, 1)
    compiled_equals_eager(device, lambda s, sl: msa.native_topk_from_scores(s, sl, 16, 3), st, seq_lens,
                          ops=_topk_ops(0))


@pytest.mark.kernels_ci
def test_compile_nvfp4_quantize_and_dequantize(device, dt):
    x = (torch.randn(3, 6, 32, device=device) * 4).to(dt)

    def quant(x):  # the dataclass itself crosses the graph boundary
        return msa.quantize_bf16_to_nvfp4_128x4(x)

    def quant_kv(k, v):
        return msa.quantize_kv_bf16_to_nvfp4_128x4(k, v)

    def native(data, scale, gs):
        return (msa.native_nvfp4_dequant_swizzled_to_bf16(data, scale, gs),
                msa.native_nvfp4_dequant_swizzled_to_bf16(data, scale, 0.25))

    def roundtrip(x):
        q = msa.quantize_bf16_to_nvfp4_128x4(x)
        return msa.dequantize_nvfp4_128x4_to_bf16(q), msa.native_nvfp4_dequant_swizzled_to_bf16(
            q.data, q.scale_128x4, q.global_scale)

    q = compiled_equals_eager(device, quant, x, ops=("nvfp4_quantize_128x4",))
    assert isinstance(q, msa.Nvfp4QuantizedTensor) and q.original_shape == tuple(x.shape)
    compiled_equals_eager(device, quant_kv, x, x.flip(0), ops=("nvfp4_quantize_128x4",))
    compiled_equals_eager(device, native, q.data, q.scale_128x4, q.global_scale,
                          ops=("nvfp4_dequant_swizzled_to_bf16",))
    a, b = compiled_equals_eager(device, roundtrip, x, ops=("nvfp4_quantize_128x4", "nvfp4_dequant_swizzled_to_bf16"))
    assert_bitwise_equal(a, b, "torch vs Triton dequantiser")
    # the pure-PyTorch helpers (no package op): dataclass input, swizzle
    compiled_equals_eager(device, lambda q: msa.dequantize_nvfp4_128x4_to_bf16(q, include_global_scale=False), q)
    logical = torch.randint(0, 256, (130, 3), dtype=torch.uint8, device=device)
    compiled_equals_eager(device, lambda s: msa.swizzle_nvfp4_scale_to_128x4(s, rows=130, cols=3), logical)


def test_compile_nvfp4_global_scale_from_amax(device):
    """Pure PyTorch: ``amax / 2688`` in FP32. Bitwise under aot_eager; inductor generates its own division
    code, so a GPU run allows 1 ulp and warns if it is not bitwise (the quantiser computes its global scale
    inside its custom op, unaffected)."""
    amax = torch.tensor([1.0, 3.0, 448.0, 2688.0, 1e-30, 7.123456, 6e4, 0.0], device=device)
    f = msa.nvfp4_global_scale_from_amax
    rec = _Recorder(device)
    got = torch.compile(f, fullgraph=True, backend=rec)(amax)
    want = f(amax)
    assert rec.graphs == 1
    if rec.inner == "aot_eager":
        assert_bitwise_equal(got, want)
        return
    ulps = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs().max().item()
    if ulps:
        warnings.warn(f"inductor nvfp4_global_scale_from_amax differs from eager by {ulps} ulp")
    assert ulps <= 1


# ------------------------------------------------------------------------------------------------
# the public surface: every kernel-launching name is compiled above; the rest is host-side by contract
# ------------------------------------------------------------------------------------------------

COMPILED_PUBLIC = {
    "sparse_decode_atten_func": "test_compile_sparse_decode_atten_func, test_compile_decode_nvfp4_kv",
    "SparseDecodePagedAttentionWrapper": "test_compile_decode_wrapper_run (run; plan is host-side, API.md 5.2)",
    "flash_decode_with_gqa_share_sparse": "test_compile_flash_decode_with_gqa_share_sparse",
    "sparse_atten_func": "test_compile_sparse_atten_func",
    "sparse_atten_nvfp4_kv_func": "test_compile_sparse_atten_nvfp4_kv_func",
    "build_k2q_csr": "test_compile_build_k2q_csr_and_prefill",
    "SparseK2qCsrBuilderSm100": "test_compile_build_k2q_csr_and_prefill",
    "fp4_indexer_block_scores": "test_compile_fp4_indexer_block_scores",
    "flash_decode_with_topk_idx": "test_compile_flash_decode_with_topk_idx",
    # the public block scores run the decode_block_scores op that test compiles (fullgraph, no graph break)
    "decode_block_scores": "test_compile_flash_decode_with_topk_idx",
    "native_topk_from_scores": "test_compile_native_topk_from_scores",
    "quantize_bf16_to_nvfp4_128x4": "test_compile_nvfp4_quantize_and_dequantize",
    "quantize_kv_bf16_to_nvfp4_128x4": "test_compile_nvfp4_quantize_and_dequantize",
    "dequantize_nvfp4_128x4_to_bf16": "test_compile_nvfp4_quantize_and_dequantize",
    "native_nvfp4_dequant_swizzled_to_bf16": "test_compile_nvfp4_quantize_and_dequantize",
    "swizzle_nvfp4_scale_to_128x4": "test_compile_nvfp4_quantize_and_dequantize",
    "nvfp4_global_scale_from_amax": "test_compile_nvfp4_global_scale_from_amax",
}
NOT_COMPILED_PUBLIC = {  # name -> why (API.md 3.6 host-side list, 6.7, 6.8, 7.2)
    "naive_flash_decode_with_gqa_share_sparse": "float64 reference, synchronises",
    "naive_flash_decode_with_topk_idx": "float64 reference, synchronises",
    "get_cu_seqblocks": "host helper: .item() and an identity-keyed cache; not capturable (6.7)",
    "robust_allocator": "Triton allocator callback, not a tensor function",
    "has_native_ops": "host flag",
    "Nvfp4QuantizedTensor": "dataclass (crosses graph boundaries in test_compile_nvfp4_quantize_and_dequantize)",
    "MsaUnsupportedError": "exception type",
    "OFFICIAL_API_STATUS": "constant",
    "OFFICIAL_MINIMAX_MSA_FUNCTIONS": "constant",
    "V1_AVAILABLE_FUNCTIONS": "constant",
    "available_functions": "api-status helper",
    "official_api_status": "api-status helper",
    "official_minimax_msa_functions": "api-status helper",
    "unsupported_official_functions": "api-status helper",
}


@pytest.mark.kernels_ci
def test_public_surface_covered():
    names = set(msa.__all__)
    assert not set(COMPILED_PUBLIC) & set(NOT_COMPILED_PUBLIC)
    assert names == set(COMPILED_PUBLIC) | set(NOT_COMPILED_PUBLIC), (
        f"uncovered public names: {sorted(names - set(COMPILED_PUBLIC) - set(NOT_COMPILED_PUBLIC))}; "
        f"stale entries: {sorted((set(COMPILED_PUBLIC) | set(NOT_COMPILED_PUBLIC)) - names)}")
    for name, test in COMPILED_PUBLIC.items():
        assert test.split()[0].rstrip(",") in globals(), (name, test)


# ------------------------------------------------------------------------------------------------
# dynamic shapes; GPU only: compile + CUDA graphs (inductor's reduce-overhead mode)
# ------------------------------------------------------------------------------------------------


def test_compile_dynamic_batch_decode(device, dt):
    """``dynamic=True``: the fake implementations are SymInt-safe, so one graph serves several batch sizes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend(_Recorder(device).inner)

    def f(q, k, v, idx, pt, sk):
        return msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=768,
                                            return_softmax_lse=True)

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=cnt)
    for lens in ([300, 768], [5, 700, 129], [600, 0, 64, 513]):
        q, k, v, idx, pt, sk = decode_problem(lens, hkv=1, g=2, topk=3, dtype=dt, device=device, page_cols=6)
        assert_bitwise_equal(cf(q, k, v, idx, pt, sk), f(q, k, v, idx, pt, sk), f"B={len(lens)}")
    assert cnt.frame_count <= 2, cnt.frame_count  # dynamic from the start: no recompile per batch size


def test_compile_reduce_overhead_decode(cuda_device):
    """inductor + CUDA graphs (mode="reduce-overhead"): replays see new contents of every input."""
    q, k, v, idx, pt, sk = decode_problem([700, 129, 1], hkv=2, g=4, topk=4, dtype=torch.bfloat16,
                                          device=cuda_device, page_cols=8)

    def f(q, k, v, idx, pt, sk):
        return msa.sparse_decode_atten_func(q, k, v, idx, page_table=pt, seqused_k=sk, seqlen_q=1, max_seqlen_k=1024,
                                            return_softmax_lse=True)

    cf = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    for step in range(4):
        new = decode_problem([1024 - 300 * step, step, 128 * step + 1], hkv=2, g=4, topk=4, dtype=torch.bfloat16,
                             device=cuda_device, page_cols=8)
        for buf, val in zip((q, idx, pt, sk), (new[0], new[3], new[4] % k.shape[0], new[5])):
            buf.copy_(val)
        got = [t.clone() for t in cf(q, k, v, idx, pt, sk)]
        assert_bitwise_equal(got, list(f(q, k, v, idx, pt, sk)), f"step {step}")
    assert torch.isfinite(got[0].float()).all()
