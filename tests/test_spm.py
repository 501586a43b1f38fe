"""SPM: the adapter's forward, where it sits, surrogate sampling, the transport m, one step's loss, the file."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from unlearn.export import DeltaError, read_header
from unlearn.export.load import load_pipeline, unet_of
from unlearn.methods.spm import SPM, anchor_rows, sample_surrogates
from unlearn.methods.spm_adapter import (
    SPMAdapter,
    adapter_targets,
    install_transport,
    read_adapter,
    transport_strength,
)
from unlearn.models import encode_prompts, load_components
from unlearn.models.sampling import generate

CONF = Path(__file__).resolve().parents[1] / "conf"
BASE = {"path": "tiny", "revision": None, "dtype": "float32", "concept": "toy_ring"}


class Transformer2DModel(nn.Module):  # the class name is what the adapter looks for
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(3, 5, 1)
        self.to_q = nn.Linear(5, 6)


class ResnetBlock2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.lin = nn.Linear(6, 6)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Transformer2DModel()
        self.res = ResnetBlock2D()


@pytest.fixture
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


def randomise(adapter: SPMAdapter, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def merged_unet(unet, adapter: SPMAdapter, m: float = 1.0):
    """An independent "adapter on": every adapted weight replaced by W + m^2 (alpha/rank) U D."""
    out = copy.deepcopy(unet)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, layer in zip(adapter.names, adapter.layers):
            mod, u, d = modules[name], layer.up.weight, layer.down.weight
            assert isinstance(mod, nn.Linear) or mod.kernel_size == (1, 1)  # the tiny UNet's proj_in/out are 1x1
            delta = u.flatten(1) @ d.flatten(1)
            mod.weight += m * m * adapter.scale * delta.view_as(mod.weight)
    return out


# ------------------------------------------------------------------------------------------------ the adapter
def test_adapter_forward_is_w_x_plus_m_squared_up_down_in_transformer_blocks_only():
    torch.manual_seed(0)
    net = Net()
    adapter = SPMAdapter(net, rank=1, alpha=1.0).attach(net)
    assert adapter.names == ["attn.proj_in", "attn.to_q"]  # nothing in the ResNet block
    randomise(adapter)
    x = torch.randn(2, 3, 4, 4)
    m = torch.tensor([0.5, 0.9])
    adapter.multiplier = m
    conv, (c_down, c_up) = net.attn.proj_in, (adapter.layers[0].down.weight, adapter.layers[0].up.weight)
    by_hand = F.conv2d(x, conv.weight, conv.bias) + (m ** 2).view(-1, 1, 1, 1) * torch.einsum(
        "or,rc,bchw->bohw", c_up[:, :, 0, 0], c_down[:, :, 0, 0], x)
    torch.testing.assert_close(net.attn.proj_in(x), by_hand)
    h = torch.randn(2, 7, 5)
    lin, (l_down, l_up) = net.attn.to_q, (adapter.layers[1].down.weight, adapter.layers[1].up.weight)
    by_hand = h @ lin.weight.T + lin.bias + (m ** 2).view(-1, 1, 1) * (h @ l_down.T @ l_up.T)
    torch.testing.assert_close(net.attn.to_q(h), by_hand)
    adapter.multiplier = 0.0
    torch.testing.assert_close(net.attn.to_q(h), h @ lin.weight.T + lin.bias)
    adapter.detach()
    adapter.multiplier = 1.0
    torch.testing.assert_close(net.attn.to_q(h), h @ lin.weight.T + lin.bias)


def test_zero_initialised_adapter_leaves_the_unet_unchanged(components):
    unet = components.unet
    names = adapter_targets(unet)
    independent = [n for n, mod in unet.named_modules()
                   if ".attentions." in f".{n}" and isinstance(mod, (nn.Linear, nn.Conv2d))]
    assert names == independent and not any("resnets" in n for n in names)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    emb = encode_prompts(components.tokenizer, components.text_encoder, ["a red ring", "a blue circle"])
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=emb).sample
        adapter = SPMAdapter(unet).attach(unet)
        adapter.multiplier = 1.0
        after = unet(x, t, encoder_hidden_states=emb).sample
        randomise(adapter)
        moved = unet(x, t, encoder_hidden_states=emb).sample
    assert torch.equal(before, after)
    assert not torch.allclose(before, moved)  # the hooks are live: a non-zero adapter changes the output


# ------------------------------------------------------------------------------------------------ surrogates
def test_surrogates_accepted_with_probability_one_minus_cosine_and_rescaled():
    """A uniform direction on the n-sphere has E[cos^2] = 1/n, E|cos| = G(n/2) / (sqrt(pi) G((n+1)/2)), cos
    symmetric. Accepted with probability min(1, 1 - cos) (always when cos < 0), E[cos | accepted] =
    (-1/(2n)) / (1 - E|cos| / 2); the norms are U[0.8, 1.2) x |target|."""
    target = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    n_dims, n = target.numel(), 4000
    s = sample_surrogates(target, n, torch.Generator().manual_seed(1))
    assert s.shape == (n, 3, 4)
    cos = F.cosine_similarity(s.flatten(1), target.flatten()[None], dim=1)
    abs_cos = math.exp(math.lgamma(n_dims / 2) - math.lgamma((n_dims + 1) / 2)) / math.sqrt(math.pi)
    expected = (-1 / (2 * n_dims)) / (1 - abs_cos / 2)  # -0.047 for n = 12
    assert abs(cos.mean().item() - expected) < 0.015  # s.e. ~0.0045; no rejection gives 0
    ratio = s.flatten(1).norm(dim=1) / target.norm()
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() < 1.2 + 1e-5
    assert abs(ratio.mean().item() - 1.0) < 0.01 and ratio.std().item() > 0.1
    again = sample_surrogates(target, 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, s[:5])


def test_released_anchor_rows_are_the_text_half_of_the_interleaved_batch():
    s, u = torch.arange(4.0).view(4, 1, 1) + 1, torch.zeros(1, 1)
    assert anchor_rows(s, u, "all").flatten().tolist() == [1, 2, 3, 4]
    # sample(): [u, s1, u, s2, u, s3, u, s4]; predict_noise's chunk(2) keeps the second half
    assert anchor_rows(s, u, "released").flatten().tolist() == [0, 3, 0, 4]


# ------------------------------------------------------------------------------------------------ transport
def test_transport_m_is_max_of_flattened_cosine_and_token_fraction(components):
    tok, te = components.tokenizer, components.text_encoder
    concept, prompts = "red ring", ["a red ring", "a blue circle", "a red circle", ""]
    emb = encode_prompts(tok, te, prompts)
    c_emb = encode_prompts(tok, te, [concept])
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}

    def ids(p):
        return set(tok(p).input_ids) - special

    by_hand = []
    for p, e in zip(prompts, emb):
        a, b = e.flatten(), c_emb[0].flatten()
        cos = float(a @ b / (a.norm() * b.norm()))
        frac = len(ids(p) & ids(concept)) / len(ids(concept))
        by_hand.append(max(cos, frac))
    got = transport_strength(emb, c_emb, [frozenset(ids(p)) for p in prompts], [frozenset(ids(concept))])
    torch.testing.assert_close(got, torch.tensor(by_hand))
    assert got[0] == 1.0 and got[2] >= 0.5  # every concept token / one of two

    # Inside the UNet: m per sample from the states it receives, tokens from the encoder's memo, and the
    # unconditional half of a [uncond, cond] batch at its partner's m.
    unet = copy.deepcopy(components.unet)
    adapter = SPMAdapter(unet)
    install_transport(unet, adapter, [concept], tok, te)
    seen = []
    dict(unet.named_modules())[adapter.names[0]].register_forward_hook(
        lambda *_: seen.append(adapter.multiplier.clone()))
    cond = encode_prompts(tok, te, prompts[:3])
    uncond = encode_prompts(tok, te, [""]).expand(3, -1, -1)
    with torch.no_grad():
        unet(torch.randn(6, 4, 8, 8), 10, encoder_hidden_states=torch.cat([uncond, cond]))
        unet(torch.randn(3, 4, 8, 8), 10, encoder_hidden_states=cond)
    torch.testing.assert_close(seen[0], torch.tensor(by_hand[:3] * 2))
    torch.testing.assert_close(seen[1], torch.tensor(by_hand[:3]))
    assert adapter.multiplier == 0.0  # off again after the forward


# ------------------------------------------------------------------------------------------------ the loss
def test_one_step_loss_against_a_merged_weight_unet(components):
    module = SPM(components, steps=1, concept_target="ring", base=BASE)
    randomise(module.spm, scale=0.2)
    module.spm.detach()
    off = copy.deepcopy(components.unet)  # plain weights
    on = merged_unet(off, module.spm)
    module.spm.attach(module.unet)
    g = torch.Generator().manual_seed(3)
    x_t, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([421])
    c = module.concept_emb
    s = sample_surrogates(c[0], 4, torch.Generator().manual_seed(4))
    u = encode_prompts(components.tokenizer, components.text_encoder, [""])
    with torch.no_grad():
        got = module.losses(x_t, t, c, s)

        def eps(net, emb):
            return net(x_t.expand(len(emb), -1, -1, -1), t.expand(len(emb)), encoder_hidden_states=emb).sample

        target = eps(off, u) - 1.0 * (eps(off, c) - eps(off, u))
        erase = ((eps(on, c) - target) ** 2).mean()
        anchor = ((eps(on, s) - eps(off, s)) ** 2).mean()
    torch.testing.assert_close(got["erase"], erase, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got["anchoring"], anchor, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got["loss"], erase + 1000 * anchor, rtol=1e-4, atol=1e-7)
    assert anchor > 0


def test_training_moves_only_the_adapter(components, tmp_path):
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    module = SPM(components, steps=3, concept_target="ring", warmup_steps=0, lr=1e-2, sample_steps=4, base=BASE)
    batches = torch.utils.data.DataLoader([{"latents": torch.randn(1, 4, 8, 8)} for _ in range(5)], batch_size=None)
    L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp_path)).fit(module, train_dataloaders=batches)
    assert module.done_iterations == 3
    assert all(layer.up.weight.abs().sum() > 0 for layer in module.spm.layers)
    assert all(torch.equal(before[k], v) for k, v in components.unet.state_dict().items())


@pytest.mark.parametrize("source", ["concept_text", "target_prompts"])
def test_prompt_source_picks_the_prompt_of_x_t_and_of_the_erase_target(components, monkeypatch, source):
    module = SPM(components, steps=1, concept_target="ring", prompt_source=source, base=BASE)
    target_emb = torch.randn(1, *module.concept_emb.shape[1:])
    seen = {}
    monkeypatch.setattr(module, "sample_latents", lambda c, shape: (seen.setdefault("x", c),
                                                                    (torch.zeros(shape), torch.tensor([1])))[1])
    monkeypatch.setattr(module, "losses", lambda x_t, t, c, a: seen.setdefault("loss", c) is None or
                        {"loss": torch.zeros((), requires_grad=True), "erase": 0.0, "anchoring": 0.0})
    monkeypatch.setattr(module, "advance", lambda: None)
    monkeypatch.setattr(module, "track", lambda *a, **k: None)
    module.training_step({"latents": torch.randn(1, 4, 8, 8), "target_emb": target_emb}, 0)
    want = target_emb if source == "target_prompts" else module.concept_emb
    assert torch.equal(seen["x"], want) and torch.equal(seen["loss"], want)


# ------------------------------------------------------------------------------------------------ the file
def test_adapter_file_reloads_with_transport_and_refuses_another_base(components, tiny_pipeline_path, tmp_path):
    module = SPM(components, steps=1, concept_target="ring", base={**BASE, "path": str(tiny_pipeline_path)})
    randomise(module.spm, scale=0.2)
    path = module.export(tmp_path / "pipeline")
    assert path == tmp_path / "spm.safetensors"
    meta = read_header(path)
    assert meta["component"] == "spm" and json.loads(meta["prompts"]) == ["ring"] and meta["rank"] == "1"
    assert len(read_adapter(path)[1]) == 2 * len(module.spm.names)
    prompts, seeds = ["a red ring", "a blue circle"], [0, 1]
    trained = generate(components, prompts, seeds, unet=module.export_unet(), steps=3)
    reloaded = generate(components, prompts, seeds, unet=unet_of(tmp_path, components), steps=3)
    plain = generate(components, prompts, seeds, steps=3)
    assert torch.equal(trained, reloaded)
    assert not torch.equal(trained[0], plain[0])  # the ring prompt, m = 1: the adapter acts
    pipe = load_pipeline(str(tiny_pipeline_path), path)
    out = pipe("a red ring", num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 16, 16)
    other = load_components(str(tiny_pipeline_path))
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    with pytest.raises(DeltaError, match="was made from base"):
        unet_of(path, other)


# ------------------------------------------------------------------------------------------------ configs
def compose_train(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=["paths.root=/tmp", "paths.run_dir=/tmp/run", *overrides])


@pytest.mark.parametrize("model", ["toy", "sd14"])
def test_spm_composes_and_validates(model):
    from unlearn.validate import validate

    cfg = compose_train("method=spm", f"model={model}", "concept=toy_ring" if model == "toy" else "concept=snoopy",
                        "eval.fid_feature=clip")  # inception needs an extra this test does not depend on
    validate(cfg)
    assert cfg.method.base.path == cfg.model.path and cfg.method.anchor_weight == 1000


@pytest.mark.parametrize("override, key", [("method.rank=0", "method.rank"), ("export=delta", "export"),
                                           ("method.anchor_rows=some", "method.anchor_rows"),
                                           ("++method.adapter=lora", "method.adapter")])
def test_bad_spm_values_named(override, key):
    from unlearn.validate import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(compose_train("experiment=toy_spm", "concept=toy_ring", override))
    assert key in {p.key for p in e.value.problems}


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_spm_erases_the_toy_ring_by_top1_and_keeps_every_neighbour(tmp_path, shared_cache):
    """The toy recipe, with 8 anchor images and 12 evaluation prompts. Erased is read by top-1 over the world's
    shapes, not by the binary CA: SPM's erased rings are neither rings nor the anchor's circles (toy_spm.yaml)."""
    from toy_helpers import assert_erased_and_kept, train_and_measure

    payload = train_and_measure(tmp_path, shared_cache, "experiment=toy_spm", "concept=toy_ring",
                                "data.num_prompts=8", "data.images_per_prompt=1")
    before, after = payload["results"]["original"]["toy_ring"], payload["results"]["spm"]["toy_ring"]
    assert after["cs"] <= 0.5 * before["cs"], (before, after)
    assert_erased_and_kept(payload, "spm", by="top1")
