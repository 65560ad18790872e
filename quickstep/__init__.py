"""Quickstep: train, export and serve 1-2 step image generators."""

__version__ = "0.1.0"
