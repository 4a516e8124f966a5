"""Checkpoint folders as people and training jobs leave them: which are checkpoints and when they have
settled (``folders``); validated and read without torch (``validate``); their version, the sha256 of their
bytes, remembered per state of their files (``digest``)."""
