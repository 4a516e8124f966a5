"""Checkpoint -> float ``.tflite``: litert-torch's Generative API rebuild (``architectures``, ``generative``), its
``export_hf`` (``hf``), the choice between them per checkpoint (``exporters``), and loading the PyTorch model they
take (``load``)."""
