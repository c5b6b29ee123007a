"""Float64 references for the tests: re-exported from the package's ``testing`` module (docs/API.md §11).

The references live in ``torch-ext/msa_blackwell/testing.py`` so that scripts and users can use them without
``tests/``; this module gives the tests the copy of the package build they load (``helpers.msa``).
"""

import importlib

from .helpers import msa

_testing = importlib.import_module(msa.__name__ + ".testing")

# every public reference of ``msa.testing`` under its own name (attention_ref, paged_decode_ref, build_k2q_csr_ref, ...)
__all__ = list(_testing.__all__)
globals().update({name: getattr(_testing, name) for name in __all__})
