"""The package's import graph points one way (docs/architecture.md): apps → pipeline / training → loading /
memory / distributed → lora → models / sampler → weights / quantize. No import cycle, counting imports inside
functions too, and click only in the CLI."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "zimage_mlx"

# A module may import modules of its own level or below, never above (the entry points stand outside).
LEVELS = [
    ("loading.quantize", "loading.weights"),
    ("models.", "sampler"),
    ("lora.",),
    ("distributed", "memory", "metal_limits", "loading.components", "loading.download", "loading.hub", "loading.convert", "loading.single_files",
     "loading.publish"),
    ("pipeline.", "training."),
    ("apps.",),
]
ENTRY_POINTS = ("__init__", "__main__", "generate")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> set[str]:
    """The package's modules an import statement names (for `from x import y`, y when x.y is a module)."""
    if isinstance(node, ast.Import):
        bases = [a.name for a in node.names if a.name.startswith("zimage_mlx.")]
        return {b.removeprefix("zimage_mlx.") for b in bases} & known
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        base = ".".join(package + ([node.module] if node.module else []))
    elif (node.module or "").startswith("zimage_mlx"):
        base = node.module.removeprefix("zimage_mlx").lstrip(".")
    else:
        return set()
    found = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        found.add(sub if sub in known else base)
    return {f for f in found if f in known}


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}, from every import statement anywhere in the file."""
    mods = modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= resolve(name, path.name == "__init__.py", node, set(mods)) - {name, ""}
    return graph


def level(module: str) -> int | None:
    for i, prefixes in enumerate(LEVELS):
        if any(module == p or (p.endswith(".") and module.startswith(p)) for p in prefixes):
            return i
    return None


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components of size > 1 (import cycles)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_resolver_reads_relative_and_absolute_imports():
    known = {"lora.adapters", "lora", "models.transformer", "models", "sampler"}
    parse = lambda src: ast.parse(src).body[0]
    assert resolve("lora.adapters", False, parse("from ..models.transformer import X"), known) == {"models.transformer"}
    assert resolve("lora.adapters", False, parse("from .. import sampler"), known) == {"sampler"}
    assert resolve("lora", True, parse("from .adapters import Y"), known) == {"lora.adapters"}
    assert resolve("x", False, parse("import zimage_mlx.models.transformer"), known) == {"models.transformer"}


def test_every_module_has_a_level():
    assert [m for m, path in modules().items()
            if level(m) is None and path.name != "__init__.py" and m not in ENTRY_POINTS] == []


def test_no_import_cycles():
    assert strongly_connected(import_graph()) == []


def test_imports_point_down():
    upward = [(a, b) for a, targets in import_graph().items() for b in targets
              if level(a) is not None and level(b) is not None and level(b) > level(a)]
    assert upward == []


def test_click_only_in_the_cli():
    users = sorted(name for name, p in modules().items()
                   if any(isinstance(n, (ast.Import, ast.ImportFrom))
                          and ("click" in [a.name for a in n.names] if isinstance(n, ast.Import) else n.module == "click")
                          for n in ast.walk(ast.parse(p.read_text()))))
    cli = {"apps.cli", "apps.command", "apps.options", "apps.outputs"}     # the group and what its commands share
    assert [u for u in users if u not in cli and not u.endswith("_cmd")] == [] and users
