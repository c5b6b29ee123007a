"""The override hook ``msa.tuning`` (docs/API.md §9) and the rule that the package reads no environment
variable of its own."""

import importlib
import re

import pytest
import torch

from .helpers import REPO, msa
from .test_prefill import make_inputs

tuning = importlib.import_module(msa.__name__ + ".tuning")
pk = importlib.import_module(msa.__name__ + ".prefill_kernel")
dk = importlib.import_module(msa.__name__ + ".decode_kernel")
ck = importlib.import_module(msa.__name__ + ".csr_kernel")
ixk = importlib.import_module(msa.__name__ + ".indexer_kernel")
launch = importlib.import_module(msa.__name__ + "._launch")


@pytest.mark.kernels_ci
def test_package_reads_no_environment_variables():
    """Only Triton's own TRITON_INTERPRET is read (``_validate.interpreter_active``)."""
    for f in sorted((REPO / "torch-ext" / "msa_blackwell").glob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"os\.environ|getenv|putenv", line):
                assert "TRITON_INTERPRET" in line, f"{f.name}:{n}: {line.strip()}"


@pytest.mark.kernels_ci
def test_override_nests_and_restores():
    assert tuning.current() == tuning.Overrides()
    with tuning.override(prefill="8,128,8,3", csr_chunk_entries=2048) as ov:
        assert ov.prefill == pk.PrefillConfig(8, 128, 8, 3, True) and ov.csr_chunk_entries == 2048
        with tuning.override(prefill=(4, 64, 4, 2, 0), decode_fp4_prefetch=1):
            cur = tuning.current()
            assert cur.prefill == pk.PrefillConfig(4, 64, 4, 2, False)
            assert cur.csr_chunk_entries == 2048 and cur.decode_fp4_prefetch == 1
        assert tuning.current().prefill.bns == 128 and tuning.current().decode_fp4_prefetch is None
        with pytest.raises(RuntimeError):
            with tuning.override(prefill_nvfp4=pk.PrefillConfig(8, 32, 8, 2)):
                raise RuntimeError("restored on an exception too")
        assert tuning.current().prefill_nvfp4 is None
    assert tuning.current() == tuning.Overrides()


@pytest.mark.kernels_ci
@pytest.mark.parametrize("kw", [dict(prefill="8,64"), dict(prefill="128,64,8,2,1"), dict(prefill="8,48,8,2"),
                                dict(prefill="a,b,c,d"), dict(prefill_fp4_decoder=3), dict(csr_chunk_entries=0),
                                dict(decode_fp4_decoder=2), dict(decode_fp4_prefetch=True),
                                dict(decode=dict(no_such_field=1)), dict(decode=dict(num_warps=4)),
                                dict(decode=dict(num_stages=0)), dict(decode_nvfp4={}), dict(decode=(4, 64)),
                                dict(decode_scores=dict(tn={128: 0})), dict(decode_scores=dict(max_tpp=True))])
def test_override_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        with tuning.override(**kw):
            pass
    assert tuning.current() == tuning.Overrides()


@pytest.mark.kernels_ci
def test_kernel_modules_consult_the_override():
    cpu = torch.device("cpu")
    interp = launch.interpreter_active()  # a CPU device outside the interpreter (GPU machines) maps to sm_90's table
    assert pk.launch_config(16, cpu) == (pk.CFG_INTERPRETER[16] if interp else pk.config_table(9, False)[16])
    assert pk.fp4_decoder(cpu) == pk.FP4_DEC_DEFAULT
    with tuning.override(prefill="2,64,4,2", prefill_nvfp4="4,32,8,2", prefill_fp4_decoder=0):
        assert pk.launch_config(16, cpu) == pk.PrefillConfig(2, 64, 4, 2)
        assert pk.launch_config(16, cpu, nvfp4=True) == pk.PrefillConfig(4, 32, 8, 2)
        assert pk.fp4_decoder(cpu) == 0
    with tuning.override(prefill_fp4_decoder=1):  # the PTX decoder only on a GPU
        assert pk.fp4_decoder(cpu) == pk.FP4_DEC_DEFAULT
    k = torch.zeros(3, 2, 8, 64, dtype=torch.uint8)
    assert dk.fp4_prefetch_mode(cpu, k, k) == dk.FP4_PF_CPU_DEFAULT
    with tuning.override(decode_fp4_prefetch=2, decode_fp4_decoder=0):
        assert dk.fp4_prefetch_mode(cpu, k, k) == 2
        assert dk.fp4_decoder(cpu) == dk.FP4_DEC_PORTABLE  # the interpreter always decodes portably


