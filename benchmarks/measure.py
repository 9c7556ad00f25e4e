"""What the benchmark scripts share: running a command with its wall time and peak RSS measured, and
putting a table between two markers of a README.

Peak RSS comes from ``os.wait4``. Linux carries a parent's peak RSS into a child it forks (the
child's ``ru_maxrss`` starts at the parent's size and survives ``exec``), so a parent that has
loaded torch and models would inflate every measurement. Commands therefore run from a launcher: a
bare Python process started before the parent grows, which starts each command and reports back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_LAUNCHER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    t0 = time.perf_counter()
    proc = subprocess.Popen(job["cmd"], env=job["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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

    def run(self, cmd: list[str], env: dict[str, str]) -> dict:
        """Run ``cmd``: returncode, wall_s, peak_rss_bytes and the tail of its output."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"cmd": [str(c) for c in cmd], "env": env}) + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait()


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
