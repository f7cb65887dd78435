import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_offline(tmp_path_factory):
    torch.set_num_threads(1)  # stable timings on the shared 2-core box
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MOPEQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("mopeq-cache"))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
