#!/usr/bin/env python
"""Ahead-of-time compile every Triton kernel of the package for sm_90 / sm_100 / sm_120 / sm_121, no GPU needed.

    python scripts/aot_check.py [--arch 120 ...] [--quick] [--full] [--jobs 2] [--json out.json]

Every kernel module's ``aot_configs(arch, full)`` lists the launch configurations its host code can choose
on that compute capability (derived from the runtime's own config tables / plan functions, see
``torch-ext/msa_blackwell/_aot.py``), under the running Triton (tables may depend on its version, e.g.
``decode_kernel.TRITON_CONFIG_OVERRIDES``: run the check with each supported Triton). Each is compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (Triton's bundled ptxas /
ptxas-blackwell), in a process pool, with a fresh Triton cache (so ptxas runs and its ``-v`` log gives
registers and spills). Fails (exit 1) when a configuration does not compile, needs more shared memory
than the target allows per block (``ARCHS[arch]["smem"]``: 232448 B on sm_90/sm_100, 101376 B on
sm_120/sm_121) or more than 255 registers per thread. Prints a
table per kernel and arch: shared memory (dynamic, from Triton's metadata), registers, spill
stores/loads, stack, cubin size. ptxas counts spills for the whole kernel, so for the hot kernels (decode /
prefill) the cubin is disassembled (``nvdisasm -c``, Triton's bundled copy) and every local-memory
instruction (LDL/STL) is located: one inside a loop that contains the tensor-core MMAs (the attention main
loop) FAILS the check; spills elsewhere (prologue, split combine) are reported, and fail only with
``--strict-spills``.

``--quick``: sm_120 only (the tightest shared-memory limit) with the CI subset. Default: all four
archs with the CI subset. ``--full``: every configuration (thousands of compiles: hours on 2 cores).
TRITON_INTERPRET must not be set (``@triton.jit`` functions decorated under the interpreter are
interpreter objects): the script re-executes itself without it.
"""

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = ("decode_kernel", "prefill_kernel", "csr_kernel", "nvfp4_kernel", "fp4_indexer", "indexer_kernel")

_CONFIGS = {}  # (arch) -> list[AotConfig], filled before the pool forks


def _load_configs(archs, full):
    import importlib

    sys.path.insert(0, str(REPO / "torch-ext"))
    out = {}
    for arch in archs:
        lst = []
        for m in MODULES:
            mod = importlib.import_module(f"msa_blackwell.{m}")
            lst += [(m, c) for c in mod.aot_configs(arch, full=full)]
        out[arch] = lst
    return out


def _signature(cfg):
    """(signature, constexprs, attrs) for ASTSource from ``AotConfig.args`` (see _aot.py)."""
    from triton.backends.compiler import BaseBackend

    fn = cfg.fn
    missing = [n for n in fn.arg_names if n not in cfg.args]
    extra = [n for n in cfg.args if n not in fn.arg_names]
    if missing or extra:
        raise ValueError(f"{fn.__name__}: args missing {missing}, unknown {extra}")
    sig, cx, attrs = {}, {}, {}
    for i, n in enumerate(fn.arg_names):
        v = cfg.args[n]
        if isinstance(v, str):
            ty, _, spec = v.partition(":")
            sig[n] = ty
            if ty.startswith("*"):
                spec = "D"
            if spec:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
        else:
            sig[n] = "constexpr"
            cx[n] = v
    return sig, cx, attrs


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_ADDR = re.compile(r"/\*[0-9a-f]{4,}\*/")
_RE_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_RE_BRA = re.compile(r"\bBRA\b[^;]*\(\s*(\.L_x_\d+)\s*\)")
_RE_LOCAL = re.compile(r"\b(LDL|STL)(\.[0-9A-Z.]+)?\s")
_RE_MMA = re.compile(r"\b(HGMMA|HMMA|QMMA|OMMA|IMMA|UTC\w*MMA)\b")


def _nvdisasm():
    import shutil

    import triton

    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    return str(cand) if cand.exists() else shutil.which("nvdisasm")


