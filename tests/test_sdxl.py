"""SDXL: `model=sdxl` on a tiny random SDXL-shaped pipeline built from configs (no download).

The conditioning is checked against diffusers' UNet called directly with inputs built here by hand (penultimate
layers of both encoders concatenated, the second's pooled projection, the time ids `_get_add_time_ids` builds);
every method runs train -> export -> reload (StableDiffusionXLPipeline.from_pretrained; SPM's adapter file through
unlearn/export/load.py) -> evaluate.
"""

from __future__ import annotations

import pytest
import torch
from toy_helpers import assert_candidates_evaluate, compose_train

TOKENS = 16
SIDE = 16  # image side: the UNet's sample_size 8 x the VAE's scale 2


def build_tiny_sdxl(folder):
    """A random StableDiffusionXLPipeline shaped as diffusers' own SDXL tests build it: a CLIPTextModel (hidden 16)
    and a CLIPTextModelWithProjection (hidden 32, projection 32), a UNet with text_time added conditioning
    (time embedding 8: 32 + 6 x 8 = 80 features) and cross-attention over 16 + 32 = 48 features, a tokenizer_2 that
    pads with "!", Euler with SDXL's schedule in the folder. 16x16 images, 4x8x8 latents."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from unlearn.toy import world
    from unlearn.toy.tokenizer import write_tokenizer_files

    files = write_tokenizer_files(folder / "tok", world.vocabulary() + ["painting", "van", "gogh"])
    tok = CLIPTokenizer.from_pretrained(files, model_max_length=TOKENS)
    tok_2 = CLIPTokenizer.from_pretrained(files, model_max_length=TOKENS, pad_token="!")
    torch.manual_seed(2)

    def text_config(hidden, **extra):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=TOKENS,
                              hidden_act="gelu", eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                              pad_token_id=tok.pad_token_id, **extra)

    text_encoder = CLIPTextModel(text_config(16))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(32, projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=SIDE)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=sched, add_watermarker=False)
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return folder / "pipeline"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="module")
def components(tiny_sdxl):
    from unlearn.models.loading import load_components

    return load_components(str(tiny_sdxl))


PROMPTS = ["a painting of a dog", "a painting by van gogh", ""]


def by_hand(pipe, prompts):
    """encoder_hidden_states and added_cond_kwargs written out here from the two encoders, not taken from unlearn."""
    states, pooled = [], None
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(prompts, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    time_ids = pipe._get_add_time_ids((SIDE, SIDE), (0, 0), (SIDE, SIDE), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}


# ------------------------------------------------------------------------------------------------ the conditioning
@torch.no_grad()
def test_packed_unet_call_is_diffusers_sdxl_conditioning(tiny_sdxl, components):
    """unet(x, t, encoder_hidden_states=encode_prompts(...)) on the loaded model equals diffusers' UNet of the
    reloaded pipeline called directly with the hand-built conditioning; and is not the output without time ids or
    with the last layer's states, so each part is seen."""
    from diffusers import StableDiffusionXLPipeline

    from unlearn.models.text import encode_prompts, token_rows

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    states, added = by_hand(pipe, PROMPTS)
    emb = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS)
    assert emb.shape == (3, TOKENS + 1, 48)
    torch.testing.assert_close(token_rows(components.text_encoder, emb), states)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 900])
    got = components.unet(x, t, encoder_hidden_states=emb).sample
    want = pipe.unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Each part matters: other time ids, the last layer's states, another pooled vector all change the output.
    wrong_ids = dict(added, time_ids=torch.zeros_like(added["time_ids"]))
    assert not torch.allclose(want, pipe.unet(x, t, encoder_hidden_states=states, added_cond_kwargs=wrong_ids).sample)
    last = torch.cat([pipe.text_encoder(pipe.tokenizer(PROMPTS, padding="max_length", max_length=TOKENS,
                                                       return_tensors="pt").input_ids)[0],
                      states[..., 16:]], dim=-1)
    assert not torch.allclose(want, pipe.unet(x, t, encoder_hidden_states=last, added_cond_kwargs=added).sample)
    wrong_pool = dict(added, text_embeds=added["text_embeds"].roll(1, 0))
    assert not torch.allclose(want, pipe.unet(x, t, encoder_hidden_states=states, added_cond_kwargs=wrong_pool).sample)
    # Positional states and a deep copy (the frozen original) unpack alike; a caller's own added_cond_kwargs pass.
    import copy

    torch.testing.assert_close(copy.deepcopy(components.unet)(x, t, emb).sample, got)
    torch.testing.assert_close(components.unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added).sample,
                               want, rtol=1e-5, atol=1e-6)



