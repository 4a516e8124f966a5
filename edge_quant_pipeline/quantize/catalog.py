"""The recipe catalog: the built-in recipes plus those of ``recipes.yaml``, each with its parse error if it has one,
so that a broken recipe fails only its own partitions."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from edge_quant_pipeline.gates import DEFAULT_GATES, GateConfigError, parse_gates
from edge_quant_pipeline.quantize.recipes import BUILTIN_RECIPES, Recipe, RecipeError, parse_recipe, where_in


class CalibrationNeed(enum.Enum):
    """What a checkpoint's calibration computes for the recipes of a catalog. Each step costs more: the Hessians
    take 4 x input size^2 bytes per distinct layer input (5.1 GB for the Llama 3.2 1B shape's 16 layers)."""

    NONE = "none"  # no recipe needs calibration: nothing runs
    RANGES = "ranges"  # static activations: each layer's input and output ranges
    HESSIANS = "hessians"  # GPTQ as well: each layer's input Hessian


@dataclass(frozen=True)
class Catalog:
    """Every recipe name users see as a partition; broken ones carry their error instead."""

    recipes: dict[str, Recipe]
    errors: dict[str, str]

    @property
    def calibration_need(self) -> CalibrationNeed:
        usable = [recipe for name, recipe in self.recipes.items() if name not in self.errors]
        if any(recipe.needs_hessians for recipe in usable):
            return CalibrationNeed.HESSIANS
        if any(recipe.needs_calibration for recipe in usable):
            return CalibrationNeed.RANGES
        return CalibrationNeed.NONE

    @property
    def names(self) -> list[str]:
        return list(self.recipes) + [name for name in self.errors if name not in self.recipes]

    def get(self, name: str) -> Recipe:
        if name in self.errors:
            raise RecipeError(self.errors[name])
        if name not in self.recipes:
            raise RecipeError(f"recipe {name!r} is not in the catalog. Known recipes: {', '.join(self.names)}.")
        return self.recipes[name]


def _key_lines(node: yaml.Node | None) -> dict[str, int]:
    """The line (from 1) of each key of a YAML mapping, for messages that say where to look."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def _yaml_error(path: Path, error: yaml.YAMLError) -> RecipeError:
    """One line: where the parser stopped and why, rather than PyYAML's multi-line excerpt."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    reason = " ".join(f"{problem} {context or ''}".split())
    return RecipeError(f"{where}: not valid YAML: {reason}.")


def _read_yaml(path: Path) -> tuple[Any, dict[str, int], dict[str, int]]:
    """The document, the lines of its top-level keys and of its recipes."""
    try:
        text = path.read_text()
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise _yaml_error(path, error) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot be read as text ({error}).") from None
    top = {str(key.value): value for key, value in root.value} if isinstance(root, yaml.MappingNode) else {}
    return document, _key_lines(root), _key_lines(top.get("recipes"))


def load_catalog(recipes_yaml: Path | None) -> Catalog:
    """Built-in recipes plus those of ``recipes_yaml``.

    A malformed recipe does not hide the others: it stays in the catalog with its
    error (which names the file and line), so only its own partitions fail. A file that
    is not YAML at all, or not a ``recipes:`` mapping, fails whole.
    """
    if recipes_yaml is None or not recipes_yaml.exists():
        return Catalog(dict(BUILTIN_RECIPES), {})
    document, top_lines, lines = _read_yaml(recipes_yaml)
    entries = document.get("recipes", {}) if isinstance(document, Mapping) else None
    if not isinstance(entries, Mapping):
        raise RecipeError(f"{recipes_yaml}: expected a top-level 'recipes:' mapping of recipe name -> recipe.")
    where = f"{where_in(recipes_yaml, top_lines.get('gates'))} (top-level gates)"
    try:
        default_gates = {**DEFAULT_GATES, **parse_gates(where, document.get("gates"))}
    except GateConfigError as error:
        raise RecipeError(str(error)) from None
    recipes = {name: replace(recipe, gates=default_gates) for name, recipe in BUILTIN_RECIPES.items()}
    errors = {}
    for name, body in entries.items():
        name, where = str(name), where_in(recipes_yaml, lines.get(str(name)))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise RecipeError(f"{where}: recipe name {name!r} may only use letters, digits, '_', '.', '-'.")
        try:
            if name in BUILTIN_RECIPES:
                raise RecipeError(f"{where}: recipe {name!r}: this name is built in; give yours another name.")
            recipes[name] = parse_recipe(name, body, str(recipes_yaml), default_gates, lines.get(name))
        except RecipeError as error:
            errors[name] = str(error)
    return Catalog(recipes, errors)
