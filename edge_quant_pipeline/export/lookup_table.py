"""A large embedding lookup written as a ``.tflite`` with its table streamed to the file, never whole in memory.

Gemma 4 E2B's per-layer embedding table is 262,144 x 8,960 (2.35B parameters, 9.4 GB in float32): litert-torch
exports it from a float32 copy of the table with its default conversion, which holds the table several times
over, beside the language model it exports in the same process. The lookup's graph does not depend on the table's
size, so it is converted once around a stand-in of two rows; the table's tensor is then re-shaped to the real
table's, its buffer placed past the flatbuffer (``tflite_file.py``), and the table written there, a slice of rows
at a time, in float32.
"""

from __future__ import annotations

from pathlib import Path

from edge_quant_pipeline import tflite_file

_STAND_IN_ROWS = 2
_ROWS_PER_SLICE = 4096


def write_lookup_tflite(table, scale: float, rows_shape: tuple[int, ...], signatures: dict[str, int], output: Path):
    """``table`` (a torch tensor, any float dtype): the lookup ``table[token_ids] * scale``, each row reshaped to
    ``rows_shape``, as signatures named by the keys of ``signatures`` taking ``token_ids`` int32 [1, n] for their
    n tokens and returning ``embeddings`` (float32); as ``export_hf`` writes Gemma 4's per-layer embedder."""
    stand_in = _converted_stand_in(table.shape[1], scale, rows_shape, signatures)
    model = tflite_file.schema().ModelT.InitFromPackedBuf(stand_in, 0)
    (table_buffer,) = tflite_file.row_buffers(model, _STAND_IN_ROWS, table.shape[0])

    def rows():
        for start in range(0, table.shape[0], _ROWS_PER_SLICE):
            yield table[start : start + _ROWS_PER_SLICE].float().numpy().tobytes()

    tflite_file.write(model, {table_buffer: (table.numel() * 4, rows)}, output)


def _converted_stand_in(width: int, scale: float, rows_shape: tuple[int, ...], signatures: dict[str, int]) -> bytes:
    import litert_torch
    import torch

    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.zeros(_STAND_IN_ROWS, width), requires_grad=False)

        def forward(self, token_ids):
            rows = torch.nn.functional.embedding(token_ids, self.table) * scale
            return {"embeddings": rows.reshape(*token_ids.shape, *rows_shape)}

    lookup = Lookup().eval()
    converter = litert_torch._convert.interface.Converter()
    for name, tokens in signatures.items():
        converter.add_signature(name, lookup, sample_kwargs={"token_ids": torch.zeros((1, tokens), dtype=torch.int32)})
    return bytes(converter.convert(lightweight_conversion=True, strict_export=False).model_content())
