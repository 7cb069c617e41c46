"""Shared utilities: registries, configuration, errors, logging, progress and I/O helpers."""
