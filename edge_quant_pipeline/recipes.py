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


def parse_recipe(name: str, body: Any, source: str, default_gates: Mapping[str, float] = DEFAULT_GATES) -> Recipe:
    if not isinstance(body, Mapping):
        raise RecipeError(f"recipe {name!r} in {source}: expected a mapping with keys {', '.join(RECIPE_KEYS)}.")
    unknown = sorted(set(body) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(
            f"recipe {name!r} in {source}: unknown key(s) {', '.join(map(str, unknown))}. "
            f"Allowed keys: {', '.join(RECIPE_KEYS)}."
        )
    components = {c: _component(name, c, body.get(c)) for c in COMPONENTS}
    if all(v is None for v in components.values()):
        raise RecipeError(f"recipe {name!r} in {source}: sets no scheme; give at least one of {', '.join(COMPONENTS)}.")
    try:
        gates = {**default_gates, **parse_gates(f"recipe {name!r} in {source}", body.get("gates"))}
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


def load_catalog(recipes_yaml: Path | None) -> Catalog:
    """Built-in recipes plus those of ``recipes_yaml``.

    A malformed recipe does not hide the others: it stays in the catalog with its
    error, so only its own partitions fail. A file that is not YAML at all fails whole.
    """
    if recipes_yaml is None or not recipes_yaml.exists():
        return Catalog(dict(BUILTIN_RECIPES), {})
    try:
        document = yaml.safe_load(recipes_yaml.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{recipes_yaml}: not valid YAML ({error}).") from None
    entries = document.get("recipes", {}) if isinstance(document, Mapping) else None
    if not isinstance(entries, Mapping):
        raise RecipeError(f"{recipes_yaml}: expected a top-level 'recipes:' mapping of recipe name -> recipe.")
    try:
        default_gates = {**DEFAULT_GATES, **parse_gates(f"{recipes_yaml} (top level)", document.get("gates"))}
    except GateConfigError as error:
        raise RecipeError(str(error)) from None
    recipes = {name: replace(recipe, gates=default_gates) for name, recipe in BUILTIN_RECIPES.items()}
    errors = {}
    for name, body in entries.items():
        name = str(name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise RecipeError(f"{recipes_yaml}: recipe name {name!r} may only use letters, digits, '_', '.', '-'.")
        try:
            if name in BUILTIN_RECIPES:
                raise RecipeError(f"recipe {name!r} in {recipes_yaml}: this name is built in; give yours another name.")
            recipes[name] = parse_recipe(name, body, str(recipes_yaml), default_gates)
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

# litert-torch 0.10 translates a GenerativeQuantRecipe into ai-edge-quantizer rules
# whose scope regexes no longer match the op names its own converter writes
# (e.g. 'transformer_block/...attention' vs '...TransformerBlock_0/...CausalSelfAttention',
# and 'StatefulPartitionedCall' vs 'decode_logits_output'), so selective rules
# silently fall back to the default scheme. We keep upstream's translation of each
# scheme and retarget only the scopes; an unknown upstream scope fails loudly so a
# litert-torch upgrade that changes them cannot slip through.
_BLOCK_SCOPE = re.compile(
    r"transformer_block(?:s\\\[(?P<block>\d+)\\\])?/litert_torch\.generative\.layers\.(?P<layer>attention|feed_forward)"
)
_LAYER_SCOPE = {"attention": op_names.ATTENTION, "feed_forward": op_names.FEEDFORWARD}
_FIXED_SCOPES = {".*": ".*", "Embedding_tok_embedding": op_names.EMBEDDING, "StatefulPartitionedCall": op_names.LM_HEAD}


def retarget_scope(upstream_regex: str) -> str:
    if upstream_regex in _FIXED_SCOPES:
        return _FIXED_SCOPES[upstream_regex]
    match = _BLOCK_SCOPE.fullmatch(upstream_regex)
    if match is None:
        raise RecipeError(
            f"litert-torch produced an unexpected quantization scope {upstream_regex!r}; update retarget_scope()."
        )
    return op_names.block_scope(_LAYER_SCOPE[match["layer"]], match["block"] or r"\d+")


def generative_recipe(recipe: Recipe, model_config: Any):
    """The litert-torch ``GenerativeQuantRecipe`` for ``recipe`` (None for the float recipe)."""
    if recipe.is_float:
        return None
    from litert_torch.generative.quantize import quant_attrs, quant_recipe

    def layer(name: str):
        scheme = SCHEMES[name]
        return quant_recipe.LayerQuantRecipe(
            activation_dtype=quant_attrs.Dtype.FP32,
            weight_dtype=quant_attrs.Dtype[scheme.weight_dtype],
            mode=quant_attrs.Mode[scheme.mode],
            algorithm=quant_attrs.Algorithm.FLOAT_CAST
            if scheme.weight_dtype == "FP16"
            else quant_attrs.Algorithm.MIN_MAX,
            granularity=quant_attrs.Granularity[scheme.granularity],
        )

    def component(value: ComponentScheme):
        if isinstance(value, Mapping):
            return {block: layer(s) for block, s in value.items()}
        return layer(value) if value else None

    result = quant_recipe.GenerativeQuantRecipe(
        default=component(recipe.default),
        embedding=component(recipe.embedding),
        attention=component(recipe.attention),
        feedforward=component(recipe.feedforward),
        _model_config=model_config,
    )
    result.verify()
    return result


def ai_edge_quantizer_recipe(recipe: Recipe, model_config: Any) -> list[dict[str, Any]]:
    """Plain-data ai-edge-quantizer recipe, with scopes that match litert-torch's op names."""
    from litert_torch.quantize import translate_recipe

    rules = translate_recipe.translate_to_ai_edge_recipe(generative_recipe(recipe, model_config))
    return [{**rule, "regex": retarget_scope(rule["regex"])} for rule in rules]
