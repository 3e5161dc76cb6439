"""Griffe extension: the Sphinx roles of the docstrings (``:class:`~pkg.Name` ``) as mkdocs-autorefs links.

The docstrings are written for Sphinx as well as for MkDocs. A role whose target the API reference renders (a
public object of the package) becomes a cross-reference, so ``mkdocs build --strict`` fails when that object is
renamed; a role that names ``moco_lightning.<something>`` that does not exist is a warning (so a failure in strict
mode) too. A role whose target is private or outside the package (torch, Lightning) becomes inline code, and the
``::`` that opens an RST literal block becomes ``:``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|mod|meth|data|attr|exc|obj):`(?P<tilde>~?)(?P<target>[^`]+)`")
LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)
log = logging.getLogger("mkdocs.plugins.sphinx_roles")  # under "mkdocs": counted as a warning by --strict


def _final(obj: Any) -> griffe.Object | None:
    try:
        return obj.final_target if obj.is_alias else obj
    except griffe.AliasResolutionError:
        return None


def _resolve(scope: griffe.Object, name: str) -> griffe.Object | None:
    """``name`` (dotted) looked up in ``scope``, inherited members of classes included, through aliases."""
    node: griffe.Object | None = scope
    for part in name.split("."):
        if node is None:
            return None
        members = node.all_members if node.is_class else node.members
        node = _final(members[part]) if part in members else None
    return node


def _find(obj: griffe.Object, name: str, collection: Any) -> griffe.Object | None:
    """A fully qualified name, else a name relative to the object, its parents, up to its package."""
    root, _, rest = name.partition(".")
    if root in collection.members:
        found = _resolve(collection.members[root], rest) if rest else collection.members[root]
        if found is not None:
            return found
    node: griffe.Object | None = obj
    while node is not None:
        found = _resolve(node, name)
        if found is not None:
            return found
        node = node.parent
    return None


def _rendered(target: griffe.Object, package: str) -> bool:
    """Whether the API reference renders ``target``: a public object of the package (not an inherited one)."""
    parts = target.path.split(".")
    return parts[0] == package and not any(p.startswith("_") for p in parts)


def _rewrite(text: str, obj: griffe.Object, collection: Any, package: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = re.sub(r"\s+", "", match["target"]).lstrip(".").removesuffix("()")
        title = name.rsplit(".", 1)[-1] if match["tilde"] else name
        target = _find(obj, name, collection)
        if target is not None and _rendered(target, package):
            return f"[`{title}`][{target.path}]"
        if target is None and name.startswith(f"{package}."):
            log.warning("%s: the docstring of %s refers to %s, which does not exist", obj.filepath, obj.path, name)
        return f"`{title}`"

    # "per step::" introduces an RST literal block; the indented block is already code in Markdown
    return LITERAL_MARKER.sub(":", ROLE.sub(replace, text))


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles of every docstring of a package once the package is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite the docstrings of ``pkg`` and of everything in it."""
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, obj, loader.modules_collection, pkg.name)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