def sass_loop_spills(sass: str) -> dict:
    """Localise local-memory (spill) instructions in SASS text (``nvdisasm -c`` output).

    Loops are the ranges ``[label, backward BRA]``; an *MMA loop* is one containing a tensor-core
    instruction (HGMMA / HMMA / QMMA / UTC*MMA), i.e. the attention main loop. Returns counts of
    LDL/STL instructions: ``total``, ``in_loops`` (any loop) and ``in_mma_loops`` (the hot loop),
    plus ``mma_loops`` (how many such loops were found).
    """
    labels, insts = {}, []
    for line in sass.splitlines():
        m = _RE_LABEL.match(line)
        if m:
            labels[m.group(1)] = len(insts)
        elif _RE_ADDR.search(line):
            insts.append(line)
    loops = []
    for j, t in enumerate(insts):
        m = _RE_BRA.search(t)
        if m and m.group(1) in labels and labels[m.group(1)] <= j:
            loops.append((labels[m.group(1)], j))
    mma_loops = [(a, b) for a, b in loops if any(_RE_MMA.search(insts[k]) for k in range(a, b + 1))]
    local = [j for j, t in enumerate(insts) if _RE_LOCAL.search(t)]
    return dict(total=len(local), in_loops=sum(1 for j in local if any(a <= j <= b for a, b in loops)),
                in_mma_loops=sum(1 for j in local if any(a <= j <= b for a, b in mma_loops)),
                mma_loops=len(mma_loops))


