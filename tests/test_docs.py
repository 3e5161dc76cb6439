"""The documentation site (mkdocs.yml, docs/, the docstrings of src/) builds with warnings as errors.

A renamed function that a page or a docstring refers to, a broken link or anchor, or a docstring that
mkdocstrings cannot parse is a warning, so ``mkdocs build --strict`` fails and so does this test.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mkdocs.yml"
BUILD_TIMEOUT_S = 240  # about 10 s on 2 loaded CPU cores


@pytest.fixture(scope="module", autouse=True)
def mkdocs_installed() -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.fail("mkdocs / mkdocstrings are not installed: pip install -e '.[dev]' (or '.[docs]')")


def mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` from the repository root (the README snippets are read from there)."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def nav_pages(nav: list) -> list[str]:
    """Every page of a mkdocs ``nav``, in order."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def load_config() -> dict:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def test_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = mkdocs_build(CONFIG, site)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"

    for page in nav_pages(load_config()["nav"]):
        html = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert html.is_file(), f"{page} was not built"
    api = (site / "api/moco_lightning/index.html").read_text(encoding="utf-8")
    assert 'id="moco_lightning.module.MoCo"' in api and "queue_size" in api  # rendered from the docstring
    assert 'id="moco_lightning.v3.MoCoV3"' in api
    # the Sphinx roles of the docstrings became links or code (docs/hooks/sphinx_roles.py), never raw text
    for html in (site / "api").rglob("*.html"):
        assert ":class:`" not in html.read_text(encoding="utf-8"), html
    # the home page takes the README's sections (pymdownx.snippets), so the two cannot drift apart
    assert "dictionary look-up" in (site / "index.html").read_text(encoding="utf-8")
    results = (site / "results/index.html").read_text(encoding="utf-8")
    assert "python train.py model=mocov3" in results
    assert "hparams_search=momentum" in results and "hparams_search=bn_leak" in results  # README's Fashion-MNIST
    for image in ("embedding_map.png", "fashion_mnist_dictionary_claims.png", "fashion_mnist_bn_leak.png"):
        assert (site / "images" / image).is_file(), image


def test_strict_build_fails_on_a_broken_reference(tmp_path: Path) -> None:
    """The settings of mkdocs.yml turn a renamed API object and a missing page into a failed build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(
        "# Broken\n\n[gone][moco_lightning.module.MoCo.no_such_method] and [missing](no_such_page.md)\n\n"
        "::: moco_lightning.queue\n",
        encoding="utf-8",
    )
    config = load_config()
    config.update(docs_dir=str(docs), nav=["index.md"], hooks=[str(ROOT / "docs/hooks/api_pages.py")])
    config.pop("exclude_docs", None)
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            python = plugin["mkdocstrings"]["handlers"]["python"]  # its paths are relative to the config file
            python["paths"] = [str(ROOT / "src")]
            python["options"]["extensions"] = [str(ROOT / "docs/hooks/sphinx_roles.py")]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")

    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "moco_lightning.module.MoCo.no_such_method" in result.stderr
    assert "no_such_page.md" in result.stderr


def test_readme_links_every_page_and_resolves() -> None:
    """The README's table of contents names every page of the site, and its relative links exist."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme))
    relative = {link for link in links if "://" not in link}
    missing = sorted(link for link in relative if not (ROOT / link).exists())
    assert not missing, f"README links to files that do not exist: {missing}"

    pages = [page for page in nav_pages(load_config()["nav"]) if page != "index.md"]
    api_pages = [page for page in pages if page.startswith("api/")]
    unlisted = [page for page in pages if not page.startswith("api/") and f"docs/{page}" not in relative]
    assert not unlisted, f"README's table of contents misses the docs pages {unlisted}"
    assert any(f"docs/{page}" in relative for page in api_pages), "README does not link the API reference"


