"""The package as users load it: get_kernel, public surface, source-tree mode, GPU-free import."""

import os
import subprocess
import sys

import pytest
import torch

from .helpers import REPO, REPO_ID, msa

SOURCE_TREE = os.environ.get("MSA_TEST_SOURCE_TREE") == "1"


@pytest.mark.kernels_ci
def test_loaded_through_get_kernel():
    if SOURCE_TREE:
        pytest.skip("source-tree developer mode")
    assert msa.__name__.startswith("_msa_blackwell_cuda_"), msa.__name__
    assert "build" in (msa.__file__ or ""), msa.__file__
    assert msa.has_native_ops() is True, "the built variant must load its compiled ops"


@pytest.mark.kernels_ci
def test_public_names_resolve():
    assert len(msa.__all__) == len(set(msa.__all__))
    for name in msa.__all__:
        assert hasattr(msa, name), name
    assert issubclass(msa.MsaUnsupportedError, ValueError)
    assert issubclass(msa.MsaUnsupportedError, NotImplementedError)


def _run(code, env_extra):
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


@pytest.mark.kernels_ci
def test_source_tree_import_uses_fallbacks():
    code = (
        "import torch, msa_blackwell as m\n"
        "assert m.has_native_ops() is False\n"
        "s = torch.randn(2, 3, 40)\n"
        "out = m.native_topk_from_scores(s, torch.tensor([128*40, 300, 0], dtype=torch.int32), 128, 5)\n"
        "assert out.shape == (2, 3, 5) and out.dtype == torch.int32\n"
        "assert (out[:, 2] == -1).all() and (out[:, 1, 3:] == -1).all()\n"
        "print('ok')\n"
    )
    r = _run(code, {"PYTHONPATH": str(REPO / "torch-ext"), "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.kernels_ci
def test_import_does_not_initialise_cuda():
    if SOURCE_TREE:
        pytest.skip("source-tree developer mode")
    code = (
        "import os, torch, kernels\n"
        # check_arch=False: kernels' own arch check reads the device capability (initialising CUDA);
        # what is tested here is that importing this package does not.
        f"m = kernels.get_kernel({REPO_ID!r}, version=1, check_arch=False)\n"
        "assert not torch.cuda.is_initialized(), 'package import initialised CUDA'\n"
        "print('ok', m.__name__)\n"
    )
    r = _run(code, {"LOCAL_KERNELS": f"{REPO_ID}={REPO}"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.kernels_ci
def test_two_loads_return_the_same_module():
    if SOURCE_TREE:
        pytest.skip("source-tree developer mode")
    import kernels

    again = kernels.get_kernel(REPO_ID, version=1)
    assert again is msa or again.__name__ == msa.__name__
