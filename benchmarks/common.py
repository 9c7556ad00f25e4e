"""Shared by the benchmark scripts: run one ``d2prune`` command as its own process, rewrite a table."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
BENCH_README = ROOT / "benchmarks" / "README.md"


def shown(args: list[str], launcher: list[str] | None = None) -> str:
    """The command as a user would type it (``launcher``: e.g. ``torchrun --nproc-per-node 2``)."""
    prefix = ["d2prune"] if launcher is None else [*launcher, "-m", "d2prune"]
    return " ".join(shlex.quote(a) for a in [*prefix, *args])


def run_d2prune(
    name: str, args: list[str], out_dir: Path, launcher: list[str] | None = None, env: dict[str, str] | None = None
) -> dict:
    """Run ``d2prune ARGS --output-dir OUT``; return its run record, wall time and peak RSS.

    A separate process per run, so wall time and ``ru_maxrss`` belong to that run alone (with a
    ``launcher`` such as torchrun: the largest of the launcher and the processes it waited for).
    ``env`` adds environment variables (e.g. OMP_NUM_THREADS).
    """
    if launcher is None:
        cmd = [str(Path(sys.executable).parent / "d2prune")]
    else:  # the launcher's console script lives next to this interpreter too
        cmd = [str(Path(sys.executable).parent / launcher[0]), *launcher[1:], "-m", "d2prune"]
    cmd += [*args, "--output-dir", str(out_dir), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{output}")
    record_file = out_dir / "run.json"  # `d2prune attention` writes attention.json instead
    record = json.loads(record_file.read_text()) if record_file.exists() else None
    return {"name": name, "command": shown(args, launcher), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "record": record}


def write_between_markers(path: Path, begin: str, end: str, body: str, heading: str | None = None) -> bool:
    """Replace the text between two marker lines; append a section when ``heading`` is given and they are absent."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin not in text:
        if heading is None:
            return False
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n{begin}\n{end}\n"
    start, stop = text.index(begin) + len(begin), text.index(end)
    path.write_text(text[:start] + "\n" + body + "\n" + text[stop:])
    return True


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_results(path: Path, rows: list[dict]) -> None:
    """Write atomically: an interrupted benchmark never leaves a truncated results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, path)


QUICK_CALIBRATION = ["--nsamples", "32", "--seqlen", "512", "--calib", "c4", "--seed", "0"]


def pruned_model(name: str, method_args: list[str], sparsity: str, model: str = "smollm2-135m") -> tuple[Path, str]:
    """A model pruned with the quick protocol and saved under ``runs/pruned/NAME``; pruned only once.

    Shared by the benchmarks that need a saved pruned model (zero-shot, attention), so each
    (method, sparsity) is pruned once. Returns the model folder and the prune command.
    """
    args = ["prune", model, *method_args, "--sparsity", sparsity, *QUICK_CALIBRATION, "--eval", "none", "--save-model",
            "--no-measure-error"]
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
