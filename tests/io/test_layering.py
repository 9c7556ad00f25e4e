"""d2prune.io sits below d2prune.finetune: nothing in io imports finetune, not even inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import d2prune

PACKAGE = Path(d2prune.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_io_never_imports_finetune():
    for path in sorted((PACKAGE / "io").glob("*.py")):
        bad = sorted(n for n in _imported_modules(path) if n.startswith("d2prune.finetune"))
        assert not bad, f"{path.name} imports {bad}"


def test_importing_io_and_finetune_needs_no_peft():
    # peft is optional: the package (and the adapter-folder registration) must import without it.
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import d2prune.io.models, d2prune.finetune\n"
        "from d2prune.io.models import _FOLDER_LOADERS\n"
        "assert 'd2prune_adapter.json' in _FOLDER_LOADERS\n"
        "try:\n"
        "    from d2prune.finetune import finetune\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('finetune imported without peft')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