def test_docstring_roles_become_links_code_or_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """docs/hooks/sphinx_roles.py: a role to our API is a link, to torch is code, to a missing object a warning."""
    import griffe

    spec = importlib.util.spec_from_file_location("sphinx_roles", ROOT / "docs/hooks/sphinx_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    loader = griffe.GriffeLoader(search_paths=[str(ROOT / "src")])
    moco = loader.load("moco_lightning").get_member("module.MoCo")

    text = (":meth:`momentum_update`, :class:`~moco_lightning.KeyQueue`, :class:`torch.nn.Module`, "
            ":func:`moco_lightning.losses.gone`")
    with caplog.at_level("WARNING", logger="mkdocs.plugins.sphinx_roles"):
        out = roles._rewrite(text, moco, loader.modules_collection, "moco_lightning")
    assert out == (
        "[`momentum_update`][moco_lightning.module.MoCo.momentum_update], "
        "[`KeyQueue`][moco_lightning.queue.KeyQueue], `torch.nn.Module`, `moco_lightning.losses.gone`"
    )
    assert ["moco_lightning.losses.gone" in record.getMessage() for record in caplog.records] == [True]


#: Where the documentation names config files: the README, the pages, the notebooks, the configs' own comments and
#: the benchmarks (their notes and RESULTS.md).
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb")),
             *sorted((ROOT / "conf").rglob("*.yaml")), *sorted((ROOT / "benchmarks").glob("*.md")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]
#: A config file's path as the documentation writes it; templates (``conf/recipe/<family>/...``) do not match.
CONF_PATH = re.compile(r"(?<![\w/.])conf/[\w./-]+?\.yaml\b")


def test_every_config_file_the_documentation_names_exists() -> None:
    named = {(path.relative_to(ROOT).as_posix(), found) for path in DOC_FILES
             for found in CONF_PATH.findall(path.read_text(encoding="utf-8"))}
    assert len(named) > 20  # the pattern finds what the pages name (recipes, experiments, groups)
    missing = sorted(f"{where}: {found}" for where, found in named if not (ROOT / found).is_file())
    assert not missing, f"these config files do not exist (moved?): {missing}"


def test_configuration_page_lists_every_default_callback_in_order() -> None:
    """docs/configuration.md's config tree names the callbacks of conf/callbacks/default.yaml, all and in order."""
    default = yaml.safe_load((ROOT / "conf" / "callbacks" / "default.yaml").read_text(encoding="utf-8"))["defaults"]
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    listed = re.search(r"^  callbacks/ +default = (.+?) \(conf/callbacks/default\.yaml", page, re.M | re.S)
    assert listed, "the config tree of docs/configuration.md no longer has its 'callbacks/  default = ...' line"
    assert [name.strip() for name in listed[1].split("+")] == default


def test_scaling_page_names_the_bn_mode_each_command_composes() -> None:
    """Each one-command row of docs/scaling.md's table gives the BN mode its composed config runs."""
    from hydra import compose, initialize_config_dir

    from moco_lightning.bn import resolve_bn_mode
    from moco_lightning.cli import CONFIG_PATH

    page = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| [^|]+ \| `python train.py([^`]*)`[^|]* \| `(\w+)`", page, re.M)
    rows = [(command.split(), mode) for command, mode in rows if "-m" not in command.split()]
    assert len(rows) >= 4, rows
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        for overrides, mode in rows:
            cfg = compose("train", overrides=overrides)
            processes = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
            assert resolve_bn_mode(cfg.model.bn, processes) == mode, (overrides, cfg.model.bn)


def _python_snippets(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)


def test_getting_started_snippets_define_every_name_they_use() -> None:
    """A newcomer can paste each Python snippet of docs/getting-started.md: nothing used is left undefined."""
    import builtins

    snippets = _python_snippets(ROOT / "docs" / "getting-started.md")
    assert len(snippets) >= 2
    for snippet in snippets:
        tree = ast.parse(snippet)
        defined = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                defined |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        assert used <= defined, f"undefined in the snippet: {sorted(used - defined)}\n{snippet}"


def test_getting_started_config_snippet_runs(tmp_path: Path) -> None:
    """The "Using the configs from Python" snippet builds what it says (a ResNet-50 MoCo and its Trainer)."""
    [snippet] = [s for s in _python_snippets(ROOT / "docs" / "getting-started.md") if "compose(" in s]
    namespace: dict = {}
    exec(compile(snippet.replace("/tmp/run", str(tmp_path / "run")), "getting-started.md", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "MoCo" and namespace["model"].hparams.backbone == "resnet50"
    assert namespace["trainer"].max_epochs == namespace["cfg"].trainer.max_epochs


def test_quickstart_notebook_gives_the_default_run_time_of_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    minutes = re.search(r"about ([\d.]+) minutes on 2 CPU cores", readme)
    assert minutes, "the README's quickstart no longer says how long the default run takes"
    notebook = (ROOT / "notebooks" / "quickstart.ipynb").read_text(encoding="utf-8")
    claims = re.findall(r"`python train.py` \(about ([\d.]+) minutes", notebook)
    assert claims == [minutes[1]]
