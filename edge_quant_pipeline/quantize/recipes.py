"""The recipe catalog: built-in recipes plus ``recipes.yaml``, validated, hashed, translated.

A recipe names a quantization scheme for the whole model (``default``) and,
optionally, its own scheme for the embedding, the attention layers and the
feed-forward layers, each either one scheme or a map {block index: scheme}; a
scheme may name the algorithm that picks its values (``int4_dynamic_block32+gptq``,
see ``schemes.py``). It is the data form of litert-torch's ``GenerativeQuantRecipe``,
grown to what ai-edge-quantizer can do. A recipe may instead declare a quality
budget (``search:``), which ``search.py`` resolves per model into such a recipe.

This module imports neither torch nor litert-torch: Dagster loads it to build the
``recipe`` partitions, and that must stay fast.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from edge_quant_pipeline import op_names
from edge_quant_pipeline.gates import DEFAULT_GATES, GateConfigError, parse_gates
from edge_quant_pipeline.quantize.schemes import (
    SCHEMES,
    Compute,
    Op,
    Quantization,
    SchemeError,
    parse_quantization,
    refusal,
)

COMPONENTS = ("default", "embedding", "attention", "feedforward")
# A separate LM head's own scheme (a tied one is the embedding's table, so it follows `embedding`); written into the
# spec only when set, so that recipes without it keep their hash.
LM_HEAD = "lm_head"
FIELDS = (*COMPONENTS, LM_HEAD)
PER_BLOCK_COMPONENTS = ("attention", "feedforward")
RECIPE_KEYS = ("description", "gates", *FIELDS, "search")
# The ops whose weights each field quantizes (``default``: the embedding's too, when it has no scheme of its own).
FIELD_OPS = {
    "default": (Op.FULLY_CONNECTED, Op.EMBEDDING_LOOKUP),
    "embedding": (Op.EMBEDDING_LOOKUP,),
    "attention": (Op.FULLY_CONNECTED,),
    "feedforward": (Op.FULLY_CONNECTED,),
    LM_HEAD: (Op.FULLY_CONNECTED,),
}
# A search's budget, as the gate that its published evaluation must pass.
BUDGETS = ("max_mean_kl", "max_perplexity_ratio")
SEARCH_KEYS = (*BUDGETS, "schemes", "sensitivity_tokens")
DEFAULT_SENSITIVITY_TOKENS = 512

ComponentScheme = str | Mapping[int, str] | None


class RecipeError(ValueError):
    """A recipe is malformed; the message names the recipe, the field, the value and what is allowed."""


@dataclass(frozen=True)
class SearchSpec:
    """A quality budget: the smallest per-component, per-block choice among ``schemes`` that keeps ``metric``
    within ``budget`` on the eval text (``search.py``)."""

    gate: str  # one of BUDGETS
    budget: float
    schemes: tuple[str, ...]
    sensitivity_tokens: int = DEFAULT_SENSITIVITY_TOKENS  # of the eval text, per sensitivity measurement

    def spec(self) -> dict[str, Any]:
        return {
            self.gate: self.budget,
            "schemes": list(self.schemes),
            "sensitivity_tokens": self.sensitivity_tokens,
        }

    def candidates(self, op: Op) -> list[str]:
        """The schemes ai-edge-quantizer applies to ``op``'s weights, in the order they are listed."""
        return [name for name in self.schemes if refusal(parse_quantization(name), op) is None]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    default: str | None = None
    embedding: str | None = None
    attention: ComponentScheme = None
    feedforward: ComponentScheme = None
    lm_head: str | None = None
    source: str = "built-in"
    # Thresholds for publishing; not part of the spec, since they do not change the model.
    gates: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_GATES))
    search: SearchSpec | None = None  # a budget to resolve per model, instead of components

    @property
    def is_float(self) -> bool:
        """No component quantized: the float baseline."""
        return self.search is None and all(getattr(self, c) is None for c in FIELDS)

    def spec(self) -> dict[str, Any]:
        """Canonical form: what the recipe does, nothing about where it came from."""

        def canonical(value: ComponentScheme):
            if isinstance(value, Mapping):
                return {str(block): value[block] for block in sorted(value)}
            return value

        spec = {c: canonical(getattr(self, c)) for c in COMPONENTS}
        if self.lm_head:
            spec[LM_HEAD] = self.lm_head
        return {**spec, "search": self.search.spec()} if self.search else spec

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()

    @property
    def definition_hash(self) -> str:
        """The spec and the gates: all of the catalog entry that shapes a result (the quant_recipe data version)."""
        return hashlib.sha256(json.dumps([self.spec(), dict(self.gates)], sort_keys=True).encode()).hexdigest()

    @property
    def writes_fp16(self) -> bool:
        return any(q.scheme.is_float for q in self.quantizations_used())

    @property
    def dequantizes(self) -> bool:
        """Some weights are stored quantized for float compute (weight-only, fp16): the runtime dequantizes
        them to float32 buffers, which costs memory."""
        return any(q.scheme.compute is Compute.FLOAT for q in self.quantizations_used())

    @property
    def needs_calibration(self) -> bool:
        """Static activations or GPTQ somewhere: quantizing needs the model's calibration statistics."""
        return any(q.needs_calibration for q in self.quantizations_used())

    @property
    def needs_hessians(self) -> bool:
        """GPTQ somewhere: its calibration includes the layers' input Hessians."""
        return any(q.algorithm == "gptq" for q in self.quantizations_used())

    def schemes_used(self) -> set[str]:
        """The fields' values (or a search's candidates), as written."""
        if self.search:
            return set(self.search.schemes)
        used = set()
        for component in FIELDS:
            value = getattr(self, component)
            used.update(value.values() if isinstance(value, Mapping) else [value] if value else [])
        return used

    def quantizations_used(self) -> list[Quantization]:
        return [parse_quantization(name) for name in sorted(self.schemes_used())]


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


