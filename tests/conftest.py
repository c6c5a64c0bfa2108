import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import replica  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def vlm_replicas(tmp_path_factory):
    """value_mult -> (hf_model, checkpoint path), built once per session."""
    out = {}
    for mult in (1, 2, 3):
        out[mult] = replica.build_vlm(tmp_path_factory.mktemp(f"vlm{mult}"), value_mult=mult, seed=mult)
    return out


@pytest.fixture(scope="session")
def tied_replica(tmp_path_factory):
    return replica.build_text(tmp_path_factory.mktemp("tied"), tie=True, seed=7)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    return replica.build_chat_model(tmp_path_factory.mktemp("chat") / "model")
