"""The recipe language: what a recipe says, parsed and checked on its own, and the built-in recipes.

A recipe names a quantization scheme for the whole model (``default``) and,
optionally, its own scheme for the embedding, the attention layers and the
feed-forward layers, each either one scheme or a map {block index: scheme}; a
scheme may name the algorithm that picks its values (``int4_dynamic_block32+gptq``,
see ``schemes.py``). It is the data form of litert-torch's ``GenerativeQuantRecipe``,
grown to what ai-edge-quantizer can do. A recipe may instead declare a quality
budget (``search:``), which ``search.py`` resolves per model into such a recipe.

``catalog.py`` reads the built-in recipes and ``recipes.yaml`` into the catalog; ``translate.py`` checks a recipe
against a model and writes it as ai-edge-quantizer's recipe. None of the three imports torch or litert-torch:
Dagster loads them to build the ``recipe`` partitions, and that must stay fast.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edge_quant_pipeline.gates import DEFAULT_GATES, GateConfigError, parse_gates
from edge_quant_pipeline.quantize.schemes import (
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
    def stored_share(self) -> float:
        """At most this share of the float32 file do its weights take once quantized (the disk a quantization
        needs): its widest scheme's; 1.0 where some weights may stay float32 (no default scheme, or a search)."""
        if self.search or self.default is None:
            return 1.0
        return max(q.scheme.stored_bits for q in self.quantizations_used()) / 32

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


def where_in(source: Path | str, line: int | None) -> str:
    return f"{source}, line {line}" if line else str(source)


def parse_recipe(
    name: str, body: Any, source: str, default_gates: Mapping[str, float] = DEFAULT_GATES, line: int | None = None
) -> Recipe:
    """The recipe ``name`` as ``source`` (a file, its entry at ``line``) gives it; a RecipeError starts there."""
    try:
        return _parse_recipe(name, body, source, default_gates)
    except RecipeError as error:
        raise RecipeError(f"{where_in(source, line)}: {error}") from None


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
