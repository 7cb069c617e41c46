"""Fixtures shared by the tests that train real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.synthetic import generate_demo_dataset


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two demo classes at 48x48: 4 training images and 2 good + 3 defective test images each."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(
        root, image_size=48, n_train=4, n_test_good=2, n_test_bad=3, classes=["weave", "washer"]
    )
    return root
