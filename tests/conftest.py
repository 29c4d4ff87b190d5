"""Shared test setup: the `cuda` marker skips without a CUDA device."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model():
    """The embedded default field model (MiniLM layer 2 with its shipped head)."""
    import fixedpos

    return fixedpos.load()


@pytest.fixture(scope="session")
def short_prompts(model):
    """Four short test-split prompts (8-20 tokens) for end-to-end fits that stay fast on a CPU."""
    import fixedpos

    return fixedpos.sample_prompts(model, fixedpos.load_corpus("stdlib", "test"), 4, max_tokens=20, min_tokens=8, seed=1)
