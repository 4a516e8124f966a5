"""Checkpoint folders as people and training jobs leave them: which are checkpoints and when they have
settled (``folders``); validated, hashed and read without torch (``validate``)."""
