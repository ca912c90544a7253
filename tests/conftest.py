import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N test processes share the cores, so each (and every run it starts, which
    # inherits the environment) computes on one thread instead of oversubscribing them
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _no_shared_wandb_service():
    """A test that used W&B in this process leaves ``WANDB_SERVICE`` in its environment, and
    every run a later test starts as a child would join that service: a killed child's run id
    then stays "in use" there and its resume fails (CI saw it). Runs a user starts from a shell
    have their own service; so do the runs of the tests."""
    yield
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def tiny_vl_path():
    from framework.models.tiny import build_tiny

    return str(build_tiny("qwen2_5_vl"))


@pytest.fixture(scope="session")
def tiny_text_path():
    from framework.models.tiny import build_tiny

    return str(build_tiny("qwen2"))


@pytest.fixture(scope="session")
def vl_bundle(tiny_vl_path):
    from framework.models.loading import load_model_bundle

    return load_model_bundle(tiny_vl_path)


def make_image(side: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)  # also if a plugin imported torch before the variables above were set


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) everywhere else, e.g. in CI."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
