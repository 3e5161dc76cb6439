"""MkDocs hook: ``<!-- modules: pkg.sub -->`` in a page becomes the API reference of that package's modules.

The package itself (its docstring and what its ``__init__.py`` defines, not what it re-exports) and then every
module file directly in it, found on disk when the site is built, so that adding or removing a module needs no
edit of the pages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MARKER = re.compile(r"^<!-- modules: (?P<package>[\w.]+) -->$", re.MULTILINE)


def _defined_here(init: Path) -> list[str]:
    """Public functions, classes and constants defined in ``init`` itself (imports are documented where they live)."""
    names = []
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.extend(t.id for t in targets if isinstance(t, ast.Name))
    return [name for name in names if not name.startswith("_")]


def _block(identifier: str, members: list[str] | None = None) -> str:
    if members is None:
        return f"::: {identifier}\n"
    listed = "[" + ", ".join(members) + "]" if members else "false"
    return f"::: {identifier}\n    options:\n      members: {listed}\n"


def expand_package(package: str) -> str:
    """The ``:::`` blocks of ``package`` and of its module files (not its sub-packages), sorted by name."""
    folder = SRC.joinpath(*package.split("."))
    init = folder / "__init__.py"
    if not init.is_file():
        raise ValueError(f"<!-- modules: {package} -->: no package at {folder}")
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    blocks = [_block(package, _defined_here(init))] + [_block(f"{package}.{name}") for name in names]
    return "\n".join(blocks)


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    """Expand every ``<!-- modules: ... -->`` marker of a page."""
    return MARKER.sub(lambda match: expand_package(match["package"]), markdown)
