"""The shape of job/: no import circles, and no module reaching into another's private names.

Read with the stdlib `ast` from the source (nothing imported), counting every import, also those inside
functions: a lazy import still ties two modules together. What two modules share belongs in a module
below both. A circle or a `_private` name used across files fails here, naming the files and the names.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "job"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(JOB.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The job module an import names (a name inside a module resolves to that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _package(mod: str) -> str:
    return mod if MODULES[mod].name == "__init__.py" else mod.rpartition(".")[0]


def imports(mod: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module → names taken from it, module imported under a local alias → that alias) for one module."""
    tree = ast.parse(MODULES[mod].read_text())
    edges: dict[str, set[str]] = {}
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name)
                if target and a.name.startswith("job"):
                    edges.setdefault(target, set())
                    if a.asname:
                        aliases[a.asname] = target
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package(mod).split(".")
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            if not base.startswith("job"):
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in MODULES:  # `from job.data import formats`: the module itself
                    edges.setdefault(full, set())
                    aliases[a.asname or a.name] = full
                else:
                    target = _resolve(base)
                    if target:
                        edges.setdefault(target, set()).add(a.name)
    edges.pop(mod, None)
    return edges, aliases


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def graph() -> dict[str, dict[str, set[str]]]:
    return {m: imports(m)[0] for m in MODULES}


def circles(g: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_job_has_no_import_circles():
    g = graph()
    found = circles(g)
    lines = []
    for comp in found:
        ties = [f"{a} -> {b}: {', '.join(sorted(g[a][b])) or '(module)'}" for a in comp for b in comp if b in g[a]]
        lines.append(" / ".join(comp) + "\n    " + "\n    ".join(ties))
    assert not found, "import circles in job/ (move what both use into a module below them):\n  " + "\n  ".join(lines)


def test_no_module_takes_another_modules_private_names():
    bad = []
    for mod in MODULES:
        edges, aliases = imports(mod)
        for target, names in edges.items():
            bad += [f"{mod} imports {target}.{n}" for n in sorted(names) if _private(n)]
        tree = ast.parse(MODULES[mod].read_text())
        for node in ast.walk(tree):  # `formats._hidden(...)` through an imported module
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr) \
                    and node.value.id in aliases and aliases[node.value.id] != mod:
                bad.append(f"{mod} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules (make them public in a shared module):\n  " + "\n  ".join(sorted(set(bad)))


def test_the_checks_see_a_circle_and_a_private_import():
    """The detector itself: a made-up pair of modules that import each other is a circle."""
    g = {"job.a": {"job.b": {"x"}}, "job.b": {"job.a": {"y"}}, "job.c": {"job.a": set()}}
    assert circles(g) == [["job.a", "job.b"]]
    assert _private("_where_key") and not _private("__version__") and not _private("cache_key")
