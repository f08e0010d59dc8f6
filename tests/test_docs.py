"""Docstrings and docs name things that exist: every ``:func:``/``:class:``/``:mod:``/``:data:``/``:meth:``
reference to a ``segpipe.…`` name resolves to a module or an attribute of one."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Sphinx roles name Python objects; ``segpipe.a.b`` literals do too when ``segpipe.a`` is a module
#: (``segpipe.nodata_label`` is an output attribute, not Python)
ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|exc):`~?((?:segpipe|flows)(?:\.\w+)+)`")
LITERAL = re.compile(r"``((?:segpipe|flows)(?:\.\w+){2,})``")


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_segpipe_reference_in_docstrings_and_docs_exists():
    files = [*ROOT.joinpath("segpipe").rglob("*.py"), *ROOT.joinpath("flows").rglob("*.py"),
             *ROOT.joinpath("docs").glob("*.md"), ROOT / "README.md"]
    def python_literal(ref: str) -> bool:
        try:
            importlib.import_module(".".join(ref.split(".")[:2]))
        except ImportError:
            return False
        return True

    refs = {(p, ref) for p in files for ref in ROLE.findall(p.read_text())}
    refs |= {(p, ref) for p in files for ref in LITERAL.findall(p.read_text()) if python_literal(ref)}
    stale = sorted(f"{p.relative_to(ROOT)}: {ref}" for p, ref in refs if not resolves(ref))
    assert not stale, "\n".join(stale)
