"""The package's dependency chain (ARCHITECTURE.md, "Modules, in dependency order"), read from the code's imports.

Every import of one of the package's units by another, at module level or inside a function, must point down the
chain; units on the same rung do not import each other. Only `integration` reaches into DeepSpeed's runtime.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.config.schema import json_keys

PACKAGE = Path(__file__).resolve().parent.parent / "deepspeed_fuyou"

CHAIN: tuple[frozenset[str], ...] = tuple(
    frozenset(rung)
    for rung in (
        {"errors"},
        {"trace", "distributed", "checkpoints", "storages"},  # helpers that need nothing of the package but errors
        {"config"},  # the schema of the "fuyou" block, its I/O options included
        {"io"},  # the engine, the pinned pool, swap directories, and their compiled core (`_C`)
        {"plan"},  # what a config means on this machine: preflight, sizing, layers, ZeRO layout, DRAM tier
        # the runtimes, and the estimator, which predicts what they allocate and move from `plan` alone
        {"swap", "activations", "estimator"},
        {"integration"},  # the one unit that replaces DeepSpeed names and subclasses its internals
        {"cli"},
        {"_hook"},  # the import hook, which registers `integration` once DeepSpeed is imported
    )
)
RUNG = {unit: level for level, rung in enumerate(CHAIN) for unit in rung}

DEEPSPEED_CONFIG_SCHEMA = "deepspeed.runtime.zero.config"
"""The one DeepSpeed runtime module below `integration`: ZeRO's config model, whose defaults `plan` reads."""


def unit_of(module: str) -> str | None:
    """The unit a dotted module name belongs to ("deepspeed_fuyou.plan.sizing" -> "plan"); None outside the
    package, and for the package root and its attributes (`__version__`), which importing any unit loads first."""
    parts = module.split(".")
    if parts[0] != "deepspeed_fuyou" or len(parts) == 1:
        return None
    if parts[1] == "_C":
        return "io"
    is_unit = (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").exists()
    return parts[1] if is_unit else None


def imported_modules(source: str, module: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything `source` (module `module`) imports, wherever the import statement is."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from deepspeed_fuyou import io` imports the unit `io`
                yield node.lineno, f"{base}.{alias.name}" if base == "deepspeed_fuyou" else base


def package_sources() -> dict[str, str]:
    """Dotted module name -> source of every module of the package."""
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text()
    return sources


def back_edges(sources: Mapping[str, str]) -> list[str]:
    """Every import that points up the chain or sideways to another unit of the same rung, as readable lines."""
    problems = []
    for module, source in sources.items():
        importer = unit_of(module)
        if importer is None:
            continue
        for line, imported in imported_modules(source, module):
            target = unit_of(imported)
            if target is None or target == importer:
                continue
            if target not in RUNG or importer not in RUNG:
                problems.append(f"{module}:{line} imports {imported}: add its unit to the chain in this test")
            elif RUNG[target] >= RUNG[importer]:
                problems.append(f"{module}:{line} imports {imported}: {importer} must not depend on {target}")
    return problems


def test_every_import_inside_the_package_points_down_the_chain() -> None:
    sources = package_sources()
    assert {unit_of(name) for name in sources} - {None} <= set(RUNG) | {"__main__"}
    assert back_edges(sources) == []


@pytest.mark.parametrize(
    ("module", "statement"),
    [
        ("deepspeed_fuyou.io.engine", "from deepspeed_fuyou.plan.sizing import aligned"),  # up the chain
        ("deepspeed_fuyou.config.fuyou", "from deepspeed_fuyou.io import native"),  # the old config -> io cycle
        ("deepspeed_fuyou.swap.runtime", "from deepspeed_fuyou.activations import offloader"),  # sideways
        ("deepspeed_fuyou.estimator.memory", "from deepspeed_fuyou.swap import runtime"),  # estimator -> runtime
        ("deepspeed_fuyou.swap.stepper", "    from deepspeed_fuyou import integration"),  # inside a function
        ("deepspeed_fuyou.plan.sizing", "from ..swap import runtime"),  # relative
    ],
)
def test_a_back_edge_fails_the_chain_check(module: str, statement: str) -> None:
    sources = package_sources()
    if statement.startswith(" "):
        statement = f"def later() -> None:\n{statement}\n"
    sources[module] += f"\n{statement}\n"
    (problem,) = back_edges(sources)
    assert problem.startswith(f"{module}:")


def test_only_integration_reaches_into_deepspeeds_runtime() -> None:
    reaching = [
        f"{module}:{line} imports {imported}"
        for module, source in package_sources().items()
        if unit_of(module) != "integration"
        for line, imported in imported_modules(source, module)
        if imported.startswith("deepspeed.runtime") and imported != DEEPSPEED_CONFIG_SCHEMA
    ]
    assert reaching == []


def test_the_io_layer_names_no_setting_of_the_block() -> None:
    """Errors of `io` name the setting their owner passed (a pool's `short_budget`, a swap space's `field`, the
    options' own `json_path`), so the generic layer never needs to know the JSON schema."""
    setting = re.compile(rf"\bfuyou\.({'|'.join(json_keys(FuyouConfig))})\b")
    named = []
    for path in sorted((PACKAGE / "io").glob("*.py")):
        tree = ast.parse(path.read_text())
        documented = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef))]
        docstrings = {id(node.body[0].value) for node in documented if ast.get_docstring(node) is not None}
        named += [
            f"{path.name}:{node.lineno} {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            if setting.search(node.value)
        ]
    assert named == []
