"""litert-torch's own recipe translation, as a reference for ``translate.ai_edge_quantizer_recipe``.

Upstream 0.10 scopes its rules with op names its converter no longer writes; ``retarget_scope``
maps each of them to ours, so the only differences left are the ones we mean to make.
"""

import re
from collections.abc import Mapping

from edge_quant_pipeline import op_names
from edge_quant_pipeline.quantize.recipes import ComponentScheme, Recipe
from edge_quant_pipeline.quantize.schemes import SCHEMES, Compute

_BLOCK_SCOPE = re.compile(
    r"transformer_block(?:s\\\[(?P<block>\d+)\\\])?/litert_torch\.generative\.layers\.(?P<layer>attention|feed_forward)"
)
_LAYER_SCOPE = {"attention": op_names.ATTENTION, "feed_forward": op_names.FEEDFORWARD}
_FIXED_SCOPES = {".*": ".*", "Embedding_tok_embedding": op_names.EMBEDDING, "StatefulPartitionedCall": op_names.LM_HEAD}


def retarget_scope(upstream_regex: str) -> str:
    if upstream_regex in _FIXED_SCOPES:
        return _FIXED_SCOPES[upstream_regex]
    match = _BLOCK_SCOPE.fullmatch(upstream_regex)
    assert match, f"litert-torch writes a scope this reference does not know: {upstream_regex!r}"
    return op_names.block_scope(_LAYER_SCOPE[match["layer"]], match["block"] or r"\d+")


def generative_recipe(recipe: Recipe, model_config):
    """The litert-torch ``GenerativeQuantRecipe`` for ``recipe``, verified by litert-torch."""
    from litert_torch.generative.quantize import quant_attrs, quant_recipe

    def layer(name: str):  # litert-torch's own seven schemes only (its supported_schemes.py)
        scheme = SCHEMES[name]
        return quant_recipe.LayerQuantRecipe(
            activation_dtype=quant_attrs.Dtype.FP32,
            weight_dtype=quant_attrs.Dtype[scheme.weight.name],
            mode=quant_attrs.Mode.DYNAMIC_RANGE if scheme.compute is Compute.DYNAMIC else quant_attrs.Mode.WEIGHT_ONLY,
            algorithm=quant_attrs.Algorithm.FLOAT_CAST if scheme.is_float else quant_attrs.Algorithm.MIN_MAX,
            granularity=quant_attrs.Granularity["NONE" if scheme.is_float else scheme.granularity],
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


def upstream_rules(recipe: Recipe, model_config, retargeted: bool = True) -> list[dict]:
    from litert_torch.quantize import translate_recipe

    rules = translate_recipe.translate_to_ai_edge_recipe(generative_recipe(recipe, model_config))
    return [{**rule, "regex": retarget_scope(rule["regex"])} for rule in rules] if retargeted else rules
