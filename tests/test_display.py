"""The UI's view of a step's measurements: sizes for byte counts, numbers to the digits they carry."""

import math

import dagster as dg

from edge_quant_pipeline.defs.display import for_ui, size_text


def test_byte_counts_read_as_sizes_under_a_name_that_says_so():
    shown = for_ui({"file_bytes": 12_345_678, "weight_bytes": 512, "checkpoint_weight_bytes": 7_500_000_000})
    assert shown == {
        "file_size": dg.MetadataValue.text("12.3 MB"),
        "weight_size": dg.MetadataValue.text("512 B"),
        "checkpoint_weight_size": dg.MetadataValue.text("7.5 GB"),
    }
    assert size_text(999) == "999 B" and size_text(1000) == "1.0 kB"


def test_floats_keep_the_digits_they_carry_and_stay_numbers():
    shown = for_ui({"perplexity_ratio": 1.003456789, "mean_kl": 0.000321456789, "mean_kl_error": 0.0000123456})
    assert shown == {"perplexity_ratio": 1.003, "mean_kl": 0.0003215, "mean_kl_error": 1.2e-05}
    assert for_ui({"step_peak_rss_mb": 19370.4567, "step_cpu_s": 136.2468})["step_peak_rss_mb"] == 19370.0
    times = for_ui(
        {"step_cpu_s": 136.2468, "step_waited_s": 0.001211, "prefill_ms": 0.8049, "decode_tokens_per_s": 3485.4}
    )
    assert times == {"step_cpu_s": 136.25, "step_waited_s": 0.0, "prefill_ms": 0.8, "decode_tokens_per_s": 3485.0}


def test_what_is_not_a_measurement_passes_as_it_is():
    path = dg.MetadataValue.path("/tmp/model.tflite")
    values = {"tflite": path, "layers": 16, "searched": True, "exporter": "export_hf", "none_bytes": True}
    assert for_ui(values) == values
    assert math.isnan(for_ui({"peak_rss_mb": math.nan})["peak_rss_mb"])
