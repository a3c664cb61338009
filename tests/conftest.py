"""Shared test fixtures."""

import os
import tempfile

import pytest
import torch

# the measured CPU peak (lmlab.monitor.profiler) is cached here, not in the user's ~/.cache
os.environ.setdefault("LMLAB_CACHE", tempfile.mkdtemp(prefix="lmlab-test-cache-"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other test processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_smear(model, seed=0):
    """Random smeared-key and smeared-query weights (they start equal across heads / channels, or zero), so
    that a head, channel or earlier token mixed up on some path shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            if layer.attention.smear is not None:
                for p in layer.attention.smear.parameters():  # keys, then queries
                    p.copy_(torch.randn(p.shape, generator=g))
