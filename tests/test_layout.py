"""What import-linter cannot say about the layout: no import cycles between modules, and modules stay small.

The layers between packages (and that the library never imports flows or Prefect) are contracts
in pyproject.toml, checked by ``lint-imports`` in ``make lint``.

Every ``import``/``from … import`` counts, at module level or inside a function (a lazy import
still couples two modules). Also runnable: ``python tests/test_layout.py`` prints the cycles.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """segpipe/flows modules imported by ``path`` (a package import counts as its __init__)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def main() -> int:
    files = {module_name(p): p for d in ("segpipe", "flows") for p in (ROOT / d).rglob("*.py")}
    graph = {m: imports(p, set(files)) - {m} for m, p in files.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle in the design sense
    for m in graph:
        graph[m] = {d for d in graph[m] if not (files[m].name == "__init__.py" and d.startswith(m + "."))}
        graph[m] = {d for d in graph[m] if not (m.startswith(d + ".") and files[d].name == "__init__.py")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    for c in cycles:
        print("cycle:", " ↔ ".join(c))
    print(f"{len(files)} modules, {sum(len(d) for d in graph.values())} imports, {len(cycles)} cycle(s)")
    return 1 if cycles else 0


def test_no_import_cycles_between_modules(capsys) -> None:
    assert main() == 0, capsys.readouterr().out


def test_modules_over_400_lines_say_why() -> None:
    long = []
    for p in (ROOT / "segpipe").rglob("*.py"):
        text = p.read_text()
        if text.count("\n") > 400 and "Why this module is long" not in text.split('"""')[1]:
            long.append(f"{p.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert not long, long


if __name__ == "__main__":
    sys.exit(main())
