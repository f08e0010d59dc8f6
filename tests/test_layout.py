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


def _private_imports(path: Path) -> list[str]:
    """``from segpipe… import _name`` (and private modules) in ``path``: another module's own business."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in ("segpipe", "flows", "deployments"):
            if any(part.startswith("_") and not part.startswith("__") for part in node.module.split(".")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: module {node.module}")
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_from_another_module() -> None:
    """ruff's PLC2701 skips imports within one package; this holds the rule everywhere in the application."""
    found = [f for d in ("segpipe", "flows", "deployments") for p in sorted((ROOT / d).rglob("*.py"))
             for f in _private_imports(p)]
    assert not found, found


#: The rule of where storage is touched, as it is (docs/architecture.md, "Storage"): ``segpipe.io`` owns images,
#: outputs, locks, listings, metrics.json and the label cache; any other module may touch storage only to read or
#: write a file format it owns, listed here with the libraries it uses and why. A module that starts touching
#: storage (or a new library) must be added here on purpose, or route its I/O through segpipe.io.
STORAGE_LIBRARIES = {"fsspec", "s3fs", "zarr", "rasterio", "pyogrio", "tifffile", "openslide", "safetensors", "PIL",
                     "pyarrow", "pycocotools", "ijson", "pystac", "pystac_client", "wsidicom", "sqlite3", "tempfile",
                     "open"}
STORAGE_OUTSIDE_IO = {
    "segpipe/cli/segment.py": ({"open"}, "writes --report-json"),
    "segpipe/engine/predictor.py": ({"open"}, "reads /proc/cpuinfo (native bf16)"),
    "segpipe/engine/pyramid.py": ({"zarr"}, "writes the lower pyramid levels of an output it is building"),
    "segpipe/engine/runtime.py": ({"open", "tempfile"}, "exports the network to ONNX in segpipe's cache folder"),
    "segpipe/evaluate/corrections.py": ({"tempfile"}, "unpacks the model labels a GeoPackage export carries"),
    "segpipe/evaluate/figures.py": ({"PIL"}, "report figures (PNG)"),
    "segpipe/evaluate/overlays.py": ({"PIL"}, "report thumbnails (PNG)"),
    "segpipe/evaluate/reports.py": ({"PIL"}, "report images"),
    "segpipe/evaluate/suggest.py": ({"rasterio"}, "CRS math only (rasterio.warp), no I/O"),
    "segpipe/export/__init__.py": ({"PIL", "pyogrio", "rasterio"}, "checks that existing exports read back whole"),
    "segpipe/export/cog.py": ({"open", "rasterio"}, "COG exports"),
    "segpipe/export/features.py": ({"pyarrow", "pyogrio", "rasterio"}, "vector exports"),
    "segpipe/export/origin.py": ({"open", "pyarrow", "pyogrio", "sqlite3", "tempfile"},
                                 "the origin record and model labels inside a GeoPackage export"),
    "segpipe/export/preview.py": ({"PIL", "rasterio"}, "PNG previews"),
    "segpipe/export/stac.py": ({"open", "rasterio"}, "STAC item files; CRS math"),
    "segpipe/export/targets.py": ({"tempfile"}, "local staging of exports to buckets"),
    "segpipe/export/vectors.py": ({"pyarrow", "pyogrio", "rasterio", "tempfile"}, "vector exports"),
    "segpipe/labels/burn.py": ({"rasterio"}, "rasterio.features: burning in memory, no I/O"),
    "segpipe/labels/vectors.py": ({"ijson", "open", "pyarrow", "pycocotools", "pyogrio", "rasterio", "tempfile"},
                                  "label files: GIS formats, GeoParquet, QuPath and COCO JSON"),
    "segpipe/models/artifact.py": ({"safetensors"}, "model artifacts"),
    "segpipe/models/registry.py": ({"fsspec"}, "the registry's layout"),
    "segpipe/train/checkpoint.py": ({"safetensors"}, "training checkpoints"),
    "segpipe/train/synthetic.py": ({"rasterio"}, "writes the generated demo and test datasets"),
}


def _storage_used(path: Path) -> set[str]:
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            used |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            used.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            used.add("open")
    return used & STORAGE_LIBRARIES


def test_storage_is_touched_where_the_rule_says() -> None:
    wrong = []
    for d in ("segpipe", "flows"):
        for p in sorted((ROOT / d).rglob("*.py")):
            rel = str(p.relative_to(ROOT))
            if rel.startswith("segpipe/io/"):
                continue
            used = _storage_used(p)
            allowed = STORAGE_OUTSIDE_IO.get(rel, (set(), ""))[0]
            if used - allowed:
                wrong.append(f"{rel} touches storage through {sorted(used - allowed)}: route it through segpipe.io, "
                             "or list the file format it owns in STORAGE_OUTSIDE_IO")
    assert not wrong, wrong


if __name__ == "__main__":
    sys.exit(main())
