"""Shared utilities: registries, configuration, metrics, logging and I/O helpers."""
