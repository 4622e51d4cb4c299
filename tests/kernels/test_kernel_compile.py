"""Every Triton kernel of ``kernels/`` compiled for Hopper (sm_90) and Ampere (sm_80) without a
GPU: it compiles, its shared memory fits the chip's per-block limit, and no candidate that the
autotuner may pick at DINO's shapes spills registers.

The cases are ``ci_cases`` of ``benchmarks/kernel_resources.py`` (the attention cases come from
the launchers themselves). They compile once, in a subprocess without ``TRITON_INTERPRET``
(which replaces ``@triton.jit`` functions): ``python -m benchmarks.kernel_resources --set ci``;
every test reads that run. Triton's cache makes a second run quick.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = ("attention.fwd", "attention.delta", "attention.dkdv", "attention.dq",
           "dino_loss.row_lse", "dino_loss.rows", "dino_loss.teacher_columns", "ema",
           "clip_gradients")
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _missing_toolchain() -> str | None:
    """Why Triton cannot compile for NVIDIA GPUs here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "this Triton has no CUDA backend (triton.backends.nvidia)"
    from benchmarks.kernel_compile import ptxas_path
    if not os.access(ptxas_path(), os.X_OK):
        return f"Triton's ptxas is missing ({ptxas_path()})"
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        return "this Triton has no native_specialize_impl (needs triton >= 3.5)"
    return None


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    reason = _missing_toolchain()
    if reason:
        pytest.skip(f"cannot compile for sm_90/sm_80: {reason}")
    out = tmp_path_factory.mktemp("kernel_compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    # Its own session, so that a timeout also ends its compile processes.
    run = subprocess.Popen([sys.executable, "-m", "benchmarks.kernel_resources", "--set", "ci",
                            "--json", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        pytest.fail("compiling the CI kernel set took over 20 minutes")
    assert out.exists(), f"the compile run failed:\n{stdout[-2000:]}\n{stderr[-3000:]}"
    return json.loads(out.read_text())["rows"]


def test_every_kernel_compiles_for_both_archs(rows):
    errors = [f"{r['kernel']} {r['variant']} {r['tile']} sm_{r['arch']}: {r['error']}"
              for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    covered = {(r["kernel"], r["arch"]) for r in rows}
    missing = {(k, a) for k in KERNELS for a in SHARED_LIMIT} - covered
    assert not missing, f"kernels not compiled: {sorted(missing)}"


def test_shared_memory_fits_the_chip(rows):
    over = [f"{r['kernel']} {r['variant']} {r['tile']} sm_{r['arch']}: {r['shared']} B"
            for r in rows if "error" not in r and r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not over, "\n".join(over)


def test_no_register_spills_at_dino_shapes(rows):
    spills = [f"{r['kernel']} {r['variant']} {r['tile']} sm_{r['arch']}: {r['registers']} regs, "
              f"{r['spill_stores']} B stored / {r['spill_loads']} B loaded"
              for r in rows if r["dino"] and r.get("spill_stores", 0) + r.get("spill_loads", 0)]
    assert not spills, "\n".join(spills)
