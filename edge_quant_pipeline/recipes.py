"""The recipe catalog: built-in recipes plus ``recipes.yaml``, validated, hashed, translated.

A recipe names a quantization scheme for the whole model (``default``) and,
optionally, its own scheme for the embedding, the attention layers and the
feed-forward layers, each either one scheme or a map {block index: scheme}.
It is the data form of litert-torch's ``GenerativeQuantRecipe``.

This module imports neither torch nor litert-torch at import time: Dagster
loads it to build the ``recipe`` partitions, and that must stay fast.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from edge_quant_pipeline import op_names
from edge_quant_pipeline.gates import DEFAULT_GATES, GateConfigError, parse_gates

COMPONENTS = ("default", "embedding", "attention", "feedforward")
PER_BLOCK_COMPONENTS = ("attention", "feedforward")
RECIPE_KEYS = ("description", "gates") + COMPONENTS


@dataclass(frozen=True)
class Scheme:
    """One of litert-torch's supported layer schemes (``supported_schemes.py``)."""

    weight_dtype: str  # quant_attrs.Dtype name
    mode: str  # quant_attrs.Mode name
    granularity: str  # quant_attrs.Granularity name

    @property
    def block_size(self) -> int | None:
        prefix = "BLOCKWISE_"
        return int(self.granularity[len(prefix) :]) if self.granularity.startswith(prefix) else None


SCHEMES: dict[str, Scheme] = {
    "int8_dynamic": Scheme("INT8", "DYNAMIC_RANGE", "CHANNELWISE"),
    "int8_weight_only": Scheme("INT8", "WEIGHT_ONLY", "CHANNELWISE"),
    "fp16": Scheme("FP16", "WEIGHT_ONLY", "NONE"),
    **{
        f"int4_dynamic_block{size}": Scheme("INT4", "DYNAMIC_RANGE", f"BLOCKWISE_{size}") for size in (32, 64, 128, 256)
    },
}

ComponentScheme = str | Mapping[int, str] | None


class RecipeError(ValueError):
    """A recipe is malformed; the message names the recipe, the field, the value and what is allowed."""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    default: str | None = None
    embedding: str | None = None
    attention: ComponentScheme = None
    feedforward: ComponentScheme = None
    source: str = "built-in"
    # Thresholds for publishing; not part of the spec, since they do not change the model.
    gates: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_GATES))

    @property
    def is_float(self) -> bool:
        """No component quantized: the float baseline."""
        return all(getattr(self, c) is None for c in COMPONENTS)

    def spec(self) -> dict[str, Any]:
        """Canonical form: what the recipe does, nothing about where it came from."""

        def canonical(value: ComponentScheme):
            if isinstance(value, Mapping):
                return {str(block): value[block] for block in sorted(value)}
            return value

        return {c: canonical(getattr(self, c)) for c in COMPONENTS}

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()

    @property
    def definition_hash(self) -> str:
        """The spec and the gates: all of the catalog entry that shapes a result (the quant_recipe data version)."""
        return hashlib.sha256(json.dumps([self.spec(), dict(self.gates)], sort_keys=True).encode()).hexdigest()

    @property
    def writes_fp16(self) -> bool:
        return any(SCHEMES[name].weight_dtype == "FP16" for name in self.schemes_used())

    @property
    def dequantizes(self) -> bool:
        """Some weights are stored quantized for float compute (int8 weight-only, fp16): the runtime dequantizes
        them to float32 buffers, which costs memory."""
        return any(SCHEMES[name].mode == "WEIGHT_ONLY" for name in self.schemes_used())

    def schemes_used(self) -> set[str]:
        used = set()
        for component in COMPONENTS:
            value = getattr(self, component)
            used.update(value.values() if isinstance(value, Mapping) else [value] if value else [])
        return used


BUILTIN_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("float", "No quantization: the float32 baseline every other recipe is compared with."),
        Recipe(
            "dynamic_int8",
            "int8 weights, per channel; activations quantized at run time (integer compute).",
            default="int8_dynamic",
        ),
        Recipe(
            "weight_only_int8",
            "int8 weights, per channel, dequantized to float at run time (float compute).",
            default="int8_weight_only",
        ),
        Recipe("fp16", "float16 weights, float compute.", default="fp16"),
        Recipe(
            "dynamic_int4_block32",
            "int4 weights in blocks of 32, dynamic-range compute.",
            default="int4_dynamic_block32",
        ),
        Recipe(
            "dynamic_int4_block128",
            "int4 weights in blocks of 128, dynamic-range compute.",
            default="int4_dynamic_block128",
        ),
    )
}


