"""Float64 references for the tests: re-exported from the package's ``testing`` module (docs/API.md §11).

The references live in ``torch-ext/msa_blackwell/testing.py`` so that scripts and users can use them without
``tests/``; this module gives the tests the copy of the package build they load (``helpers.msa``).
"""

import importlib

from .helpers import msa

_testing = importlib.import_module(msa.__name__ + ".testing")

q2k_block_mask = _testing.q2k_block_mask
visible_from_blocks = _testing.visible_from_blocks
attention_ref = _testing.attention_ref
gather_paged = _testing.gather_paged
gather_token_major = _testing.gather_token_major
paged_decode_ref = _testing.paged_decode_ref
token_major_decode_ref = _testing.token_major_decode_ref
csr_rows_per_request = _testing.csr_rows_per_request
csr_level_row_map = _testing.csr_level_row_map
build_k2q_csr_ref = _testing.build_k2q_csr_ref
csr_block_mask = _testing.csr_block_mask

__all__ = ["q2k_block_mask", "visible_from_blocks", "attention_ref", "gather_paged", "gather_token_major",
           "paged_decode_ref", "token_major_decode_ref", "csr_rows_per_request", "csr_level_row_map",
           "build_k2q_csr_ref", "csr_block_mask"]
