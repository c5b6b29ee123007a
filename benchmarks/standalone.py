"""Standalone runs of one benchmark section (``python benchmarks/bench_<name>.py``), without ``benchmark.py``.

``run_section(run, digits, timing=None)``: imports the source-tree package (``torch-ext/msa_blackwell``, no
build, no native ops) and, unless given, ``timing.py``; calls ``run(msa, timing)`` and prints every row as a
dict, floats rounded to ``digits`` decimals.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_section(run, digits, timing=None):
    sys.path.insert(0, os.path.join(ROOT, "torch-ext"))
    import msa_blackwell

    if timing is None:
        import timing
    for r in run(msa_blackwell, timing):
        print({k: (round(v, digits) if isinstance(v, float) else v) for k, v in r.items()})
