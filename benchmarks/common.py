"""What the benchmark scripts share: running a command with its wall time and peak RSS measured, putting
a table between two markers of a README, and the quick-protocol pruned models.

Peak RSS comes from ``os.wait4``. Linux carries a parent's peak RSS into a child it forks (the
child's ``ru_maxrss`` starts at the parent's size and survives ``exec``), so a parent that has
loaded torch and models would inflate every measurement. Commands therefore run from a launcher: a
bare Python process started before the parent grows (``start_launcher()`` first thing in ``main``),
which starts each command and reports back.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
BENCH_README = ROOT / "benchmarks" / "README.md"

_LAUNCHER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    t0 = time.perf_counter()
    proc = subprocess.Popen(job["cmd"], env=job["env"], cwd=job.get("cwd"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    result = {"returncode": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - t0,
              "peak_rss_bytes": usage.ru_maxrss * 1024, "output": output[-20000:]}
    print(json.dumps(result), flush=True)
"""


class Launcher:
    """Runs commands from a small, clean process; start it before importing anything large."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> dict:
        """Run ``cmd``: returncode, wall_s, peak_rss_bytes and the tail of its output."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        job = {"cmd": [str(c) for c in cmd], "env": env, "cwd": str(cwd) if cwd else None}
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait()


_launcher: Launcher | None = None


def start_launcher() -> Launcher:
    """The shared launcher; call before importing torch so its peak RSS stays small."""
    global _launcher
    _launcher = _launcher or Launcher()
    return _launcher


def shown(args: list[str], launcher: list[str] | None = None) -> str:
    """The command as a user would type it (``launcher``: e.g. ``torchrun --nproc-per-node 2``)."""
    prefix = ["d2prune"] if launcher is None else [*launcher, "-m", "d2prune"]
    return " ".join(shlex.quote(a) for a in [*prefix, *args])


def run_d2prune(
    name: str, args: list[str], out_dir: Path, launcher: list[str] | None = None, env: dict[str, str] | None = None
) -> dict:
    """Run ``d2prune ARGS --output-dir OUT`` in its own process; its run record, wall time and peak RSS.

    ``launcher``: e.g. ``["torchrun", "--nproc-per-node", "2"]``, which then runs ``-m d2prune``
    (its console script lives next to this interpreter too); the peak RSS is then the largest of the
    launcher and the processes it waited for. ``env`` adds environment variables (e.g. OMP_NUM_THREADS).
    """
    if launcher is None:
        cmd = [str(Path(sys.executable).parent / "d2prune")]
    else:
        cmd = [str(Path(sys.executable).parent / launcher[0]), *launcher[1:], "-m", "d2prune"]
    cmd += [*args, "--output-dir", str(out_dir), "--no-progress"]
    res = start_launcher().run(cmd, {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=ROOT)
    if res["returncode"] != 0:
        raise SystemExit(f"{name} failed:\n{res['output']}")
    record_file = out_dir / "run.json"  # `d2prune attention` writes attention.json instead
    record = json.loads(record_file.read_text()) if record_file.exists() else None
    return {
        "name": name,
        "command": shown(args, launcher),
        "wall_s": res["wall_s"],
        "peak_rss_mb": res["peak_rss_bytes"] / 2**20,
        "record": record,
    }


def replace_block(readme: Path, begin: str, end: str, text: str, append: bool = True) -> bool:
    """Put ``text`` between the markers ``begin`` and ``end`` of ``readme``; without the markers,
    append them with the text (``append``) or leave the file alone. Returns whether it was written."""
    content = readme.read_text() if readme.exists() else ""
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        content = head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    elif append:
        content = content.rstrip() + f"\n\n{begin}\n{text}\n{end}\n"
    else:
        return False
    readme.write_text(content)
    return True


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_results(path: Path, rows: list[dict]) -> None:
    """Write atomically: an interrupted benchmark never leaves a truncated results file."""
    # Imported here: importing d2prune loads torch, which must not happen before start_launcher().
    from d2prune.io.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(rows, indent=2) + "\n")


QUICK_CALIBRATION = ["--nsamples", "32", "--seqlen", "512", "--calib", "c4", "--seed", "0"]


def pruned_model_args(method_args: list[str], sparsity: str, model: str = "smollm2-135m") -> list[str]:
    """The ``d2prune`` arguments with which ``pruned_model`` prunes and saves a model."""
    return [
        "prune",
        model,
        *method_args,
        "--sparsity",
        sparsity,
        *QUICK_CALIBRATION,
        "--eval",
        "none",
        "--save-model",
        "--no-measure-error",
    ]


def pruned_model(name: str, method_args: list[str], sparsity: str, model: str = "smollm2-135m") -> tuple[Path, str]:
    """A model pruned with the quick protocol and saved under ``runs/pruned/NAME``; pruned only once.

    Shared by the benchmarks that need a saved pruned model (zero-shot, attention), so each
    (method, sparsity) is pruned once. Returns the model folder and the prune command.
    """
    args = pruned_model_args(method_args, sparsity, model)
    out = ROOT / "runs" / "pruned" / name
    stamp = out / "benchmark_command.txt"  # written last: a model folder without it is incomplete
    if stamp.exists() and stamp.read_text() == shown(args):
        return out / "model", shown(args)
    stamp.unlink(missing_ok=True)
    run_d2prune(name, args, out)
    stamp.write_text(shown(args))
    return out / "model", shown(args)


def protocol_arguments(ap: argparse.ArgumentParser, results: Path, readme: Path, runs: Path) -> None:
    """Options shared by the run-and-tabulate benchmarks: the quick protocol, where the results, the
    table and the run folders go, ``--dry-run`` and ``--table-only``."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--results", type=Path, default=results)
    ap.add_argument("--readme", type=Path, default=readme)
    ap.add_argument("--runs-dir", type=Path, default=runs)
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the table from the results file")


def parse_in_root(ap: argparse.ArgumentParser, runs: Path) -> argparse.Namespace:
    """Parse, make the given paths absolute, then work from the project root. The default runs
    folder stays relative to it, so the recorded commands stay short."""
    a = ap.parse_args()
    a.results, a.readme = a.results.resolve(), a.readme.resolve()
    a.runs_dir = a.runs_dir if a.runs_dir == runs else a.runs_dir.resolve()
    os.chdir(ROOT)
    return a
