"""Test setup: CPU interpreter when there is no GPU, offline local loading of the built variant."""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
REPO_ID = "flashrt/MiniMaxAI-msa-blackwell"

# Must happen before the package (and so @triton.jit) is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LOCAL_KERNELS", f"{REPO_ID}={REPO}")

import pytest  # noqa: E402


@pytest.fixture
def device():
    """CUDA when present; CPU only under the Triton interpreter; otherwise skip."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    pytest.skip("needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def cuda_device():
    """CUDA only (GPU-only tests skip cleanly without it)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reproducible seed per test (fresh random inputs for every check)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
