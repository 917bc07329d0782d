"""The package's layers: an arrow may only point down (see the README's layout).

    cli/ -> training/ -> evaluation/ -> export/, decoding/ -> model/, data/ -> formats/ -> errors

The imports of every module under ``src/transformer_mt`` are parsed (not executed), so a
violation is reported with its file and line even where the import sits in a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transformer_mt"

# layer -> the layers of the package it must not import
FORBIDDEN: dict[str, set[str]] = {
    "errors": {"*"},
    "formats": {"*"},  # but errors
    "device": {"*"},  # but errors
    "model": {"*"},  # but errors
    "data": {"training", "model", "decoding", "evaluation", "export", "serve", "cli"},
    "decoding": {"training", "evaluation", "export", "serve", "cli"},
    "export": {"training", "evaluation", "serve", "cli"},
    "evaluation": {"training", "export", "serve", "cli"},
    "training": {"export", "serve", "cli"},
    "serve": {"training", "evaluation", "cli"},
}
ALWAYS_ALLOWED = {"errors"}


def layer_of(module: str) -> str:
    """``transformer_mt.data.corpus`` -> ``data``; the package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a ``transformer_mt`` module in ``path``."""
    here = ".".join(path.relative_to(package.parent).parts[:-1])  # the module's package
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return [(line, m) for line, m in found if m.split(".")[0] == "transformer_mt"]


def violations(package: Path = PACKAGE) -> list[str]:
    """``file:line: layer imports module`` for every import that points the wrong way."""
    out = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        layer = layer_of(module)
        forbidden = FORBIDDEN.get(layer, set())
        for line, imported in package_imports(path, package):
            target = layer_of(imported)
            if target == layer or target in ALWAYS_ALLOWED:
                continue
            if "*" in forbidden or target in forbidden or target == "":
                out.append(
                    f"{path.relative_to(package.parent)}:{line}: {layer}/ imports {imported}"
                )
    return out


def test_no_import_points_up_a_layer() -> None:
    assert violations() == []


def test_a_violation_is_reported_with_file_and_line(tmp_path: Path) -> None:
    package = tmp_path / "transformer_mt"
    (package / "model").mkdir(parents=True)
    (package / "data").mkdir()
    (package / "model" / "layers.py").write_text(
        "import torch\nfrom transformer_mt.errors import ConfigError\n"
        "from transformer_mt.data.batching import Batch\n"
    )
    (package / "data" / "corpus.py").write_text(
        "def f():\n    from transformer_mt.training.trainer import Trainer\n"
    )
    assert violations(package) == [
        "transformer_mt/data/corpus.py:2: data/ imports transformer_mt.training.trainer",
        "transformer_mt/model/layers.py:3: model/ imports transformer_mt.data.batching",
    ]
