"""MkDocs hook: the README sections that pages include (``--8<-- "README.md:..."``) are read from the repository root.

pymdownx.snippets resolves its ``base_path`` against the working directory; this makes it the folder of mkdocs.yml,
so ``mkdocs serve -f path/to/mkdocs.yml`` works from anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def on_config(config: Any, **kwargs: object) -> Any:
    """Point pymdownx.snippets at the folder that holds mkdocs.yml."""
    root = str(Path(config.config_file_path).resolve().parent)
    config.mdx_configs.setdefault("pymdownx.snippets", {})["base_path"] = [root]
    return config
