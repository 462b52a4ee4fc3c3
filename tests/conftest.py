import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models():
    """arch -> (HF reference model, Loaded weights for tokenmill), built once per session."""
    from tests.tiny import loaded_from_hf, tiny_hf_model

    cache = {}

    def get(arch: str):
        if arch not in cache:
            hf = tiny_hf_model(arch)
            cache[arch] = (hf, loaded_from_hf(hf))
        return cache[arch]

    return get
