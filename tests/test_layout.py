"""The package's import graph points one way (shared design: cli → pipeline/convert/server → components/memory/hub →
models → weights/quantize): no import cycle, counting imports inside functions too, and click only in the CLI."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "zimage_mlx"


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}, from every import statement anywhere in the file."""
    mods = {p.stem for p in PKG.glob("*.py")}
    graph = {m: set() for m in mods}
    for path in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zimage_mlx."):
                targets = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("zimage_mlx.")]
            else:
                continue
            graph[path.stem] |= {t for t in targets if t in mods and t not in (path.stem, "__init__")}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components of size > 1 (import cycles)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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


def test_no_import_cycles():
    assert strongly_connected(import_graph()) == []


def test_leaves_import_nothing_above_them():
    graph = import_graph()
    assert graph["quantize"] == set()
    assert graph["weights"] <= {"quantize"}
    for model in ("transformer", "text_encoder", "vae", "tokenizer", "sampler"):
        assert graph[model] <= {"weights", "quantize", "tokenizer"}, (model, graph[model])


def test_click_only_in_the_cli():
    users = sorted(p.stem for p in PKG.glob("*.py")
                   if any(isinstance(n, (ast.Import, ast.ImportFrom))
                          and ("click" in [a.name for a in n.names] if isinstance(n, ast.Import) else n.module == "click")
                          for n in ast.walk(ast.parse(p.read_text()))))
    assert users == ["cli"]
