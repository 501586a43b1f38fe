"""CCS / CRS: the psi grid, the hand-off rule, the score formulas by hand, the classifier, partial diffusion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unlearn.metrics.concept_recovery import (
    PSI_GRID,
    arctan_similarity,
    check_psi,
    concept_confidence_score,
    concept_retrieval_score,
    fit_logistic,
    handoff_index,
    partial_diffusion,
    predict_logistic,
)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, "x"])
def test_psi_outside_open_unit_interval_is_refused_with_its_value(bad):
    with pytest.raises(ValueError, match=r"recovery\.psi contains .*(outside \(0, 1\)|not a number)") as err:
        check_psi([0.05, bad])
    assert repr(bad) in str(err.value)


def test_the_authors_grid_is_valid():
    assert check_psi(PSI_GRID) == [0.001, 0.01, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55]


def test_handoff_follows_denoising_end():
    # 20 DDIM steps with steps_offset=1: 951, 901, ..., 1.
    ts = list(range(951, 0, -50))
    assert len(ts) == 20
    assert handoff_index(ts, 0.001) == 0      # cutoff 999
    assert handoff_index(ts, 0.05) == 1       # cutoff 950: only 951
    assert handoff_index(ts, 0.55) == 11      # cutoff 450: 951 ... 451
    assert handoff_index(ts, 0.999) == 20     # cutoff 1


def test_crs_by_hand():
    cos_o = torch.tensor([[1.0, 0.5], [0.2, 0.0]])
    cos_u = torch.tensor([[0.0, 0.5], [0.2, -1.0]])

    def s(c):
        return (1 - math.atan(c)) / (math.pi / 2)

    row0 = abs((s(1.0) + s(0.5)) / 2 - (s(0.0) + s(0.5)) / 2)
    row1 = abs((s(0.2) + s(0.0)) / 2 - (s(0.2) + s(-1.0)) / 2)
    assert concept_retrieval_score(cos_o, cos_u) == pytest.approx((row0 + row1) / 2)
    assert concept_retrieval_score(cos_o, cos_u, retain=True) == pytest.approx(1 - (row0 + row1) / 2)
    assert arctan_similarity(torch.tensor(0.0)).item() == pytest.approx(2 / math.pi)
    with pytest.raises(ValueError, match="one shape"):
        concept_retrieval_score(cos_o, cos_u[:1])


def test_ccs_is_100_times_mean_probability():
    assert concept_confidence_score(torch.tensor([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx(50.0)
    assert concept_confidence_score(torch.tensor([0.74])) == pytest.approx(74.0)


def test_logistic_regression_reaches_the_regularised_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 3, generator=g) + 1.0, torch.randn(20, 3, generator=g) - 1.0])
    y = torch.cat([torch.ones(20), torch.zeros(20)])
    lam = 1e-2
    w, b = fit_logistic(x, y, l2=lam)
    p = predict_logistic((w, b), x)
    assert ((p > 0.5).float() == y).float().mean() >= 0.9
    # Stationarity by hand (NumPy): grad of mean BCE + lam |w|^2 is zero at the optimum.
    X, Y, W = x.double().numpy(), y.double().numpy(), w.numpy()
    q = 1 / (1 + np.exp(-(X @ W + b.item())))
    assert np.abs(X.T @ (q - Y) / len(Y) + 2 * lam * W).max() < 1e-5
    assert abs((q - Y).mean()) < 1e-5


def test_partial_diffusion_identities(tiny_pipeline_path):
    from unlearn.models import load_components
    from unlearn.models.sampling import generate

    comps = load_components(str(tiny_pipeline_path))
    other = load_components(str(tiny_pipeline_path)).unet
    torch.manual_seed(1)
    for p in other.parameters():
        p.data += 0.05 * torch.randn_like(p)
    prompts, seeds = ["a red ring", "a blue square"], [3, 4]
    full_orig = generate(comps, prompts, seeds, steps=4, guidance_scale=3.0)
    full_other = generate(comps, prompts, seeds, unet=other, steps=4, guidance_scale=3.0)
    # Same model on both sides: every psi gives the original's image.
    same = partial_diffusion(comps, comps.unet, comps.unet, prompts, seeds, [0.3, 0.9], steps=4)
    for img in same.values():
        torch.testing.assert_close(img, full_orig, atol=1e-5, rtol=0)
    # psi below the first timestep: the unlearned model does everything; psi near 1: the original does.
    parts = partial_diffusion(comps, comps.unet, other, prompts, seeds, [0.001, 0.999], steps=4)
    torch.testing.assert_close(parts[0.001], full_other, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts[0.999], full_orig, atol=1e-5, rtol=0)


class FlatEncoder:
    """Unit-normalised flattened pixels as image features (a stand-in CLIP)."""

    def image_features(self, images):
        return torch.nn.functional.normalize(images.flatten(1).float(), dim=-1)


def test_recovery_scores_when_partial_images_are_the_originals():
    from unlearn.metrics.concept_recovery import recovery_scores

    g = torch.Generator().manual_seed(0)
    orig = torch.rand(6, 3, 4, 4, generator=g) + torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    unl = torch.rand(6, 3, 4, 4, generator=g) + torch.tensor([0, 0, 1.0]).view(1, 3, 1, 1)
    out = recovery_scores(FlatEncoder(), orig, unl, {0.1: orig.clone(), 0.5: orig.clone()})
    assert out["classifier_train_accuracy"] == 100.0 and out["ccs"] > 90
    enc = FlatEncoder()
    cos_ou = (enc.image_features(orig) * enc.image_features(unl)).sum(-1)
    s = lambda c: (1 - torch.atan(c)) / (math.pi / 2)
    expected = (s(torch.ones(6)).mean() - s(cos_ou).mean()).abs().item()
    assert out["crs"] == pytest.approx(expected, rel=1e-5)
