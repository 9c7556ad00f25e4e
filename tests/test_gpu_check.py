"""The GPU check's plumbing on the CPU: benchmarks/gpu_check.py in its small mode (every method runs,
the JSON has its keys, a failing part or method is recorded instead of crashing, the semi-structured
parts are skipped with a reason) and scripts/gpu_check.sh refusing to run without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

from d2prune.methods import METHODS  # noqa: E402

PHASES = {"capture", "statistics", "prune", "pruned_forward", "total"}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _settings(tmp_path: Path, **kw) -> gpu_check.Settings:
    kw.setdefault("parts", ["methods"])
    return gpu_check.Settings(device="cpu", small=True, out=str(tmp_path / "out" / "gpu_check.json"), **kw)


# A small run in its own process, with gguf, lm-eval and datasets unimportable, as on the GPU image.
_BLOCKED_RUN = """
import runpy, sys
sys.modules["gguf"] = None
sys.modules["lm_eval"] = None
sys.modules["datasets"] = None
sys.argv = [{path!r}, *sys.argv[1:]]
runpy.run_path({path!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    code = _BLOCKED_RUN.format(path=str(ROOT / "benchmarks" / "gpu_check.py"))
    proc = subprocess.run(
        [sys.executable, "-c", code, "--device", "cpu", "--small", "--out", str(out), "--tiny-model", str(TINY)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, json.loads(out.read_text()) if out.exists() else {}


def test_the_small_run_prunes_with_every_method_and_writes_one_json(small_run):
    proc, result = small_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("gpu_check: ok in ")
    assert {"schema", "started", "settings", "versions", "device", "parts", "seconds", "ok", "failed"} <= set(result)
    assert result["ok"] is True and result["failed"] == []
    assert result["device"]["type"] == "cpu" and result["versions"]["torch"]
    assert list(result["parts"]) == list(gpu_check.PARTS)
    methods = result["parts"]["methods"]
    assert methods["status"] == "ok" and methods["model"]["num_hidden_layers"] == 2
    runs = {r["name"]: r for r in methods["runs"]}
    assert set(METHODS) | {"sparsegpt-2:4"} == set(runs)
    for run in runs.values():
        assert run["status"] == "ok", run
        assert PHASES <= set(run["timings"]) and set(run["per_layer_s"]) == set(run["timings"])
        assert run["overall_sparsity"] == pytest.approx(0.5) and run["finite_logits"] is True
        assert run["peak_mib"] is None  # no device memory counter on the CPU
    assert runs["sparsegpt-2:4"]["nm_structure_ok"] is True


def test_the_semi_structured_parts_are_skipped_on_the_cpu_with_a_reason(small_run):
    _, result = small_run
    for part in ("semi_structured", "prefill"):
        assert result["parts"][part]["status"] == "skipped"
        assert "needs a CUDA GPU" in result["parts"][part]["reason"]


def test_the_tiny_model_check_compares_two_prunings(small_run):
    _, result = small_run
    tiny = result["parts"]["tiny"]
    if not (TINY / "config.json").is_file():
        assert tiny["status"] == "skipped" and gpu_check.TINY_ENV in tiny["reason"]
        return
    assert tiny["status"] == "ok"
    cases = [(m, "model") for m in gpu_check.TINY_METHODS] + gpu_check.TINY_COMPUTE_DTYPES
    assert [(r["method"], r["compute_dtype"]) for r in tiny["runs"]] == cases
    for run in tiny["runs"]:
        if run["compute_dtype"] == "model":  # CPU against CPU here: identical
            assert run["mask_agreement"] == 1.0 and run["ppl_rel_diff"] == 0.0 and run["ppl_cpu"] > 1
        else:  # bf16 forwards (auto: float32 on a CPU without AMX) against float32
            assert run["status"] == "ok" and run["ppl_rel_diff"] < gpu_check.TINY_MAX_PPL_REL_DIFF_HALF
            assert run["compute_dtype_ran"]["requested"] == run["compute_dtype"]


def test_a_missing_tiny_model_is_skipped_with_the_variable_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv(gpu_check.TINY_ENV, raising=False)
    result = gpu_check.run_checks(_settings(tmp_path, parts=["tiny"], tiny_model=str(tmp_path / "absent")))
    tiny = result["parts"]["tiny"]
    assert tiny["status"] == "skipped" and str(tmp_path / "absent") in tiny["reason"]
    assert gpu_check.TINY_ENV in tiny["reason"] and result["ok"] is True
    monkeypatch.setenv(gpu_check.TINY_ENV, str(tmp_path / "from-env"))
    assert gpu_check.tiny_model_path(gpu_check.Settings()) == tmp_path / "from-env"


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path, monkeypatch):
    def broken(settings, record):
        record({"half": "done"})
        raise RuntimeError("no luck\nsecond line")

    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "tiny", broken)
    monkeypatch.setattr(gpu_check, "method_cases", lambda: [("magnitude", {"method": "magnitude", "sparsity": 0.5})])
    result = gpu_check.run_checks(_settings(tmp_path, parts=["tiny", "methods"]))
    tiny = result["parts"]["tiny"]
    assert tiny["status"] == "failed" and tiny["half"] == "done"
    assert tiny["error"].startswith("RuntimeError: no luck (at test_gpu_check.py:")
    assert result["parts"]["methods"]["status"] == "ok"
    assert result["ok"] is False and result["failed"] == ["tiny"]
    assert json.loads(Path(result["settings"]["out"]).read_text())["failed"] == ["tiny"]


def test_a_failing_method_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    cases = [
        ("wanda", {"method": "wanda", "sparsity": 0.5}),
        ("broken", {"method": "no-such-method", "sparsity": 0.5}),
        ("magnitude", {"method": "magnitude", "sparsity": 0.5}),
    ]
    monkeypatch.setattr(gpu_check, "method_cases", lambda: cases)
    result = gpu_check.run_checks(_settings(tmp_path))
    methods = result["parts"]["methods"]
    assert [r["status"] for r in methods["runs"]] == ["ok", "failed", "ok"]
    assert methods["runs"][1]["error"].startswith("UserError: unknown method 'no-such-method'")
    assert methods["status"] == "failed" and methods["error"] == "failed: broken"
    lines = gpu_check.summary_lines(result)
    assert lines == ["  methods: failed - failed: broken"]


def test_a_spent_budget_skips_methods_without_failing(tmp_path):
    result = gpu_check.run_checks(_settings(tmp_path, methods_budget_s=0.0))
    methods = result["parts"]["methods"]
    assert methods["status"] == "ok" and result["ok"] is True
    assert all(r["status"] == "skipped" and r["reason"].startswith("time budget") for r in methods["runs"])
    assert "skipped for time: magnitude" in gpu_check.summary_lines(result)[0]


@pytest.mark.parametrize(
    "rc,status,summary",
    [
        (0, "ok", "3 passed, 9 deselected in 1.50s"),
        (5, "ok", "9 deselected in 0.20s"),
        (1, "failed", "1 failed in 2.00s"),
        (124, "failed", ""),
    ],
)
def test_the_pytest_result_joins_the_json(tmp_path, rc, status, summary):
    log = tmp_path / "pytest.log"
    log.write_text(f"SKIPPED [1] tests/x.py:3: needs two GPUs\n===== {summary} =====\n\n" if summary else "")
    result = gpu_check.run_checks(_settings(tmp_path, parts=[], pytest_rc=rc, pytest_log=str(log)))
    part = result["parts"]["pytest_cuda"]
    assert part["status"] == status and part["returncode"] == rc and result["ok"] is (status == "ok")
    assert part["summary"] == summary
    if rc == 124:
        assert part["error"] == "pytest ran past its time limit"
    if summary:
        assert part["skipped"] == ["SKIPPED [1] tests/x.py:3: needs two GPUs"]


def test_every_registered_method_is_a_case_and_admm_comes_last():
    labels = [label for label, _ in gpu_check.method_cases()]
    assert set(labels) == set(METHODS) | {"sparsegpt-2:4"} and len(labels) == len(set(labels))
    assert labels[-2:] == ["alps", "d2alps"]
    assert dict(gpu_check.method_cases())["sparsegpt-2:4"] == {"method": "sparsegpt", "pattern": "2:4"}


def test_the_out_default_follows_the_out_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).out == str(tmp_path / "gpu_check.json")
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args([]).out == "gpu_check.json"
    small = gpu_check.parse_args(["--small", "--layers", "9"])
    assert (small.layers, small.seqlen) == (2, 32)  # --small wins over the sizes
    assert gpu_check.parse_args(["--layers", "16"]).layers == 16


def test_two_four_keeps_the_two_largest_of_every_four():
    import torch

    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 5.0, 0.0, -7.0, 6.0]])
    assert gpu_check.two_four(w).tolist() == [[0.0, -4.0, 3.0, 0.0, 0.0, 0.0, -7.0, 6.0]]