def _sass_of(cubin: bytes) -> str:
    import subprocess

    tool = _nvdisasm()
    if not tool:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([tool, "-c", f.name], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_one(job):
    arch, idx = job
    mod, cfg = _CONFIGS[arch][idx]
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.nvidia.dump_ptxas_log = True
    rec = dict(arch=arch, module=mod, kernel=cfg.fn.__name__, label=cfg.label, warps=cfg.num_warps,
               stages=cfg.num_stages, hot=cfg.hot)
    t0 = time.time()
    buf = io.StringIO()
    try:
        sig, cx, attrs = _signature(cfg)
        src = triton.compiler.ASTSource(fn=cfg.fn, signature=sig, constexprs=cx, attrs=attrs)
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        log = buf.getvalue()
        m = _RE_REGS.search(log)
        s = _RE_SPILL.search(log)
        rec.update(ok=True, shared=int(k.metadata.shared), regs=int(m.group(1)) if m else -1,
                   stack=int(s.group(1)) if s else -1, spill_st=int(s.group(2)) if s else -1,
                   spill_ld=int(s.group(3)) if s else -1, cubin=len(k.asm["cubin"]))
        if not m or not s:
            rec["note"] = "no ptxas -v log (cache hit?)"
        if cfg.hot:
            sass = _sass_of(k.asm["cubin"])
            loc = sass_loop_spills(sass) if sass else None
            if loc is None or (loc["mma_loops"] == 0):
                rec["loop_spill"] = -1  # could not localise (no nvdisasm / no MMA loop found)
            else:
                rec["loop_spill"] = loc["in_mma_loops"]
                rec["local_insts"] = loc["total"]
    except Exception as e:  # compile failure is a check failure, reported with its message
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
    rec["secs"] = round(time.time() - t0, 2)
    return rec


STRICT_SPILLS = False


def _check(rec, archs_table):
    """List of limit violations of one compiled record (spills in hot kernels only with --strict-spills)."""
    if not rec["ok"]:
        return ["does not compile: " + rec["error"].splitlines()[0][:300] if rec["error"] else "does not compile"]
    bad = []
    lim = archs_table[rec["arch"]]
    if rec["shared"] > lim["smem"]:
        bad.append(f"shared memory {rec['shared']} B > {lim['smem']} B per block")
    if rec["regs"] > lim["regs"]:
        bad.append(f"{rec['regs']} registers > {lim['regs']}")
    if rec["hot"] and rec.get("loop_spill", 0) > 0:
        bad.append(f"{rec['loop_spill']} local-memory (spill) instructions inside the MMA main loop")
    if rec["hot"] and rec.get("loop_spill", 0) < 0 and rec["spill_st"] > 0:
        bad.append("spills that could not be localised (no nvdisasm or no MMA loop in the SASS)")
    if STRICT_SPILLS and rec["hot"] and (rec["spill_st"] > 0 or rec["spill_ld"] > 0):
        bad.append(f"register spills ({rec['spill_st']} B stores / {rec['spill_ld']} B loads) in a hot kernel")
    return bad


def _table(recs, archs_table):
    lines = []
    by = {}
    for r in recs:
        by.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch) in sorted(by, key=lambda x: (x[0], x[1])):
        rs = by[(kernel, arch)]
        lim = archs_table[arch]
        lines.append(f"\n### {kernel} on sm_{arch} ({lim['name']}; smem limit {lim['smem']} B)")
        lines.append(f"| config | warps | stages | smem B | regs | spill st/ld B | LDL/STL in loop / all | stack B | cubin B "
                     f"| s | status |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            bad = _check(r, archs_table)
            st = "OK" if not bad else "FAIL: " + "; ".join(bad)
            if r["ok"] and not bad and r["hot"] and r["spill_st"] > 0:
                st = "OK (spills outside the main loop)"
            loc = f"{r['loop_spill']} / {r.get('local_insts', '-')}" if "loop_spill" in r else "-"
            if r["ok"]:
                lines.append(f"| {r['label']} | {r['warps']} | {r['stages']} | {r['shared']} | {r['regs']} | "
                             f"{r['spill_st']}/{r['spill_ld']} | {loc} | {r['stack']} | {r['cubin']} | {r['secs']} | {st} |")
            else:
                lines.append(f"| {r['label']} | {r['warps']} | {r['stages']} | - | - | - | - | - | - | {r['secs']} | {st} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="90, 100, 120, 121 (repeatable; default all)")
    ap.add_argument("--quick", action="store_true", help="sm_120 only, CI subset")
    ap.add_argument("--full", action="store_true", help="every configuration (slow)")
    ap.add_argument("--module", action="append", help="limit to these kernel modules")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--strict-spills", action="store_true",
                    help="also fail on register spills OUTSIDE the main loop of hot (decode / prefill) kernels "
                         "(spills inside the MMA loop always fail)")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, __file__] + (argv if argv is not None else sys.argv[1:]), env)

    global _CONFIGS, MODULES, STRICT_SPILLS
    STRICT_SPILLS = args.strict_spills
    if args.module:
        MODULES = tuple(args.module)
    archs = args.arch or ([120] if args.quick else [90, 100, 120, 121])
    cache = tempfile.mkdtemp(prefix="msa_aot_cache_")
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh: every config really runs ptxas (and logs)
    t0 = time.time()
    _CONFIGS = _load_configs(archs, args.full)
    import triton
    from msa_blackwell._aot import ARCHS

    jobs = [(a, i) for a in archs for i in range(len(_CONFIGS[a]))]
    print(f"[aot] Triton {triton.__version__}: {len(jobs)} compilations for sm_{', sm_'.join(map(str, archs))} "
          f"on {args.jobs} processes", flush=True)
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs) as pool:
            recs = pool.map(_compile_one, jobs, chunksize=1)
    else:
        recs = [_compile_one(j) for j in jobs]
    print(_table(recs, ARCHS))
    fails = [(r, b) for r in recs for b in _check(r, ARCHS)]
    n_ok = sum(1 for r in recs if r["ok"])
    print(f"\n[aot] {n_ok}/{len(recs)} compiled, {len(fails)} limit violations, {time.time() - t0:.0f} s wall")
    hot_spill = [r for r in recs if r["ok"] and r["hot"] and r["spill_st"] > 0]
    print(f"[aot] note: {len(hot_spill)} hot-kernel (decode/prefill) configs spill registers outside their MMA main loop "
          f"(prologue / split combine; localised in the SASS: none inside the loop, or they would be listed as FAIL)")
    for r, b in fails:
        print(f"[aot] FAIL sm_{r['arch']} {r['kernel']} [{r['label']}] w{r['warps']} s{r['stages']}: {b}")
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1))
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
