"""The run directory is the one contract between the engine and the TUI: the TUI imports nothing heavier."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_the_tui_imports_only_the_run_directory_contract_and_the_recipe_schema():
    """Every zopro_tui module imports with torch unimportable, and of the engine only engine.rundir and
    engine.recipe (the schema, for validating a new run's recipe) are loaded."""
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "import zopro_tui\n"
        "for info in pkgutil.walk_packages(zopro_tui.__path__, 'zopro_tui.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m == 'engine' or m.startswith('engine.'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert "engine.rundir.reader" in loaded and "engine.recipe" in loaded
    allowed = ("engine", "engine.recipe", "engine.rundir")
    assert [m for m in loaded if not any(m == a or m.startswith(a + ".") for a in allowed)] == []
