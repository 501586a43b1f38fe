"""The model fingerprint that keys the caches: every byte of every tensor counts, and a reload gives the same one."""

from __future__ import annotations

import time

import pytest
import torch

from unlearn.models import load_components
from unlearn.models.fingerprint import model_fingerprint, weights_checksum
from unlearn.toy.build import WEIGHTS

SD_VOCAB = 49408  # SD-1.4's text encoder rows: a strided sample of its embedding misses most of them


@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def test_a_reload_gives_the_same_fingerprint(components, tiny_pipeline_path):
    assert model_fingerprint(load_components(str(tiny_pipeline_path))) == model_fingerprint(components)


@pytest.mark.parametrize("row", [1, 777, SD_VOCAB - 1])
def test_one_embedding_row_changes_the_fingerprint(components, row):
    components.text_encoder.resize_token_embeddings(SD_VOCAB)
    before = model_fingerprint(components)
    with torch.no_grad():
        components.text_encoder.get_input_embeddings().weight[row] += 1e-3
    after = model_fingerprint(components)
    assert after["weights_sha"] != before["weights_sha"]
    assert {k: v for k, v in after.items() if k != "weights_sha"} == \
        {k: v for k, v in before.items() if k != "weights_sha"}


def test_one_value_in_any_tensor_changes_the_checksum(components):
    unet = components.unet
    before = weights_checksum(unet)
    for name, t in unet.state_dict().items():
        flat, i = t.view(-1), min(1, t.numel() - 1)  # the second value: between any two strided samples
        kept = flat[i].item()
        flat[i] = kept + 1
        assert weights_checksum(unet) != before, name
        flat[i] = kept
    assert weights_checksum(unet) == before


def test_bfloat16_weights_are_hashed_by_their_bytes(components):
    a = weights_checksum(components.vae.to(torch.bfloat16))
    with torch.no_grad():
        next(components.vae.parameters()).view(-1)[0] += 1
    assert weights_checksum(components.vae) != a


@pytest.mark.skipif(not (WEIGHTS / "pipeline").exists(), reason="toy weights not built")
def test_the_toy_model_fingerprints_in_well_under_a_second():
    comps = load_components(str(WEIGHTS / "pipeline"))
    t = time.perf_counter()
    model_fingerprint(comps)
    assert time.perf_counter() - t < 1.0  # 8 MB of weights: ~20 ms on one core
