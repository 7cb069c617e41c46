"""Fixtures shared by the tests that train real models."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.synthetic import generate_demo_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two demo classes at 48x48: 4 training images and 2 good + 3 defective test images each."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(
        root, image_size=48, n_train=4, n_test_good=2, n_test_bad=3, classes=["weave", "washer"]
    )
    return root
