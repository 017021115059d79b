"""The package's folders are its layers (docs/architecture.md): every import, lazy ones inside
functions included, goes to the same layer or one below, and no module imports itself back
through others. Read from the source with ast, so nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# lowest first; a module not under one of these folders is the application layer (cli, train,
# export, launch/)
LAYERS = {
    "core": 0,
    "parallel": 1,
    "data": 2, "models": 2, "clustering": 2,
    "reporting": 3,
    "runtime": 4,
    "evaluation": 5,
    "methods": 6,
}
APPLICATION = 7


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in ("dcluster", "launch"))
    return found


def project_graph() -> dict[str, set[str]]:
    files = sorted([*REPO.glob("dcluster/**/*.py"), *REPO.glob("launch/**/*.py")])
    modules = {module_name(path): path for path in files}
    # `from package import name` names a module only where one exists
    return {name: {dep for dep in imports_of(path) if dep in modules} - {name}
            for name, path in modules.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "dcluster" or len(parts) < 3 and parts[-1] not in LAYERS:
        return APPLICATION
    return LAYERS.get(parts[1], APPLICATION)


def test_every_import_goes_to_the_same_layer_or_below():
    upward = [f"{module} (layer {layer_of(module)}) imports {dep} (layer {layer_of(dep)})"
              for module, deps in project_graph().items() for dep in sorted(deps)
              if layer_of(dep) > layer_of(module)]
    assert not upward, "\n".join(upward)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_lazy_imports_included():
    assert cycles(project_graph()) == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("dcluster.core.config") < layer_of("dcluster.runtime.harness") \
        < layer_of("dcluster.methods.mmdc.method") < layer_of("dcluster.cli")


# (file, function) that may import by a computed name: third-party modules only
THIRD_PARTY_IMPORTERS = {("dcluster/cli.py", "_version")}  # versions for `dcluster info`


def dynamic_imports(path: Path, root: Path = REPO) -> list[str]:
    """Calls that import a module named at run time (importlib.import_module, __import__),
    which the graph above cannot see, outside THIRD_PARTY_IMPORTERS: "file:line"."""
    found = []
    relative = str(path.relative_to(root))
    tree = ast.parse(path.read_text(), str(path))
    allowed = {id(call) for function in ast.walk(tree)
               if isinstance(function, ast.FunctionDef)
               and (relative, function.name) in THIRD_PARTY_IMPORTERS
               for call in ast.walk(function)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and id(node) not in allowed:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else \
                getattr(node.func, "id", "")
            if name in ("import_module", "__import__"):
                found.append(f"{relative}:{node.lineno}")
    return found


def test_no_module_is_imported_by_a_name_computed_at_run_time():
    files = sorted([*REPO.glob("dcluster/**/*.py"), *REPO.glob("launch/**/*.py")])
    assert [hit for path in files for hit in dynamic_imports(path)] == []


def test_the_dynamic_import_check_sees_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib\nmethod = importlib.import_module('x')\n")
    assert dynamic_imports(probe, tmp_path) == ["probe.py:2"]


def test_every_method_folder_is_a_choice_of_the_config_and_declares_itself():
    from dcluster.core.config_keys import declarations
    from dcluster.methods import METHODS, Config

    folders = sorted(path.parent.name
                     for path in (REPO / "dcluster" / "methods").glob("*/__init__.py"))
    assert sorted(METHODS) == folders
    assert declarations(Config)["method"].key.choices == tuple(METHODS)
    assert all(spec.name == name for name, spec in METHODS.items())


def names_a_method(path: Path, methods: tuple[str, ...]) -> list[str]:
    """Where ``path`` names a method: a string equal to its name, or an attribute of that name
    (``cfg.mmdc``): "file:line"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        named = (node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 else node.attr if isinstance(node, ast.Attribute) else None)
        if named in methods:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_shared_module_names_a_method():
    """A method's keys, checks and name live in its folder; the schema is composed from the
    folders' specs above core (dcluster/methods/__init__.py)."""
    from dcluster.methods import METHODS

    names = tuple(METHODS)
    shared = [path for path in sorted(REPO.glob("dcluster/**/*.py"))
              if "methods" not in path.relative_to(REPO).parts]
    assert [hit for path in shared for hit in names_a_method(path, names)] == []
    mmdc_section = REPO / "dcluster" / "methods" / "mmdc" / "config.py"
    assert names_a_method(mmdc_section, names)  # it sees one
