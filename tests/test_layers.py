"""The package's two layers and their rules, read from the source (the AST of every module of src/moco_lightning).

The **application** is what turns a config into a run and a run into files: the packages and modules of
:data:`APPLICATION` (today ``moco_lightning.cli``: the entry points, the config checks, the translation of the
library's errors into config keys, the run folders and the wiring of the loggers into a run). Everything else is
the **library** (model parts, LightningModules, datamodules, evaluation, checkpointing callbacks and loggers), what
someone imports into their own Lightning project. The rules:

* the library imports nothing from the application, not even inside a function;
* the package has no import circle (imports inside functions count: they are the usual way to hide one);
* Lightning's private API (a module or name starting with ``_`` of ``lightning``, ``lightning_utilities``, or a
  private attribute of a Lightning object) is reached only in ``moco_lightning/lightning_internals.py``;
* the library never names a config key in a message: it speaks in its own argument names and the CLI translates.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from moco_lightning import lightning_internals

PACKAGE = "moco_lightning"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: The application layer: modules with these names or under these packages. Everything else is the library.
APPLICATION = ("moco_lightning.cli",)
#: The one module that may use Lightning's private API.
FENCE = "moco_lightning.lightning_internals"
#: Packages whose private modules and names are Lightning's private API.
LIGHTNING = ("lightning", "lightning_utilities", "pytorch_lightning", "lightning_fabric")
#: Private attributes of Lightning objects (trainer, loops, strategy, loggers, writers, the LightningModule) found
#: in this package before the fence was closed, with those :mod:`moco_lightning.lightning_internals` lists.
LIGHTNING_PRIVATE_ATTRIBUTES = frozenset({
    "_layer_sync", "_kwargs", "_wandb_init", "_id", "_experiment", "_fs", "_ExperimentWriter", "_trainer",
    "_check_log_dir_exists", "_results", "_logger_connector", "_data_connector", "_callback_connector",
    *(part for path in lightning_internals.PRIVATE_USES for part in path.split(".") if part.startswith("_")),
    *(part for path in lightning_internals.PRIVATE_ATTRIBUTES for part in path.split(".") if part.startswith("_")),
})
#: Attributes of Lightning's loops that are public names but not public API (undocumented progress trackers).
LIGHTNING_LOOP_INTERNALS = frozenset({"batch_progress", "epoch_progress", "epoch_loop"})
#: Config keys as the CLI spells them: ``<config group>.<setting>``, optionally ``=value``.
CONFIG_KEY = re.compile(
    r"(?<![\w.])(model|data|trainer|callbacks|backbone|logger|optimizer|hydra|paths|experiment)\.[a-z_]+(\.[a-z_]+)*(?![\w(])=?")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def is_application(module: str) -> bool:
    """Whether ``module`` belongs to the application layer (:data:`APPLICATION`)."""
    return any(module == app or module.startswith(app + ".") for app in APPLICATION)


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[tuple[str, str | None]]:
    """``(module imported, name imported from it or None)`` for an import statement of ``module``."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, None
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, *([node.module] if node.module else [])])
    for alias in node.names:
        yield base, alias.name


def _package_imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its code (inside functions too)."""
    found = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for base, name in _imported(module, node):
                target = f"{base}.{name}" if name and f"{base}.{name}" in MODULES else base
                if target in MODULES and target != module:
                    found.add(target)
    return found


GRAPH = {module: _package_imports(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_library_imports_nothing_from_the_application():
    crossings = sorted(f"{module} imports {target}" for module, targets in GRAPH.items() if not is_application(module)
                       for target in targets if is_application(target))
    assert not crossings, "library modules import the application (move the shared piece into the library): " + \
        "; ".join(crossings)


def test_the_application_list_names_existing_modules():
    assert all(app in MODULES for app in APPLICATION), APPLICATION
    assert any(not is_application(module) for module in MODULES)


def test_the_package_has_no_import_circle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else ``None``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def lightning_private_uses(module: str, tree: ast.AST) -> list[str]:
    """Where ``tree`` (the code of ``module``) reaches Lightning's private API, as ``module:line: what``."""
    found = []
    lightning_names = set()  # local names bound to a Lightning module
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for base, name in _imported(module, node):
                if base.split(".")[0] not in LIGHTNING:
                    continue
                dotted = f"{base}.{name}" if name else base
                if any(part.startswith("_") and part != "__future__" for part in dotted.split(".")):
                    found.append(f"{module}:{node.lineno}: imports {dotted}")
                for alias in node.names:
                    lightning_names.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            root = _dotted(node)
            if node.attr in LIGHTNING_PRIVATE_ATTRIBUTES or node.attr in LIGHTNING_LOOP_INTERNALS:
                found.append(f"{module}:{node.lineno}: .{node.attr}")
            elif node.attr.startswith("_") and not node.attr.startswith("__") and root and \
                    root.split(".")[0] in lightning_names:
                found.append(f"{module}:{node.lineno}: {root}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2 and \
                isinstance(node.args[1], ast.Constant) and node.args[1].value in LIGHTNING_PRIVATE_ATTRIBUTES:
            found.append(f"{module}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in LIGHTNING_PRIVATE_ATTRIBUTES:
            found.append(f"{module}:{node.lineno}: overrides {node.name}")
    return found


def test_lightning_private_api_is_used_only_in_lightning_internals():
    uses = [use for module, tree in TREES.items() if module != FENCE for use in lightning_private_uses(module, tree)]
    assert not uses, f"Lightning's private API outside {FENCE} (add a named function there): " + "; ".join(uses)


@pytest.mark.parametrize(("code", "what"), [
    ("from lightning.fabric.loggers.csv_logs import _ExperimentWriter", "imports"),
    ("from lightning.pytorch._graveyard import x", "imports"),
    ("import lightning as L\nL.pytorch._something", "L.pytorch._something"),
    ("trainer.strategy._layer_sync", "._layer_sync"),
    ("getattr(logger, '_experiment', None)", "getattr"),
    ("trainer.fit_loop.epoch_loop.batch_progress.total.ready", ".batch_progress"),
])
def test_the_private_api_check_sees_each_kind_of_use(code, what):
    uses = lightning_private_uses(PACKAGE + ".example", ast.parse(code))
    assert any(what in use for use in uses), uses


def test_the_private_api_check_passes_public_lightning_and_own_private_names():
    code = "import lightning as L\nfrom lightning.pytorch.callbacks import Callback\nself._cut_at = L.Trainer"
    assert lightning_private_uses(PACKAGE + ".example", ast.parse(code)) == []


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def config_keys_in_messages(module: str, tree: ast.AST) -> list[str]:
    """The config keys named by the string constants of ``tree`` (f-string parts too; docstrings left out)."""
    docstrings = _docstrings(tree)
    return [f"{module}:{node.lineno}: {match.group(0)!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            for match in CONFIG_KEY.finditer(node.value)]


def test_the_library_names_no_config_key_in_its_messages():
    keys = [key for module, tree in TREES.items() if not is_application(module)
            for key in config_keys_in_messages(module, tree)]
    assert not keys, "library messages that name config keys (name the argument instead; the CLI adds the " + \
        "config path): " + "; ".join(keys)


def test_the_config_key_check_sees_keys_and_passes_argument_names():
    tree = ast.parse('def f():\n    """model.lr in a docstring is fine."""\n'
                     '    raise ValueError(f"queue_size={q} must be positive; set callbacks.knn.k or model.bn=split")')
    found = config_keys_in_messages("m", tree)
    assert [key.split(": ", 1)[1] for key in found] == ["'callbacks.knn.k'", "'model.bn='"]
