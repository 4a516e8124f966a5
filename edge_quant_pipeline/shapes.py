"""What the pipeline knows of a model's shapes without torch: the lengths its exported signatures take
(``ExportSettings``) and what recipe validation needs of its layers (``ModelShape``). Every stage reads them;
they import nothing of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportSettings:
    """Shapes baked into the exported signatures."""

    prefill_len: int = 32
    kv_cache_len: int = 128

    @property
    def prefill_signature(self) -> str:
        return f"prefill_{self.prefill_len}"


@dataclass(frozen=True)
class ModelShape:
    """What recipe validation needs to know about a model, without torch."""

    num_layers: int
    tied_lm_head: bool
    # per component, the input (reduction) sizes of its weights: int4 blocks run along them
    reduction_dims: dict[str, tuple[int, ...]]
