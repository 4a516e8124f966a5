"""A recipe against one model: checks that need its shape, and the recipe written as ai-edge-quantizer's."""

from __future__ import annotations

from typing import Any, Mapping

from edge_quant_pipeline import op_names
from edge_quant_pipeline.quantize.recipes import LM_HEAD, PER_BLOCK_COMPONENTS, Recipe, RecipeError
from edge_quant_pipeline.quantize.schemes import SCHEMES, parse_quantization


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
