"""scripts/paper/: every script's d2prune command lines parse with the real parser (the Hub and the GPU
are not needed: ``python`` and ``d2prune`` are stand-ins on PATH that record their arguments)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from d2prune.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "scripts" / "paper").glob("*.sh") if p.name != "run.sh")


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    # The model's context length that run.sh reads from its Hub config.
    (bin_dir / "python").write_text("#!/bin/sh\necho 2048\n")
    (bin_dir / "d2prune").write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {log}\nprintf "\\n" >> {log}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_paper_script_commands_parse(script: Path, tmp_path: Path) -> None:
    bin_dir = _fake_bin(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(script)], check=True, env=env, cwd=tmp_path, timeout=60)
    calls = [line for line in (tmp_path / "calls.txt").read_text().split("\n") if line]
    assert calls, f"{script.name} ran no d2prune command"
    for call in calls:
        argv = [a for a in call.split("\0") if a]
        args = build_parser().parse_args(argv)  # exits (SystemExit) on an unknown or bad option
        assert args.command == "prune", shlex.join(argv)
        assert args.device == "cuda"
