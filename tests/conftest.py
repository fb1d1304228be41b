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