@pytest.mark.parametrize("python", ["venv", "missing"])
def test_the_script_needs_cuda_and_says_so_in_one_line(tmp_path, python):
    interpreter = sys.executable if python == "venv" else str(tmp_path / "no-python")
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env=_env(PYTHON=interpreter, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: ")
    assert ("torch.cuda.is_available() is False" if python == "venv" else "cannot import torch") in lines[0]
    assert not (tmp_path / "gpu_check.json").exists()


def test_the_semi_structured_parts_run_through_with_a_stand_in_kernel(tmp_path, monkeypatch):
    """The CUDA-only parts' bookkeeping on the CPU: the semi-structured conversion replaced by the
    dense weight itself, so every product and prefill must match exactly."""
    import torch

    monkeypatch.setattr(gpu_check, "require_semi_structured", lambda device: None)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: w.clone())
    result = gpu_check.run_checks(_settings(tmp_path, parts=["semi_structured", "prefill"]))
    semi, prefill = result["parts"]["semi_structured"], result["parts"]["prefill"]
    assert semi["status"] == "ok" and result["ok"] is True
    assert [r["shape"] for r in semi["runs"]] == [s for s, _, _ in gpu_check.SMALL_LINEAR_SHAPES]
    for run in semi["runs"]:
        assert run["status"] == "ok" and run["max_rel_err"] == 0.0 and run["speedup"] > 0
        assert run["tensor_class"] == "Tensor" and run["dense_ms"] > 0
    assert prefill["status"] == "ok" and prefill["nm_structure_ok"] is True
    assert prefill["converted_linears"] == 2 * 7 and prefill["logits_max_rel_diff"] == 0.0
    assert "prefill: ok - speedup" in "\n".join(gpu_check.summary_lines(result))
