"""Versions of the converting and quantizing toolchain, recorded with every artifact."""

from __future__ import annotations

import os
import warnings
from functools import cache
from importlib.metadata import PackageNotFoundError, version

CONVERSION_PACKAGES = ("litert-torch", "ai-edge-quantizer", "ai-edge-litert", "torch")
# litert-lm-builder packs the bundle and litert-lm-api runs it: they shape what is published, not the .tflite.
BUNDLE_PACKAGES = ("litert-lm-builder", "litert-lm-api")
TOOLCHAIN_PACKAGES = CONVERSION_PACKAGES + BUNDLE_PACKAGES


@cache
def toolchain_versions() -> dict[str, str]:
    versions = {}
    for package in TOOLCHAIN_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def toolchain_tag(packages: tuple[str, ...] = CONVERSION_PACKAGES) -> str:
    """One string that changes whenever one of ``packages`` changes version: an asset's code version names what
    it runs, so a new LiteRT-LM does not export a 1B model again."""
    versions = toolchain_versions()
    return ",".join(f"{name}={versions[name]}" for name in packages)


def quiet_third_party_noise() -> None:
    """For the command line and its workers: what a user cannot act on stays out of the terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    # Workers end with os._exit, leaving their semaphores to multiprocessing's resource tracker, which cleans them
    # up and says so; it is a process of its own, which takes its warning filters from the environment.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*is currently in beta.*")