def _scheme(recipe: str, component: str, value: Any) -> str:
    if value not in SCHEMES:
        raise RecipeError(
            f"recipe {recipe!r}, field {component!r}: unknown scheme {value!r}. Allowed schemes: {', '.join(SCHEMES)}."
        )
    return value


def _component(recipe: str, component: str, value: Any) -> ComponentScheme:
    if value is None or not isinstance(value, Mapping):
        return None if value is None else _scheme(recipe, component, value)
    if component not in PER_BLOCK_COMPONENTS:
        raise RecipeError(
            f"recipe {recipe!r}, field {component!r}: a per-block map is only allowed for "
            f"{' and '.join(PER_BLOCK_COMPONENTS)}; give one scheme name."
        )
    blocks = {}
    for block, scheme in value.items():
        if not isinstance(block, int) or isinstance(block, bool) or block < 0:
            raise RecipeError(
                f"recipe {recipe!r}, field {component!r}: block index {block!r} is not a non-negative integer."
            )
        blocks[block] = _scheme(recipe, f"{component}.{block}", scheme)
    return blocks


def _at(source: Path | str, line: int | None) -> str:
    return f"{source}, line {line}" if line else str(source)


def parse_recipe(
    name: str, body: Any, source: str, default_gates: Mapping[str, float] = DEFAULT_GATES, line: int | None = None
) -> Recipe:
    """The recipe ``name`` as ``source`` (a file, its entry at ``line``) gives it; a RecipeError starts there."""
    try:
        return _parse_recipe(name, body, source, default_gates)
    except RecipeError as error:
        raise RecipeError(f"{_at(source, line)}: {error}") from None


def _parse_recipe(name: str, body: Any, source: str, default_gates: Mapping[str, float]) -> Recipe:
    if not isinstance(body, Mapping):
        raise RecipeError(f"recipe {name!r}: expected a mapping with keys {', '.join(RECIPE_KEYS)}.")
    unknown = sorted(set(body) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(
            f"recipe {name!r}: unknown key(s) {', '.join(map(str, unknown))}. Allowed keys: {', '.join(RECIPE_KEYS)}."
        )
    components = {c: _component(name, c, body.get(c)) for c in COMPONENTS}
    if all(v is None for v in components.values()):
        raise RecipeError(f"recipe {name!r}: sets no scheme; give at least one of {', '.join(COMPONENTS)}.")
    try:
        gates = {**default_gates, **parse_gates(f"recipe {name!r}", body.get("gates"))}
    except GateConfigError as error:
        raise RecipeError(str(error)) from None
    return Recipe(name=name, description=str(body.get("description", "")), source=source, gates=gates, **components)


@dataclass(frozen=True)
class Catalog:
    """Every recipe name users see as a partition; broken ones carry their error instead."""

    recipes: dict[str, Recipe]
    errors: dict[str, str]

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
    where = f"{_at(recipes_yaml, top_lines.get('gates'))} (top-level gates)"
    try:
        default_gates = {**DEFAULT_GATES, **parse_gates(where, document.get("gates"))}
    except GateConfigError as error:
        raise RecipeError(str(error)) from None
    recipes = {name: replace(recipe, gates=default_gates) for name, recipe in BUILTIN_RECIPES.items()}
    errors = {}
    for name, body in entries.items():
        name, where = str(name), _at(recipes_yaml, lines.get(str(name)))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise RecipeError(f"{where}: recipe name {name!r} may only use letters, digits, '_', '.', '-'.")
        try:
            if name in BUILTIN_RECIPES:
                raise RecipeError(f"{where}: recipe {name!r}: this name is built in; give yours another name.")
            recipes[name] = parse_recipe(name, body, str(recipes_yaml), default_gates, lines.get(name))
        except RecipeError as error:
            errors[name] = str(error)
    return Catalog(recipes, errors)


def scheme_for(recipe: Recipe, component: str, block: int | None, tied_lm_head: bool) -> tuple[str, str | None]:
    """(field that decides, scheme) for one component: narrower rules win over ``default``.

    A tied LM head shares the embedding's weights, so it follows the embedding.
    """
    if component in PER_BLOCK_COMPONENTS:
        value = getattr(recipe, component)
        specific = value.get(block) if isinstance(value, Mapping) else value
        field_name = f"{component}.{block}" if isinstance(value, Mapping) else component
    elif component == "embedding" or (component == "lm_head" and tied_lm_head):
        specific, field_name = recipe.embedding, "embedding"
    else:
        specific, field_name = None, "default"
    return (field_name, specific) if specific else ("default", recipe.default)


def validate_for_model(recipe: Recipe, shape) -> None:
    """Checks that need the model: block indices that exist, int4 blocks that divide its weights.

    ``shape`` is an ``architectures.ModelShape``.
    """
    for component in PER_BLOCK_COMPONENTS:
        value = getattr(recipe, component)
        outside = sorted(b for b in value if b >= shape.num_layers) if isinstance(value, Mapping) else []
        if outside:
            raise RecipeError(
                f"recipe {recipe.name!r}, field {component!r}: block index {outside[0]} is outside the model, "
                f"which has {shape.num_layers} blocks (allowed indices: 0-{shape.num_layers - 1})."
            )
    for component, dims in shape.reduction_dims.items():
        blocks = range(shape.num_layers) if component in PER_BLOCK_COMPONENTS else [None]
        for block in blocks:
            field_name, scheme = scheme_for(recipe, component, block, shape.tied_lm_head)
            size = SCHEMES[scheme].block_size if scheme else None
            bad = [d for d in dims if size and d % size]
            if bad:
                fitting = [n for n, s in SCHEMES.items() if s.block_size and all(d % s.block_size == 0 for d in dims)]
                raise RecipeError(
                    f"recipe {recipe.name!r}, field {field_name!r}: {scheme} needs the {component} weights' input "
                    f"size divisible by {size}, but this model's is {bad[0]}. "
                    f"int4 schemes that fit: {', '.join(fitting) or 'none'}; or use an int8 or fp16 scheme."
                )


# --- translation to ai-edge-quantizer -------------------------------------------------------------

# The rules litert-torch 0.10's ``translate_recipe`` writes for a GenerativeQuantRecipe, field for
# field and in the same order (tests/test_recipes.py pins them to upstream's output), but
# - scoped with the op names litert-torch's converter writes today (op_names.py): upstream's scopes
#   ('transformer_block/...', 'StatefulPartitionedCall') no longer match them, so its selective
#   rules silently fall back to the default scheme;
# - without importing litert_torch, which would cost every quantization run 6 s and 1.1 GB of torch.
_ALL_OPS, _FULLY_CONNECTED = "*", "FULLY_CONNECTED"


def _add_rule(manager, scheme_name: str, scope: str, operation: str = _ALL_OPS) -> None:
    from ai_edge_quantizer import algorithm_manager, qtyping

    scheme = SCHEMES[scheme_name]
    is_float = scheme.weight_dtype == "FP16"
    manager.add_quantization_config(
        regex=scope,
        operation_name=qtyping.TFLOperationName(operation),
        op_config=qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits={"INT8": 8, "INT4": 4, "FP16": 16}[scheme.weight_dtype],
                symmetric=True,
                granularity=qtyping.QuantGranularity[
                    "TENSORWISE" if scheme.granularity == "NONE" else scheme.granularity
                ],
                dtype=qtyping.TensorDataType.FLOAT if is_float else qtyping.TensorDataType.INT,
            ),
            compute_precision=qtyping.ComputePrecision.INTEGER
            if scheme.mode == "DYNAMIC_RANGE"
            else qtyping.ComputePrecision.FLOAT,
            explicit_dequantize=scheme.mode == "WEIGHT_ONLY",
        ),
        algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING
        if is_float
        else algorithm_manager.AlgorithmName.MIN_MAX_UNIFORM_QUANT,
    )


