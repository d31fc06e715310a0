"""The project's layout: imports point one way, only at module level, and the README's table is the tree.

The checker reads source files with ``ast`` (nothing is imported), so a cycle is reported as the
chain of modules that forms it, and an import inside a function as file and line. An import
inside a function is allowed only for a third-party module and only with a comment saying why, on
its line or the line above (an optional dependency). Tests are not scanned: the project never
imports them.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FOLDERS = ("bench", "data", "experiments", "utils")  # besides the top-level modules
# data/__init__.py's layers below the sources, lowest first; the sources (modules defining SOURCE)
# sit above them and data/registry.py on top.
DATA_LAYERS = (("data.base",), ("data.preflight",), ("data.tables", "data.images", "data.image_cache"), ("data.pools",))


# ----------------------------------------------------------------------------------------------
# The checker
# ----------------------------------------------------------------------------------------------
def module_name(relative: Path) -> str:
    """bench/run.py -> bench.run; data/__init__.py -> data."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for the top-level modules and every module under PROJECT_FOLDERS."""
    files = sorted(root.glob("*.py"))
    for folder in PROJECT_FOLDERS:
        files += sorted(path for path in (root / folder).rglob("*.py") if "__pycache__" not in path.parts)
    return {module_name(path.relative_to(root)): path for path in files}


def _absolute(module: str, is_package: bool, imported: str | None, level: int) -> str:
    """The absolute name a (possibly relative) ``from ... import`` refers to."""
    if level == 0:
        return imported or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([imported] if imported else []))


def _project_module(name: str, modules: set[str]) -> str | None:
    """The longest prefix of ``name`` that is a project module (``a.b.c`` may name a function in a.b)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _import_targets(node: ast.Import | ast.ImportFrom, module: str, modules: set[str], packages: set[str]) -> set[str]:
    """The project modules one import statement of ``module`` imports."""
    if isinstance(node, ast.Import):
        targets = [_project_module(alias.name, modules) for alias in node.names]
    else:
        base = _absolute(module, module in packages, node.module, node.level)
        # "from data import nih" imports the module data.nih; "from data.nih import X" imports data.nih.
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else _project_module(base, modules)
                   for alias in node.names]
    return {target for target in targets if target is not None and target != module}


def imported_modules(module: str, source: str, modules: set[str], packages: set[str]) -> set[str]:
    """The project modules that ``module`` imports anywhere in ``source`` (module level or not)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _import_targets(node, module, modules, packages)
    return found


