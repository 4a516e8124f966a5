"""Evaluation: the interpreter session, the float reference, streaming metrics, error localisation and the
runtime profile, one module each; ``evaluation.evaluate`` puts them together for one (model, recipe)."""