@torch.no_grad()
def test_generate_is_diffusers_sdxl_pipeline(tiny_sdxl, components):
    """unlearn's sampler (DDIM + guidance, the UNet's packed calls) draws what StableDiffusionXLPipeline draws from
    the same start latents with the encoded "" as its negative prompt and DDIM as its scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from unlearn.models.sampling import generate, initial_latents

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = PROMPTS[:2], [3, 4]
    ours = generate(components, prompts, seeds, steps=3, guidance_scale=5.0)
    theirs = pipe(prompts, negative_prompt=["", ""], latents=initial_latents(seeds, (4, 8, 8), "cpu", torch.float32),
                  num_inference_steps=3, guidance_scale=5.0, output_type="pt").images
    assert ours.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ end to end
TRAINED = {"esd_x": (), "esd_u": (), "conabl": (), "distill": (), "sdd": (),
           "cdc_cpg": ("method.warmup_steps=0",), "salun": (), "uce": (), "rece": ("method.epochs=1",),
           "esd_x/lora": ("method.adapter=lora", "method.lr=1e-2"),  # a LoRA, merged before the export
           "spm": ("method.sample_steps=2", "method.warmup_steps=0", "method.lr=1e-2"),
           "advunlearn": ("method.warmup_steps=0", "method.attack_steps=1", "method.sample_steps=2",
                          "method.retain_batch=2", "method.lr=1e-3")}
TEXT_TRAINED = {"advunlearn"}  # both text encoders change, the UNet does not
ADAPTER = {"spm"}  # spm.safetensors beside the run (no pipeline folder), reloaded by unlearn/export/load.py


def changed(state: dict, before: dict) -> set[str]:
    return {k for k in before if not torch.equal(state[k], before[k])}


def test_every_method_trains_exports_reloads_and_evaluates(tmp_path, tiny_sdxl):
    """Each method: train (data sampled by the SDXL model), export, reload with
    StableDiffusionXLPipeline.from_pretrained (a changed UNet and the same two text encoders; AdvUnlearn: both
    encoders changed but their embeddings, the same UNet) or, for SPM's adapter file, load_pipeline and unet_of;
    then `unlearn.evaluate` measures every result."""
    from diffusers import StableDiffusionXLPipeline

    from unlearn.export.components import components_of, same_weights
    from unlearn.export.load import load_pipeline
    from unlearn.models.loading import load_components
    from unlearn.train import run as train

    common = [f"model.path={tiny_sdxl}", "model=sdxl", "model.clip=toy", "model.sample_steps=2", "concept=van_gogh",
              "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false", f"paths.cache={tmp_path}/cache"]
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base_parts = load_components(str(tiny_sdxl))
    original = base.unet.state_dict()
    folders = []
    for method, extra in TRAINED.items():
        res = train(compose_train(tmp_path / method, *common, f"method={method.split('/')[0]}", "method.steps=1",
                                  "evaluate=false",
                                  "data.num_prompts=2", "data.images_per_prompt=1", "data.batch_size=2",
                                  "data.gen_batch_size=2", *extra))
        folders.append(res["pipeline"])
        if method in ADAPTER:
            pipe = load_pipeline(tiny_sdxl, res["pipeline"])
            assert res["pipeline"].endswith("spm.safetensors") and hasattr(pipe.unet, "spm_adapter")
            assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items() if k in original)
            continue
        pipe = StableDiffusionXLPipeline.from_pretrained(res["pipeline"])
        unet_changed = changed(pipe.unet.state_dict(), original)
        assert bool(unet_changed) != (method in TEXT_TRAINED), method
        for name in ("text_encoder", "text_encoder_2"):
            text_changed = changed(getattr(pipe, name).state_dict(), getattr(base, name).state_dict())
            if method not in TEXT_TRAINED:
                assert not text_changed, (method, name)
                continue
            assert text_changed and not any("embeddings" in k or "text_projection" in k for k in text_changed)
            assert any("encoder.layers." in k for k in text_changed), (method, name)
        if method in TEXT_TRAINED:  # what evaluate and the attacks generate with: the run's pair, not the base's
            own = components_of(res["pipeline"], base_parts).text_encoder
            assert own is not base_parts.text_encoder and not same_weights(own, base_parts.text_encoder)
    assert len(folders) == len(TRAINED)
    assert_candidates_evaluate(tmp_path, common, folders, "van_gogh")


def test_uce_edits_the_2048d_states_at_the_first_tokenizers_last_word(tmp_path, tiny_sdxl):
    """UCE's rows on SDXL are the concatenated penultimate states (the cross-attention inputs, 16 + 32 = 48 here),
    at `attention_mask.sum() - 2` of the first tokenizer, as the UCE authors' script takes them from encode_prompt;
    no pooled row. Then a delta export rebuilds the same UNet through load_pipeline on the SDXL base."""
    from diffusers import StableDiffusionXLPipeline
    from hydra.utils import instantiate

    from unlearn.export.load import load_pipeline
    from unlearn.models.loading import load_components
    from unlearn.train import run as train

    cfg = compose_train(tmp_path, "model=sdxl", f"model.path={tiny_sdxl}", "method=uce", "method.start=last_word",
                        "method.tokens=last", "method.preserve=none", "method.preserve_empty=false",
                        "concept=van_gogh")
    module = instantiate(cfg.method, components=load_components(str(tiny_sdxl)), _convert_="object")
    erase_in, guide_in, preserve_in = module.rows()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    (target, anchor), = module.texts()[0]
    for text, rows in ((target, erase_in), (anchor, guide_in)):
        states, _ = by_hand(pipe, [text])
        last = int(pipe.tokenizer(text, padding="max_length", max_length=TOKENS, return_tensors="pt")
                   .attention_mask.sum()) - 2
        torch.testing.assert_close(rows, states[:, last])
    assert preserve_in.shape == (0, 48)

    res = train(compose_train(tmp_path / "delta", "model=sdxl", f"model.path={tiny_sdxl}", "method=uce",
                              "concept=van_gogh", "export=both", "evaluate=false", "logger=none", "trainer=cpu"))
    rebuilt = load_pipeline(tiny_sdxl, tmp_path / "delta" / "run").unet.state_dict()
    exported = StableDiffusionXLPipeline.from_pretrained(res["pipeline"]).unet.state_dict()
    assert rebuilt.keys() == exported.keys() and all(torch.equal(rebuilt[k], exported[k]) for k in exported)


def test_the_fingerprint_covers_both_encoders_and_tokenizers(components, tiny_pipeline_path):
    """Caches key on it: another second tokenizer (its pad token) or second encoder is another model; an SD model's
    fingerprint has no SDXL key."""
    import copy
    import dataclasses

    from unlearn.models import sdxl
    from unlearn.models.fingerprint import model_fingerprint
    from unlearn.models.loading import load_components

    base = model_fingerprint(components)
    tok_2 = copy.deepcopy(components.tokenizer.tokenizer_2)
    tok_2.pad_token = tok_2.eos_token
    other_tok = dataclasses.replace(components, tokenizer=sdxl.Tokenizers(components.tokenizer.tokenizer, tok_2))
    assert model_fingerprint(other_tok)["tokenizer_2_sha"] != base["tokenizer_2_sha"]
    te = copy.deepcopy(components.text_encoder)
    with torch.no_grad():
        te.text_encoder_2.text_projection.weight.mul_(2)
    assert model_fingerprint(dataclasses.replace(components, text_encoder=te))["weights_sha"] != base["weights_sha"]
    assert "tokenizer_2_sha" not in model_fingerprint(load_components(str(tiny_pipeline_path)))


# ------------------------------------------------------------------------------------------------ SPM and AdvUnlearn
def strengths_seen(unet) -> list:
    """The SPM multiplier each forward of `unet` runs with (read from inside its first adapted layer)."""
    seen, adapter = [], unet.spm_adapter
    first = dict(unet.named_modules())[adapter.names[0]]
    first.register_forward_pre_hook(lambda _m, _a: seen.append(adapter.multiplier.detach().clone()))
    return seen


@torch.no_grad()
def test_spm_transport_reads_both_encoders_token_rows_and_the_first_tokenizer(tiny_sdxl, components, tmp_path):
    """m = max(cos of the flattened token rows, both encoders' penultimate states, as built here by hand; the
    fraction of the concept's tokens by tokenizer 1): in the run's evaluation UNet and in StableDiffusionXLPipeline
    loaded by load_pipeline from the adapter file, whose own encode_prompt fills the token memo."""
    import torch.nn.functional as F
    from diffusers import StableDiffusionXLPipeline

    from unlearn.export.load import load_pipeline
    from unlearn.methods.spm import SPM
    from unlearn.models.text import encode_prompts

    module = SPM(components, steps=1, concept_target="van gogh",
                 base={"path": str(tiny_sdxl), "revision": None, "dtype": "float32"})
    for layer in module.spm.layers:
        layer.up.weight.normal_(0, 0.2)
    unet = module.export_unet()
    seen = strengths_seen(unet)
    prompts = ["a painting by van gogh", "a painting of a dog"]
    emb = encode_prompts(components.tokenizer, components.text_encoder, prompts)
    unet(torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), encoder_hidden_states=emb)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    states, _ = by_hand(pipe, prompts)
    concept, _ = by_hand(pipe, ["van gogh"])
    cos = F.cosine_similarity(states.flatten(1), concept.flatten(1), dim=-1)
    assert cos[0] < 0.999 and float(seen[0][0]) == 1.0  # every concept token in the prompt
    torch.testing.assert_close(seen[0][1], cos[1])  # none: the cosine

    path = module.export(tmp_path / "pipeline")
    xl = load_pipeline(tiny_sdxl, path)
    seen = strengths_seen(xl.unet)
    xl.set_progress_bar_config(disable=True)
    xl(prompts[:1], negative_prompt=["a dog"], num_inference_steps=1, guidance_scale=2.0, output_type="pt")
    negative, _ = by_hand(pipe, ["a dog"])
    want = torch.stack([F.cosine_similarity(negative.flatten(1), concept.flatten(1), dim=-1)[0], torch.tensor(1.0)])
    torch.testing.assert_close(seen[0], want)  # [negative, prompt]: the prompt's tokens were remembered


def test_advunlearn_trains_both_encoders_with_one_adversarial_embedding_each(tiny_sdxl, tmp_path):
    """Both encoders' layers and final norms train (embeddings and the projection frozen); the adversarial
    embedding is (k, 16 + 32), its halves inserted after each encoder's start token: with both halves a vocabulary
    row, the packed embedding is that of the prompt with the word in front."""
    from hydra.utils import instantiate

    from unlearn.models.loading import load_components
    from unlearn.models.text import encode_prompts

    comp = load_components(str(tiny_sdxl))
    cfg = compose_train(tmp_path, "model=sdxl", f"model.path={tiny_sdxl}", "method=advunlearn", "concept=van_gogh")
    module = instantiate(cfg.method, components=comp, _convert_="object")
    names = module.text_trainable_names
    for tower, layers in (("text_encoder.", 3), ("text_encoder_2.", 3)):
        own = [n for n in names if n.startswith(tower)]
        assert {n.split("layers.")[1].split(".")[0] for n in own if "layers." in n} == {str(i) for i in range(layers)}
        assert any("final_layer_norm" in n for n in own)
    assert not any("embeddings" in n or "text_projection" in n for n in names)
    assert module.last_adv.shape == (1, 48) and module.random_tokens().shape == (1, 48)
    assert module.concept_ids.shape == (1, 2, TOKENS)

    te = comp.text_encoder
    square = comp.tokenizer("square", add_special_tokens=False).input_ids[0]
    adv = torch.cat([te.text_encoder.get_input_embeddings().weight[[square]],
                     te.text_encoder_2.get_input_embeddings().weight[[square]]], dim=-1).detach()
    with torch.no_grad():
        got = module.adversarial_cond(module.concept_ids, adv)
    want = encode_prompts(comp.tokenizer, te, ["square van gogh"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.encode(module.concept_ids), encode_prompts(comp.tokenizer, te, ["van gogh"]))
