"""edge-quant-pipeline: PyTorch checkpoints -> quantized LiteRT models, per recipe, as Dagster assets."""
