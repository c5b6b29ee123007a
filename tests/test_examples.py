"""The advertised usage examples (spec EXAMPLES.md, reproduced in README.md) run verbatim."""

import re

import pytest

from .helpers import REPO, requires_cuda

SPEC = REPO.parent / "shared" / "spec" / "EXAMPLES.md"


def _blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _readme_blocks():
    return _blocks((REPO / "README.md").read_text())


@pytest.mark.kernels_ci
def test_readme_carries_the_spec_examples_verbatim():
    if not SPEC.exists():
        pytest.skip("shared/spec not beside this checkout")
    readme = _readme_blocks()
    for block in _blocks(SPEC.read_text()):
        assert block in readme, "README.md must show the spec example verbatim:\n" + block[:200]


@requires_cuda
def test_examples_run_verbatim():
    blocks = _readme_blocks()
    # load, decode, wrapper, prefill, direct, top-k: run in order in one namespace, as pasted.
    ns = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
    assert ns["out"].shape == ns["q"].shape
    assert ns["idx"].shape[-1] == 16
