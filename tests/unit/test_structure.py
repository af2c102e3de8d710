"""The layout DESIGN.md draws, checked from the imports (issue #23): no import cycles, nothing in
pipelines/ imports trex_fast/, and the training core's top level stays small (rooms by role)."""
from __future__ import annotations

import io
import tokenize
from pathlib import Path

from tests.helpers import REPO

ROOT = Path(REPO)
PACKAGES = ("trex_fast", "pipelines")
MAX_TOP_LEVEL = 18  # trex_fast/*.py besides __init__.py


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def imported_names(source: str) -> set[str]:
    """Dotted names a module's import statements name, lazy ones included, read with tokenize
    (ast.parse can raise "AST constructor recursion depth mismatch" on CPython 3.11 late in a
    long session that ran numba; tokenize is plain Python). (module, level) pairs come back as
    '.'-prefixed names for relative imports."""
    names, line = set(), []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            names |= _statement_imports(line)
            line = []
        elif tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            line.append(tok.string)
    return names


def _statement_imports(words: list[str]) -> set[str]:
    if words[:1] == ["import"]:
        return {n for n in "".join(words[1:]).split(",") for n in [n.split("as")[0]] if n}
    if words[:1] != ["from"] or "import" not in words:
        return set()
    cut = words.index("import")
    base = "".join(words[1:cut])
    items = [w for w in words[cut + 1:] if w not in ("(", ")")]
    out, skip = set(), False
    for w in items:
        if skip or w == ",":
            skip = False
            continue
        if w == "as":
            skip = True
            continue
        out.add(base + w if base.endswith(".") else f"{base}.{w}")
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (lazy imports included)."""
    mods = _modules()

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for name in imported_names(path.read_text()):
            level = len(name) - len(name.lstrip("."))
            if level:
                parts = package.split(".")[: len(package.split(".")) - level + 1]
                name = ".".join(parts + [name.lstrip(".")])
            targets.add(name)
        graph[mod] = {owner(t) for t in targets if owner(t) not in ("", mod)}
    return graph


def test_the_import_reader_reads_every_form():
    source = ('"""from trex_fast import not_an_import"""\nimport a.b, c as d\n'
              "from e import (f,\n    g as h)  # comment\nfrom . import i\nfrom .j import k\n"
              "def lazy():\n    from l.m import n\n")
    assert imported_names(source) == {"a.b", "c", "e.f", "e.g", ".i", ".j.k", "l.m.n"}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def room(module: str) -> str:
    """A module's room: its subpackage (trex_fast.eval.knn -> trex_fast.eval), else itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_cycles_between_rooms():
    """Subpackages as single nodes: e.g. measure/ may import the step, not the other way."""
    rooms: dict[str, set[str]] = {}
    for mod, targets in import_graph().items():
        rooms.setdefault(room(mod), set()).update(room(t) for t in targets if room(t) != room(mod))
    for targets in list(rooms.values()):
        for t in targets:
            rooms.setdefault(t, set())
    assert cycles(rooms) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pipelines_import_nothing_from_trex_fast():
    upward = sorted(f"{m} -> {t}" for m, ts in import_graph().items() for t in ts
                    if m.startswith("pipelines") and t.startswith("trex_fast"))
    assert upward == []


def test_the_training_core_top_level_stays_small():
    top = sorted(p.name for p in (ROOT / "trex_fast").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL, top
