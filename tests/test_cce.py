"""CCE (unlearn/attacks/cce.py): its loss against textual inversion done by a vocabulary row, learning that lowers
the loss (and does not without the optimiser's step), one learning for every prompt, bad input, the configs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from unlearn.attacks import build_attack, check_attack_config
from unlearn.attacks.base import Reference
from unlearn.attacks.cce import inversion_loss
from unlearn.attacks.common import PrefixPrompt

CCE = {"_target_": "unlearn.attacks.cce.CCE", "steps": 20, "batch_size": 2, "lr": 0.02, "num_tokens": 1,
       "initializer": None, "weight_decay": 0.01, "check_every": 10, "num_prompts": 2, "filter_references": False,
       "seed": 0}
PROMPTS = ["a red ring in the style of stripes", "a red circle in the style of stripes"]


def cce(**over):
    return build_attack(check_attack_config({**CCE, **over}))


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_path):
    from unlearn.models import load_components

    return load_components(str(tiny_pipeline_path))


@pytest.fixture(scope="module")
def latents(tiny):
    from unlearn.models.sampling import generate

    return generate(tiny, PROMPTS, [0, 1], steps=2, guidance_scale=3.0, return_latents=True)[1]


def test_the_loss_is_textual_inversion_by_a_vocabulary_row(tiny, latents):
    """The slot's embedding replaced by a hook equals a text encoder whose row for some token is the embedding."""
    emb = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    prefix = PrefixPrompt(tiny.tokenizer, tiny.text_encoder, PROMPTS[0], 1)
    t, noise = torch.tensor([700]), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got = inversion_loss(tiny.unet, prefix.hidden_embeds(emb), latents[:1], t, noise, tiny.scheduler.alphas_cumprod)
    te = copy.deepcopy(tiny.text_encoder)
    with torch.no_grad():
        te.get_input_embeddings().weight[7] = emb[0]
    hidden = te(prefix.with_tokens(torch.tensor([7])))[0]
    a = tiny.scheduler.alphas_cumprod[700]
    want = F.mse_loss(tiny.unet(a.sqrt() * latents[:1] + (1 - a).sqrt() * noise, t,
                                encoder_hidden_states=hidden).sample, noise)
    torch.testing.assert_close(got, want)


def test_learning_lowers_the_loss_on_the_concepts_images(tiny, latents):
    """20 steps lower the loss on fixed (t, noise) pairs below the starting embedding's; without the optimiser's
    step the embedding stays where it started and the two losses are equal."""
    attack = cce()
    learned = dict(attack.learn(tiny, tiny, latents, PROMPTS, seed=0, stops=[20]))[20]
    start = attack.initial(tiny.tokenizer, tiny.text_encoder.get_input_embeddings())
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(1000, (16,), generator=gen)
    noise = torch.randn(16, 4, 8, 8, generator=gen)
    x0 = latents[torch.arange(16) % 2]
    prefixes = [PrefixPrompt(tiny.tokenizer, tiny.text_encoder, p, 1) for p in PROMPTS]

    @torch.no_grad()
    def loss(emb):
        hiddens = torch.cat([prefixes[i % 2].hidden_embeds(emb) for i in range(16)])
        return inversion_loss(tiny.unet, hiddens, x0, t, noise, tiny.scheduler.alphas_cumprod).item()

    assert loss(learned) < loss(start) - 1e-4, (loss(learned), loss(start))


class Checks:
    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def hidden(self, cond):
        self.calls += 1
        return self.answer(self.calls)


def test_one_learning_serves_every_prompt_and_checks_at_each_stop(tiny, latents):
    attack = cce()
    ref = Reference(concept_latents=latents, concept_prompts=PROMPTS)
    first = attack.run(tiny, tiny, PROMPTS[0], ref, Checks(lambda n: n == 2))
    assert first.success and first.iterations == 20 and first.prompt is None and first.embedding.shape == (1, 16)
    learned = attack._learned
    second = attack.run(tiny, tiny, PROMPTS[1], ref, Checks(lambda n: False))
    assert attack._learned is learned and not second.success and second.iterations == 20
    torch.testing.assert_close(second.embedding, first.embedding)


def test_no_concept_images_is_refused(tiny):
    with pytest.raises(ValueError, match="attack=cce needs images of the concept"):
        cce().run(tiny, tiny, PROMPTS[0], Reference(concept_latents=torch.zeros(0, 4, 8, 8), concept_prompts=[]),
                  Checks(lambda n: True))


@pytest.mark.parametrize("over,line", [({"steps": 0}, "attack.steps=0 must be an integer >= 1"),
                                       ({"batch_size": 1.5}, "attack.batch_size=1.5 must be"),
                                       ({"check_every": 0}, "attack.check_every=0 must be null or"),
                                       ({"lr": 0}, "attack.lr=0 must be > 0")])
def test_bad_settings_are_named(over, line):
    with pytest.raises(ValueError, match="^" + line.replace(".", r"\.")):
        check_attack_config({**CCE, **over})


@pytest.mark.parametrize("choice,steps,batch", [("cce", 5000, 16), ("cce_toy", 100, 4)])
def test_the_configs_compose_to_cce(tmp_path, choice, steps, batch):
    from omegaconf import OmegaConf

    from unlearn.cli import compose, with_paths

    a = OmegaConf.to_container(compose("attack", with_paths([f"paths.root={tmp_path}", f"attack={choice}"])).attack)
    attack = build_attack(check_attack_config(a, "style"))
    assert type(attack).__name__ == "CCE" and (attack.steps, attack.batch_size) == (steps, batch)
