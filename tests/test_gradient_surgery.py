import numpy as np
import pytest
import torch

from unlearn.losses import concept_preserving_gradient, gradient_conflict_stats, gradient_conflict_tensors


def _flat(grads):
    return np.concatenate([g.numpy().ravel() for g in grads])


def _conflicting(seed=0):
    gen = torch.Generator().manual_seed(seed)
    g_r = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    g_u = [-2 * g_r[0] + 0.1 * torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    return g_u, g_r


def test_no_conflict_returns_copies_of_g_u():
    g_r = [torch.randn(3, 4), torch.randn(5)]
    g_u = [g_r[0] * 2 + 0.01, g_r[1].clone()]
    before = [g.clone() for g in g_u + g_r]
    out = concept_preserving_gradient(g_u, g_r)
    for o, u in zip(out, g_u):
        assert torch.equal(o, u) and o is not u and o.data_ptr() != u.data_ptr()
    for g, b in zip(g_u + g_r, before):
        assert torch.equal(g, b)


def test_lambda_one_gives_orthogonal_result_and_leaves_inputs():
    g_u, g_r = _conflicting()
    before = [g.clone() for g in g_u + g_r]
    assert np.dot(_flat(g_u), _flat(g_r)) < 0
    out = concept_preserving_gradient(g_u, g_r, lam=1.0)
    assert abs(np.dot(_flat(out), _flat(g_r))) < 1e-4 * np.linalg.norm(_flat(g_u)) * np.linalg.norm(
        _flat(g_r)
    )
    for g, b in zip(g_u + g_r, before):
        assert torch.equal(g, b)


def test_lambda_half_matches_hand_computation():
    g_u, g_r = _conflicting(1)
    u, r = _flat(g_u).astype(np.float64), _flat(g_r).astype(np.float64)
    expected = u - 0.5 * (u @ r) / (r @ r) * r
    out = _flat(concept_preserving_gradient(g_u, g_r, lam=0.5))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # Half of the conflicting component is left.
    np.testing.assert_allclose(out @ r, 0.5 * (u @ r), rtol=1e-4)


def test_zero_retain_gradient_returns_g_u_without_nan():
    g_u = [torch.randn(3), torch.randn(2, 2)]
    out = concept_preserving_gradient(g_u, [torch.zeros(3), torch.zeros(2, 2)])
    assert all(torch.equal(o, u) for o, u in zip(out, g_u))
    out = concept_preserving_gradient(g_u, [torch.zeros(3), torch.zeros(2, 2)], normalize=True)
    assert all(torch.equal(o, u) for o, u in zip(out, g_u))
    out = concept_preserving_gradient([torch.zeros(3)], [torch.randn(3)], normalize=True)
    assert torch.equal(out[0], torch.zeros(3))


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_none_entries(granularity):
    r0, r2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0, 4.0])
    g_u = [torch.tensor([-1.0, 2.0]), torch.tensor([5.0]), None, torch.tensor([7.0])]
    g_r = [r0, None, r2, torch.tensor([-1.0])]
    out = concept_preserving_gradient(g_u, g_r, granularity=granularity)
    assert out[2] is None  # no unlearning gradient: nothing to update
    assert torch.equal(out[1], g_u[1]) and out[1] is not g_u[1]
    if granularity == "per_tensor":
        np.testing.assert_allclose(out[0].numpy(), [0.0, 2.0])  # its own conflict removed
        np.testing.assert_allclose(out[3].numpy(), [0.0])
    else:
        # Global dot = -1 - 7 = -8 over the updated coordinates; ||G_r||^2 there = 1 + 1 = 2 (r2 is excluded).
        np.testing.assert_allclose(out[0].numpy(), [-1.0 + 4.0, 2.0])
        np.testing.assert_allclose(out[3].numpy(), [7.0 - 4.0])
        dot = sum(float((o * r).sum()) for o, r in zip(out, g_r) if o is not None and r is not None)
        assert abs(dot) < 1e-6


def test_global_and_per_tensor_differ_when_only_one_tensor_conflicts():
    g_u = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0])]
    g_r = [torch.tensor([5.0, 0.0]), torch.tensor([1.0])]  # global dot 4 > 0, second tensor's dot -1 < 0
    glob = concept_preserving_gradient(g_u, g_r, granularity="global")
    per = concept_preserving_gradient(g_u, g_r, granularity="per_tensor")
    assert all(torch.equal(o, u) for o, u in zip(glob, g_u))
    assert torch.equal(per[0], g_u[0])
    np.testing.assert_allclose(per[1].numpy(), [0.0])


def test_normalize_follows_doco_rule():
    g_u, g_r = _conflicting(2)
    out = concept_preserving_gradient(g_u, g_r, lam=0.7, granularity="per_tensor", normalize=True)
    for o, u, r in zip(out, g_u, g_r):
        un, rn = u.numpy().ravel().astype(np.float64), r.numpy().ravel().astype(np.float64)
        cos = un @ rn / (np.linalg.norm(un) * np.linalg.norm(rn))
        expected = un - 0.7 * cos * rn / np.linalg.norm(rn) if cos < 0 else un
        np.testing.assert_allclose(o.numpy().ravel(), expected, rtol=1e-5, atol=1e-6)


def test_errors_name_lengths_and_granularity():
    with pytest.raises(ValueError, match="2 tensors.*1"):
        concept_preserving_gradient([torch.ones(1), torch.ones(1)], [torch.ones(1)])
    with pytest.raises(ValueError, match="per_layer"):
        concept_preserving_gradient([torch.ones(1)], [torch.ones(1)], granularity="per_layer")
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        concept_preserving_gradient([torch.ones(2)], [torch.ones(3)])


def test_conflict_stats():
    g_u, g_r = _conflicting(3)
    u, r = _flat(g_u), _flat(g_r)
    stats = gradient_conflict_stats(g_u, g_r)
    assert stats["conflict"] is True
    assert stats["cos"] == pytest.approx(u @ r / (np.linalg.norm(u) * np.linalg.norm(r)), rel=1e-5)
    assert gradient_conflict_stats(g_u, g_u)["conflict"] is False
    on_device = gradient_conflict_tensors(g_u, g_r)  # what a training step logs, never read back there
    assert all(torch.is_tensor(v) and v.ndim == 0 for v in on_device.values())
    assert float(on_device["dot"]) == pytest.approx(u @ r, rel=1e-5) and float(on_device["conflict"]) == 1.0
    assert gradient_conflict_stats([torch.ones(2)], [torch.zeros(2)]) == {
        "cos": 0.0,
        "conflict": False,
        "norm_u": pytest.approx(2**0.5),
        "norm_r": 0.0,
    }
