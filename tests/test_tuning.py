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
                                dict(decode_fp4_decoder=2), dict(decode_fp4_prefetch=True)])
def test_override_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        with tuning.override(**kw):
            pass
    assert tuning.current() == tuning.Overrides()


@pytest.mark.kernels_ci
def test_kernel_modules_consult_the_override():
    cpu = torch.device("cpu")
    assert pk.launch_config(16, cpu) == pk.CFG_INTERPRETER[16]
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