_OP_WORDS = {Op.FULLY_CONNECTED: "the fully-connected layers", Op.EMBEDDING_LOOKUP: "the embedding"}


def _quantization(recipe: str, field_name: str, value: Any, ops: tuple[Op, ...]) -> str:
    """The field's value as a canonical scheme name, checked against each op it applies to."""
    try:
        quantization = parse_quantization(value)
    except SchemeError as error:
        raise RecipeError(f"recipe {recipe!r}, field {field_name!r}: {error}") from None
    for op in ops:
        if reason := refusal(quantization, op):
            fix = (
                "; give the embedding its own scheme, for example embedding: int8_dynamic"
                if field_name == "default" and op is Op.EMBEDDING_LOOKUP
                else ""
            )
            raise RecipeError(
                f"recipe {recipe!r}, field {field_name!r}: {quantization.name} on {_OP_WORDS[op]} "
                f"({op.value}): {reason}{fix}."
            )
    return quantization.name


def _component(recipe: str, component: str, value: Any, ops: tuple[Op, ...]) -> ComponentScheme:
    if value is None or not isinstance(value, Mapping):
        return None if value is None else _quantization(recipe, component, value, ops)
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
        blocks[block] = _quantization(recipe, f"{component}.{block}", scheme, ops)
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
    try:
        gates = {**default_gates, **parse_gates(f"recipe {name!r}", body.get("gates"))}
    except GateConfigError as error:
        raise RecipeError(str(error)) from None
    if "search" in body:
        if set(body) & set(FIELDS):
            raise RecipeError(
                f"recipe {name!r}: 'search' chooses every component's scheme itself; remove "
                f"{', '.join(sorted(set(body) & set(FIELDS)))}."
            )
        search = _search(name, body["search"])
        gates = {**gates, search.gate: search.budget}  # the budget is what its published evaluation must pass
        return Recipe(
            name=name, description=str(body.get("description", "")), source=source, gates=gates, search=search
        )
    # ``default`` quantizes the embedding too, unless the embedding has its own scheme
    default_ops = FIELD_OPS["default"] if body.get("embedding") is None else (Op.FULLY_CONNECTED,)
    ops = {**FIELD_OPS, "default": default_ops}
    components = {c: _component(name, c, body.get(c), ops[c]) for c in FIELDS}
    if all(v is None for v in components.values()):
        raise RecipeError(
            f"recipe {name!r}: sets no scheme; give at least one of {', '.join(FIELDS)}, or a 'search' budget."
        )
    return Recipe(name=name, description=str(body.get("description", "")), source=source, gates=gates, **components)


