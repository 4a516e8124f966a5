"""The LiteRT interpreter, as every stage that runs a ``.tflite`` uses it: a session that prefills and decodes
with the KV cache carried (``session``)."""