@pytest.mark.kernels_ci
def test_prefill_tile_override_same_result(device):
    """Another tile config (more tokens per tile, 64-token steps, in-loop block search) gives the same O / LSE."""
    inp = make_inputs([70, 50], [300, 200], 8, 2, 4, torch.float16, device)
    kw = dict(cu_seqlens_q=inp["cu_q"], cu_seqlens_k=inp["cu_k"], max_seqlen_q=70, max_seqlen_k=300, causal=True,
              return_softmax_lse=True)
    args = (inp["q"], inp["k"], inp["v"], inp["rp"], inp["qi"], 4)
    o0, l0 = msa.sparse_atten_func(*args, **kw)
    with tuning.override(prefill=pk.PrefillConfig(4, 64, 4, 1, False)):
        o1, l1 = msa.sparse_atten_func(*args, **kw)
    torch.testing.assert_close(o1, o0, atol=2e-3, rtol=0)
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=0)


@pytest.mark.kernels_ci
def test_table_overrides_change_fields():
    """``decode`` / ``decode_nvfp4`` / ``decode_scores`` change fields of the table entry a launch uses (per-head-dim
    fields only at the head dims named); plans made inside a block are cached apart from the table's."""
    cpu = torch.device("cpu")
    shape = dict(B=1, Hkv=4, G=16, SQ=1, D=128, BS=128, topk=16, hint_blocks=0)
    p0, p0nv = dk.make_plan(cpu, **shape), dk.make_plan(cpu, nvfp4=True, **shape)
    with tuning.override(decode=dict(max_splits=1, block_n={128: 32})) as ov:
        assert ov.decode == (("block_n", ((128, 32),)), ("max_splits", 1))
        assert dk.device_config(cpu, changes=ov.decode)[0].block_n == {64: 64, 128: 32, 256: 32}
        p1 = dk.make_plan(cpu, **shape)
        assert p1.num_splits == 1 and p1.BLOCK_N == 32
        assert dk.make_plan(cpu, nvfp4=True, **shape) is p0nv  # element-K/V changes only
        with tuning.override(decode_nvfp4=dk.DecodeConfig(block_n={128: 128}, num_warps={128: 8}, m_cap={128: 32},
                                                          num_stages=2)) as ov2:
            assert ov2.decode == ov.decode
            p2 = dk.make_plan(cpu, nvfp4=True, **shape)
            assert (p2.BLOCK_N, p2.num_warps, p2.num_stages, p2.BLOCK_M) == (128, 8, 2, 16)
    assert dk.make_plan(cpu, **shape) is p0 and p0.num_splits > 1
    with tuning.override(decode=dict(pdl=1), decode_scores=dict(pdl=1)) as ov:  # no PDL without an sm_90+ GPU
        assert dk.device_config(cpu, changes=ov.decode)[0].pdl == 1
        assert dk.make_plan(cpu, **shape).pdl is False
        assert launch.use_pdl(1, None) is False and launch.use_pdl(0, 9) is False
    with pytest.raises(ValueError, match="pdl"):
        with tuning.override(decode=dict(pdl=-1)):
            pass
    with tuning.override(decode_scores=dict(tn={64: 16}, max_tpp=2)) as ov:
        cfg = ixk.decode_score_config(None).updated(ov.decode_scores)
        assert cfg.tn == {64: 16, 128: 32, 256: 32} and cfg.max_tpp == 2