def ai_edge_quantizer_recipe(recipe: Recipe, tied_lm_head: bool) -> list[dict[str, Any]]:
    """Plain-data ai-edge-quantizer recipe (empty for the float recipe)."""
    from ai_edge_quantizer import recipe_manager

    manager = recipe_manager.RecipeManager()
    if recipe.default:
        _add_rule(manager, recipe.default, ".*")
    if recipe.embedding:
        _add_rule(manager, recipe.embedding, op_names.EMBEDDING)
        if tied_lm_head:  # the LM head reads the embedding's weights
            _add_rule(manager, recipe.embedding, op_names.LM_HEAD, _FULLY_CONNECTED)
    for component, layer in (("attention", op_names.ATTENTION), ("feedforward", op_names.FEEDFORWARD)):
        value = getattr(recipe, component)
        if isinstance(value, Mapping):
            for block, scheme in value.items():
                _add_rule(manager, scheme, op_names.block_scope(layer, str(block)))
        elif value:
            _add_rule(manager, value, op_names.block_scope(layer))
    return manager.get_quantization_recipe()


def embedder_quantizer_recipe(recipe: Recipe) -> list[dict[str, Any]]:
    """For a model's embedder file (``embedders.py``), one embedding lookup: the recipe's embedding scheme."""
    from ai_edge_quantizer import recipe_manager

    scheme = scheme_for(recipe, "embedding", None, tied_lm_head=False)[1]
    if not scheme:
        return []
    manager = recipe_manager.RecipeManager()
    _add_rule(manager, scheme, ".*")
    return manager.get_quantization_recipe()
