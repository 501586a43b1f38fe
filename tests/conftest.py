"""Shared fixtures: a tiny random Stable-Diffusion-format pipeline folder (no weights, network or GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one thread each (children too), or they thrash each other's caches.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_MAX_TOKENS = 16


@pytest.fixture(scope="session")
def tiny_pipeline_path(tmp_path_factory):
    """A random pipeline folder loadable with `load_components`: 16x16 images, 4x8x8 latents, 16-token
    prompts, a tokenizer whose words are the toy world's (others tokenize byte by byte). Builds in ~1 s."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from unlearn.toy import world
    from unlearn.toy.tokenizer import write_tokenizer_files

    root = tmp_path_factory.mktemp("tiny_pipeline")
    words = world.vocabulary() + ["painting", "dog", "snoopy"]
    tok = CLIPTokenizer.from_pretrained(write_tokenizer_files(root / "tok", words),
                                        model_max_length=TINY_MAX_TOKENS)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=TINY_MAX_TOKENS, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "pipeline", safe_serialization=True)
    return root / "pipeline"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One prepared-data and original-image cache for every end-to-end toy run of the session, all workers
    included (under xdist each worker's base folder sits in one per-session folder). Entries are written beside
    and renamed into place, so two workers that build the same entry at once both end with a whole one."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = root / "shared_toy_cache"
    cache.mkdir(exist_ok=True)
    return cache


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true",
                     help="also run the extended end-to-end runs (make test-extended)")


# Rough minutes of the slow tests on one core, to deal them out evenly (unknown ones count 0.5).
_SLOW_COST = {"test_e2e_toy": 3.0, "test_esd": 1.5, "test_spm": 1.5, "test_advunlearn": 4.0, "test_resume": 1.0,
              "test_conabl": 0.6, "test_ddp": 0.5}


def _cost(item, extended: bool) -> float:
    if "extended" in item.keywords and not extended:
        return 0.0  # skipped
    return _SLOW_COST.get(item.module.__name__.rsplit(".", 1)[-1], 0.5)


def pytest_collection_modifyitems(config, items):
    # The end-to-end runs first on every worker: started last, one alone sets the suite's wall time. xdist's
    # worksteal hands each worker a contiguous share of this list and steals from its tail, so the slow tests are
    # dealt into the shares (heaviest first, each to the lightest share) and lead each one.
    extended = config.getoption("--extended")
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # xdist sets it in each worker, which orders items
    groups: dict[tuple, list] = {}  # a test's parametrisations stay together (they may share a module fixture)
    for item in items:
        if "slow" in item.keywords:
            groups.setdefault((item.module.__name__, item.originalname), []).append(item)
    fast = [i for i in items if "slow" not in i.keywords]
    shares, load = [[] for _ in range(n)], [0.0] * n
    for group in sorted(groups.values(), key=lambda g: -sum(_cost(i, extended) for i in g)):
        k = load.index(min(load))
        shares[k].extend(group)
        load[k] += sum(_cost(i, extended) for i in group)
    size = -(-len(items) // n)
    for share in shares:  # top each share up with fast tests to its worker's slice of the list
        take = max(0, size - len(share))
        share.extend(fast[:take])
        del fast[:take]
    items[:] = [i for share in shares for i in share] + fast
    # Extended runs repeat a method's end-to-end check on another concept or loss, or are one too costly for the
    # suite's budget (AdvUnlearn's, with its inner attack): minutes each on 2 cores, so `make test` leaves them to
    # `make test-extended`, which runs them all.
    if extended:
        return
    skip = pytest.mark.skip(reason="extended end-to-end run: make test-extended")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)
