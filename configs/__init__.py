"""Experiment configurations: one Python class per file, built on :mod:`configs.defaults`."""