def import_graph(sources: dict[str, str], packages: set[str] = frozenset()) -> dict[str, set[str]]:
    """Module name -> the project modules it imports, from module name -> source text."""
    modules = set(sources)
    return {module: imported_modules(module, source, modules, set(packages)) for module, source in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None if the graph is acyclic (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def _comment_lines(source: str) -> tuple[set[int], set[int]]:
    """(lines holding a comment, lines holding nothing but a comment)."""
    with_comment, comment_only = set(), set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            with_comment.add(token.start[0])
            if not token.line[: token.start[1]].strip():
                comment_only.add(token.start[0])
    return with_comment, comment_only


def function_level_imports(module: str, source: str, modules: set[str] = frozenset(),
                           packages: set[str] = frozenset()) -> list[int]:
    """Lines of the import statements inside function bodies that are not allowed: any import of a
    project module (the project has no optional parts, so such an import only hides a cycle), and
    any other import without a comment on its line or a comment line right above it."""
    with_comment, comment_only = _comment_lines(source)
    offenders = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                explained = child.lineno in with_comment or child.lineno - 1 in comment_only
                if not explained or _import_targets(child, module, set(modules), set(packages)):
                    offenders.append(child.lineno)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(source), False)
    return sorted(offenders)


# ----------------------------------------------------------------------------------------------
# The checker on small made-up projects (it must be able to fail)
# ----------------------------------------------------------------------------------------------
def test_checker_reports_a_cycle_as_its_chain():
    sources = {"a": "import b\n", "b": "from c import helper\n", "c": "import os\nfrom a import thing\n", "d": "import a\n"}
    graph = import_graph(sources)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    sources["c"] = "import os\n"
    assert find_cycle(import_graph(sources)) is None


def test_checker_sees_imports_inside_functions_and_package_forms():
    sources = {
        "pkg": "",
        "pkg.base": "def late():\n    from pkg import reader\n",  # a cycle hidden in a function still counts
        "pkg.reader": "from . import base\n",
        "pkg.chooser": "from pkg.reader import load\nimport pkg.base as base\n",
    }
    graph = import_graph(sources, packages={"pkg"})
    assert graph["pkg.reader"] == {"pkg.base"} and graph["pkg.chooser"] == {"pkg.reader", "pkg.base"}
    assert find_cycle(graph) == ["pkg.base", "pkg.reader", "pkg.base"]


def test_checker_flags_unexplained_imports_inside_functions():
    source = (
        "import os\n"                                   # 1 module level: fine
        "def f():\n"                                    # 2
        "    import json\n"                             # 3 flagged
        "    import yaml  # optional dependency\n"      # 4 explained on its line
        "    # optional: only for --plot\n"             # 5
        "    import matplotlib\n"                       # 6 explained on the line above
        "    x = 1  # a comment about x\n"              # 7
        "    from pathlib import Path\n"                # 8 flagged: line 7 is code, not a reason
        "class A:\n"                                    # 9
        "    import re\n"                               # 10 class body, not a function: fine
        "    async def g(self):\n"                      # 11
        "        def inner():\n"                        # 12
        "            import csv\n"                      # 13 flagged
        "    def h(self):\n"                            # 14
        "        '# not a comment'\n"                   # 15
        "        import sys\n"                          # 16 flagged: the '#' above is inside a string
    )
    assert function_level_imports("m", source) == [3, 8, 13, 16]


def test_checker_never_excuses_a_project_import_inside_a_function():
    source = (
        "def build(config):\n"
        "    from data import registry  # the readers (a comment does not excuse hiding a cycle)\n"
        "    import yaml  # optional dependency\n"
    )
    assert function_level_imports("datasets", source, {"datasets", "data", "data.registry"}, {"data"}) == [2]


# ----------------------------------------------------------------------------------------------
# The project itself
# ----------------------------------------------------------------------------------------------
@dataclass
class Project:
    files: dict[str, Path]
    sources: dict[str, str]
    packages: set[str]
    graph: dict[str, set[str]]


@pytest.fixture(scope="module")
def project() -> Project:
    files = project_files()
    sources = {module: path.read_text() for module, path in files.items()}
    packages = {module for module, path in files.items() if path.name == "__init__.py"}
    return Project(files, sources, packages, import_graph(sources, packages))


def test_every_folder_of_python_modules_is_scanned():
    # Folders holding modules directly (a virtual environment keeps its modules deeper down).
    folders = {path.name for path in ROOT.iterdir() if path.is_dir() and any(path.glob("*.py"))}
    assert folders - {"tests"} == set(PROJECT_FOLDERS)


def test_project_imports_form_no_cycle(project):
    graph = project.graph
    assert "datasets" in graph["main"] and "data.base" in graph["data.nih"]  # the checker sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_inside_a_function_without_a_reason(project):
    offenders = [f"{project.files[module].relative_to(ROOT)}:{line}" for module, source in project.sources.items()
                 for line in function_level_imports(module, source, set(project.sources), project.packages)]
    assert not offenders, "imports inside functions without a comment saying why: " + ", ".join(offenders)


def source_modules(project: Project) -> set[str]:
    """The data modules that define a source: ``SOURCE = ...`` at module level."""
    return {module for module, source in project.sources.items() if module.startswith("data.") and any(
        isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SOURCE" for t in node.targets)
        for node in ast.parse(source).body)}


def test_data_layer_dependencies_point_one_way(project):
    """The layers drawn in data/__init__.py: each module imports only modules of lower layers."""
    sources = source_modules(project)
    assert {"data.nih", "data.odir", "data.csv_source", "data.synthetic"} <= sources
    layer = {module: height for height, modules in enumerate(DATA_LAYERS) for module in modules}
    layer.update({module: len(DATA_LAYERS) for module in sources})
    layer["data.registry"] = len(DATA_LAYERS) + 1
    for module, targets in project.graph.items():
        if not module.startswith("data."):
            continue
        assert module in layer, f"{module} has no layer: draw it in data/__init__.py and add it to DATA_LAYERS"
        upward = [target for target in targets if target in layer and layer[target] >= layer[module]]
        assert not upward, f"{module} imports {upward} from its own or a higher layer"
    assert project.graph["data.base"] == set(), "the base types import no other project module"
    assert sources <= project.graph["data.registry"], "every source has its line in the registry"


def test_readme_layout_table_matches_the_tree(project):
    files = project.files
    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed = {path for row in table.splitlines() if row.startswith("| `")
              for path in re.findall(r"`([^`]+)`", row.split("|")[1])}
    missing = sorted(path for path in listed if not (ROOT / path).exists())
    assert not missing, f"the README's layout table names paths that do not exist: {missing}"
    unlisted = sorted(
        str(path.relative_to(ROOT)) for path in files.values()
        if path.name != "__init__.py" and str(path.relative_to(ROOT)) not in listed
        and not any(str(path.relative_to(ROOT)).startswith(folder) for folder in listed if folder.endswith("/"))
    )
    assert not unlisted, f"modules missing from the README's layout table: {unlisted}"
