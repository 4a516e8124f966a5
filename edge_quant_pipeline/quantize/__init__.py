"""The quantization stage: the recipe language and its schemes, calibration, recipe search, and the check that a
quantized ``.tflite`` holds what its recipe asked for."""
