"""The package layout: commands on top, one folder per concept, imports running one way.

Read from the source with ``ast`` (nothing is imported), so a layout mistake fails here with
the modules named rather than as an import error somewhere else.
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> source folder (setup.py's package_dir)
SOURCE_FOLDERS = {"dino_fast": ROOT / "dino_fast", "dino_fast.kernels": ROOT / "kernels",
                  "dino_fast.export": ROOT / "export"}
COMMANDS = {"dino_fast.train", "dino_fast.shards", "dino_fast.eval_knn", "dino_fast.eval_linear",
            "dino_fast.visualize", "dino_fast.infer", "dino_fast.serve", "dino_fast.plot",
            "dino_fast.export.__main__"}
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def package_modules() -> dict[str, Path]:
    """Every installed module name of the package, with its source file."""
    modules = {}
    for package, folder in SOURCE_FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[0] in ("kernels", "export") and folder.name == "dino_fast":
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(path: Path, name: str, modules, module_level_only: bool) -> set[str]:
    """The package modules ``path`` (module ``name``) imports by name.

    ``from a import b`` names ``a.b`` when that is a module, else ``a`` (whose ``__init__``
    must then have run far enough to hold ``b``).
    """
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if module_level_only:  # what runs at import time, module-level if and try included
        nodes = [node for top in tree.body if not isinstance(top, DEFINITIONS)
                 for node in ast.walk(top)]
    else:
        nodes = list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names)
    return {n for n in names if n in modules}


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    """Module -> the package modules that importing it runs.

    Importing ``a.b.c`` runs ``a`` and ``a.b`` first; those implied edges are left out for the
    importing module's own parent packages, which are already running when it is imported.
    """
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in imported_modules(path, name, modules, module_level_only):
            edges.add(imported)
            parts = imported.split(".")
            edges.update(prefix for i in range(1, len(parts))
                         if (prefix := ".".join(parts[:i])) in modules
                         and not name.startswith(prefix + "."))
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path of module names, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_top_of_the_package_holds_only_commands():
    top = {p.stem for p in (ROOT / "dino_fast").glob("*.py")} - {"__init__"}
    assert {f"dino_fast.{m}" for m in top} == COMMANDS - {"dino_fast.export.__main__"}
    for name in COMMANDS:
        assert 'if __name__ == "__main__":' in package_modules()[name].read_text(), name


def test_every_folder_is_a_package_named_for_a_concept():
    folders = [p for p in (ROOT / "dino_fast").iterdir()
               if p.is_dir() and p.name not in ("__pycache__", "images")
               and not p.name.endswith(".egg-info")]
    for folder in folders:
        if any(folder.rglob("*.py")):
            assert (folder / "__init__.py").exists(), folder
            assert folder.name not in ("utils", "misc", "common", "helpers"), folder


def test_no_module_imports_a_command():
    offenders = {name: sorted(edges & COMMANDS)
                 for name, edges in import_graph(module_level_only=False).items()
                 if edges & COMMANDS}
    assert not offenders


def test_no_import_cycle_at_import_time():
    assert find_cycle(import_graph(module_level_only=True)) is None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_relative_absolute_and_package_imports():
    graph = import_graph(module_level_only=True)
    assert "dino_fast.data.folder" in graph["dino_fast.data"]  # from .folder import ...
    assert {"dino_fast.training", "dino_fast.training.step"} <= graph["dino_fast.train"]


def test_readme_commands_table_lists_every_command():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `python -m (dino_fast\.\w+)`", readme, re.M))
    assert listed == {c.removesuffix(".__main__") for c in COMMANDS}
