"""Ahead-of-time compile check of every Triton kernel for sm_90 / sm_100 / sm_120 / sm_121 (no GPU needed).

Runs ``scripts/aot_check.py`` in a subprocess without ``TRITON_INTERPRET`` (conftest sets it on CPU
machines, and kernels decorated under the interpreter cannot be compiled): every kernel module's
``aot_configs`` (the launch configurations its runtime can choose per compute capability) is compiled
with Triton's bundled ptxas and checked against the target's per-block shared memory, registers and
(decode / prefill) spills. The CI subset covers every tile / warp / stage / layout class on all four
archs (~400 compilations: ~20-40 min on 2 cores); ``MSA_AOT_FULL=1`` runs the full matrix (hours on 2 cores).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "aot_check.py"


def _run(extra, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "aot.json"
        p = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *extra], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)
        recs = json.loads(out.read_text()) if out.exists() else []
    return p, recs


def _ptxas_available():
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(120).path).exists()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend / ptxas not available")


@pytest.mark.kernels_ci
def test_aot_compile_all_kernels_all_archs():
    """CI subset on sm_90, sm_100, sm_120, sm_121: compiles, within limits, every module represented."""
    p, recs = _run([], timeout=3600)
    tail = (p.stdout[-6000:] + p.stderr[-3000:])
    assert recs, f"aot_check produced no records:\n{tail}"
    assert {r["arch"] for r in recs} == {90, 100, 120, 121}
    kernels = {r["kernel"] for r in recs}
    for k in ("msa_decode_kernel", "_prefill_fwd_kernel", "_csr_count_kernel", "_csr_scatter_kernel",
              "_csr_scan_chunks_kernel", "_csr_rowptr_kernel", "_rowinfo_kernel", "_csr_invert_kernel",
              "_nvfp4_amax_kernel", "_nvfp4_quant_kernel", "_nvfp4_dequant_kernel", "_fp4_indexer_kernel",
              "_decode_block_scores_kernel"):
        assert k in kernels, f"{k} missing from the AOT matrix"
    assert all(r["ok"] for r in recs), [(r["arch"], r["label"], r.get("error", "")[:300]) for r in recs if not r["ok"]]
    assert p.returncode == 0, tail


@pytest.mark.skipif(os.environ.get("MSA_AOT_FULL") != "1", reason="full AOT matrix: set MSA_AOT_FULL=1 (hours on 2 cores)")
def test_aot_compile_full_matrix():
    p, recs = _run(["--full", "--jobs", str(os.cpu_count() or 2)], timeout=None)
    assert recs and p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]


def test_aot_configs_follow_runtime_tables():
    """The AOT lists are derived from the runtime tables: sm_12x never gets an sm_90 prefill tile, decode
    stages / warps / M tiles follow DECODE_CONFIGS (with the running Triton's TRITON_CONFIG_OVERRIDES, which
    leave the Triton 3.8 entries as they are), and sm_90's entries are the H100-measured ones."""
    code = r"""
import sys; sys.path.insert(0, 'torch-ext')
from msa_blackwell import decode_kernel as dk, prefill_kernel as pf
for arch in (90, 100, 120, 121):
    major = arch // 10
    dcfgs = dk.aot_configs(arch)
    st = {c.num_stages for c in dcfgs}
    assert st == {dk.config_for_major(major).num_stages, dk.config_for_major(major, nvfp4=True).num_stages}, (arch, st)
    for nv in (False, True):  # D = 128 warps / largest M tile: the running Triton's entry (TRITON_CONFIG_OVERRIDES)
        cfg = dk.config_for_major(major, nvfp4=nv)
        d128 = [c for c in dcfgs if c.args['D'] == 128 and (c.args['KV_FMT'] == dk.KV_NVFP4) == nv]
        assert {c.num_warps for c in d128} == {cfg.num_warps[128]}, (arch, nv)
        assert max(c.args['BLOCK_M'] for c in d128) == cfg.m_cap[128], (arch, nv)
    cfgs = [c for c in pf.aot_configs(arch) if c.fn is pf._prefill_fwd_kernel]  # (+ the NVFP4 staging kernel)
    assert any(c.fn is pf._nvfp4_stage_kernel for c in pf.aot_configs(arch))
    for nv in (0, 1):  # element K/V, NVFP4 K/V (KV_FMT=1, its own table)
        got = {(c.args['G'], c.args['BMT'], c.args['BNS'], c.num_warps, c.num_stages) for c in cfgs
               if c.args['KV_FMT'] == nv}
        t_nv = pf.config_table(major, nvfp4=bool(nv))
        assert got == {(G, t.bmt, t.bns, t.num_warps, t.num_stages) for G, t in t_nv.items()}, (arch, nv, got)
# Triton-version overrides never touch the Triton 3.8 (measured) entries
for major in (None, 9, 10, 12):
    assert dk.config_for_major(major, triton_version=(3, 8)) is dk.DECODE_CONFIGS[major]
    nv38 = dk.config_for_major(major, nvfp4=True, triton_version=(3, 8))
    assert nv38 == (dk.DECODE_CONFIGS[major].updated(dk.NVFP4_CONFIG_OVERRIDES[major])
                    if major in dk.NVFP4_CONFIG_OVERRIDES else dk.DECODE_CONFIGS[major])
assert all(v >= (3, 9) for v, _, _ in dk.TRITON_CONFIG_OVERRIDES)
assert dk.config_for_major(9, triton_version=(3, 9)).num_warps[128] == 8
assert dk.config_for_major(9, nvfp4=True, triton_version=(3, 10)).m_cap[128] == 16
assert dk.config_for_major(9, nvfp4=True, triton_version=(3, 9)).num_warps[128] == 4
assert pf.config_table(12) is pf.CFG_SM12 and pf.config_table(9) is pf.CFG_SM90
assert pf.CFG_SM90[16] == pf.PrefillConfig(8, 64, 8, 3, True) and pf.CFG_SM90[1] == pf.PrefillConfig(64, 64, 8, 2, True)
assert pf.config_table(10) is pf.CFG_SM100 and all(c.num_stages <= 2 for c in pf.CFG_SM100.values())
assert dk.DECODE_CONFIGS[9].num_stages == 3 and dk.DECODE_CONFIGS[9].ctas_per_sm == 1
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout + p.stderr
