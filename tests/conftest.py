import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_path():
    from fusedrl.models.checkpoint import CheckpointError
    from fusedrl.models.hub import packaged_model_path

    try:
        return packaged_model_path("smollm2-135m-instruct")
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for every test that starts Ray workers (4 CPUs; each
    training run starts and stops its own workers)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()
