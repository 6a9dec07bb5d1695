"""The run directory is the one contract between the engine and the TUI: the TUI imports nothing heavier."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_tui_imports_only_the_run_directory_contract_the_recipe_schema_and_the_jobs():
    """Every zopro_tui module imports with torch unimportable, and of the engine only engine.rundir,
    engine.recipe (the schema, for validating a new run's recipe) and engine.jobs (the queue, sweeps and
    the command line of a run) are loaded."""
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
    assert "engine.rundir.reader" in loaded and "engine.recipe" in loaded and "engine.jobs.queue" in loaded
    allowed = ("engine", "engine.recipe", "engine.rundir", "engine.jobs")
    assert [m for m in loaded if not any(m == a or m.startswith(a + ".") for a in allowed)] == []


# -- the house rules: rooms in layers, no cycles, small files ---------------------------------------------------
ROOMS = (  # lowest first: a module imports only from its own room and the rooms before it
    "engine",  # the package itself (__version__)
    "engine.errors",
    "engine.seeds",
    "engine.data",
    "engine.recipe",
    "engine.rundir",  # the run-directory contract every reader shares
    "engine.jobs",  # the job queue, sweeps and the one `engine.cli run` command line: torch-free
    "engine.analysis",
    "engine.training",
    "engine.mirror",
    "engine.export",  # what a run leaves: exported models, answers, figures and reports
    "engine.cli",
    "zopro_tui",
)
SOURCES = ("engine", "zopro_tui", "tests", "bench")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("engine", "zopro_tui"):
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, package: str) -> set[str]:
    """Every module `path` imports, at the top or inside a function (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _room(module: str) -> str | None:
    for room in sorted(ROOMS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name}
    return graph


def test_every_module_belongs_to_a_room_and_imports_no_room_above_its_own():
    graph = _graph()
    assert [m for m in graph if _room(m) is None] == []
    upward = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if ROOMS.index(_room(target)) > ROOMS.index(_room(module))
    ]
    assert upward == []


def test_no_import_cycle_between_modules():
    graph, state, cycles = _graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(
                    " -> ".join(path[path.index(target) :] + [module, target]) if target in path else target
                )
            elif target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_no_source_file_is_over_500_lines():
    long = [
        f"{path.relative_to(REPO)}: {count}"
        for top in SOURCES
        for path in sorted((REPO / top).rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert long == []


def test_every_method_md_citation_names_a_section_of_docs_method_md():
    """Source files cite "docs/method.md section N" (or "sections N-M"); each N is a heading there."""
    headings = set(re.findall(r"^## (\d+)\. ", (REPO / "docs" / "method.md").read_text(), flags=re.M))
    cited, unresolved = 0, []
    for top in ("engine", "zopro_tui"):
        for path in sorted((REPO / top).rglob("*.py")):
            text = " ".join(path.read_text().split())  # a citation may break across lines
            assert "method.md" not in text.replace("docs/method.md", ""), f"{path}: cite docs/method.md"
            for first, last in re.findall(r"docs/method\.md sections? (\d+)(?:-(\d+))?", text):
                for section in range(int(first), int(last or first) + 1):
                    cited += 1
                    if str(section) not in headings:
                        unresolved.append(f"{path.relative_to(REPO)}: section {section}")
    assert cited >= 16 and unresolved == []


def test_one_module_builds_the_engine_command_line():
    """`python -m engine.cli ...` (a run, a sweep, the queue's worker, under torchrun or not) is written in
    one place; every other module asks it for the command."""
    builders = sorted(
        str(path.relative_to(REPO))
        for path in _modules().values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value == "engine.cli"
    )
    assert builders == ["engine/jobs/command.py"]