def _search(recipe: str, body: Any) -> SearchSpec:
    where = f"recipe {recipe!r}, field 'search'"
    if not isinstance(body, Mapping):
        raise RecipeError(f"{where}: expected a mapping with a budget ({' or '.join(BUDGETS)}) and 'schemes'.")
    unknown = sorted(set(map(str, body)) - set(SEARCH_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}. Allowed keys: {', '.join(SEARCH_KEYS)}.")
    budgets = [gate for gate in BUDGETS if gate in body]
    if len(budgets) != 1:
        raise RecipeError(f"{where}: give exactly one budget, {' or '.join(BUDGETS)} (got {len(budgets)}).")
    gate, budget = budgets[0], body[budgets[0]]
    floor = 1.0 if gate == "max_perplexity_ratio" else 0.0
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= floor:
        raise RecipeError(f"{where}: {gate} must be a number above {floor:g}, not {budget!r}.")
    schemes = body.get("schemes")
    if not isinstance(schemes, list) or not schemes:
        raise RecipeError(f"{where}: 'schemes' must list the candidate schemes, for example [int8_dynamic, ...].")
    names = tuple(
        _quantization(recipe, f"search.schemes[{i}]", s, (Op.FULLY_CONNECTED,)) for i, s in enumerate(schemes)
    )
    tokens = body.get("sensitivity_tokens", DEFAULT_SENSITIVITY_TOKENS)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise RecipeError(f"{where}: sensitivity_tokens must be a positive whole number, not {tokens!r}.")
    spec = SearchSpec(gate, float(budget), names, tokens)
    if not spec.candidates(Op.EMBEDDING_LOOKUP):
        raise RecipeError(
            f"{where}: none of {', '.join(names)} applies to the embedding (EMBEDDING_LOOKUP); add one that does, "
            "for example int8_dynamic."
        )
    return spec


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
    elif component == "lm_head":
        specific, field_name = recipe.lm_head, LM_HEAD
    else:
        specific, field_name = None, "default"
    return (field_name, specific) if specific else ("default", recipe.default)


def block_size(name: str | None) -> int | None:
    return parse_quantization(name).scheme.block_size if name else None


def fitting_block_schemes(dims: tuple[int, ...]) -> list[str]:
    """The blockwise schemes whose block size divides every one of ``dims``."""
    return [n for n, s in SCHEMES.items() if s.block_size and all(d % s.block_size == 0 for d in dims)]


def validate_for_model(recipe: Recipe, shape) -> None:
    """Checks that need the model: block indices that exist, int4 blocks that divide its weights.

    ``shape`` is an ``architectures.ModelShape``. A search recipe is checked when it is resolved (``search.py``
    leaves out the candidates that do not fit a component).
    """
    if recipe.lm_head and shape.tied_lm_head:
        raise RecipeError(
            f"recipe {recipe.name!r}, field {LM_HEAD!r}: this model's LM head is its embedding table (tied), which "
            "follows the 'embedding' field; set that instead."
        )
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
            size = block_size(scheme)
            bad = [d for d in dims if size and d % size]
            if bad:
                raise RecipeError(
                    f"recipe {recipe.name!r}, field {field_name!r}: {scheme} needs the {component} weights' input "
                    f"size divisible by {size}, but this model's is {bad[0]}. "
                    f"Blockwise schemes that fit: {', '.join(fitting_block_schemes(dims)) or 'none'}; or use a "
                    "per-channel scheme."
                )


# --- translation to ai-edge-quantizer -------------------------------------------------------------

# The rules litert-torch 0.10's ``translate_recipe`` writes for a GenerativeQuantRecipe, field for
# field and in the same order (tests/test_recipes.py pins them to upstream's output), but
# - scoped with the op names litert-torch's converter writes today (op_names.py): upstream's scopes
#   ('transformer_block/...', 'StatefulPartitionedCall') no longer match them, so its selective
#   rules silently fall back to the default scheme;
# - without importing litert_torch, which would cost every quantization run 6 s and 1.1 GB of torch.
_ALL_OPS, _FULLY_CONNECTED = "*", "FULLY_CONNECTED"


def _add_rule(manager, name: str, scope: str, operation: str | None = None) -> None:
    from ai_edge_quantizer import qtyping

    quantization = parse_quantization(name)
    # Calibrated choices (static activations, GPTQ) exist for fully-connected layers only: a rule for every op of
    # the scope would make its other ops static too, which the runtime cannot run (tests/test_schemes.py).
    operation = operation or (_FULLY_CONNECTED if quantization.needs_calibration else _ALL_OPS)
    manager.add_quantization_config(
        regex=scope,
        operation_name=qtyping.TFLOperationName(operation),
        op_config=quantization.op_config(),
        algorithm_key=quantization.algorithm_key,
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
    if recipe.lm_head and not tied_lm_head:
        _add_rule(manager, recipe.lm_head, op_names.LM_HEAD, _FULLY_CONNECTED)
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
