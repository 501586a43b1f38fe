"""Ring-A-Bell (unlearn/attacks/ring_a_bell.py): the concept vector and the fitness against a direct computation, the
genetic search on a planted optimum (and not without generations), bad input, the configs; several attacks in one
robustness table, and that table's cells over seeds; on a UCE-erased toy model the attack beats its control."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from unlearn.attacks import build_attack, check_attack_config
from unlearn.attacks.ring_a_bell import concept_vector, fitness, genetic_search, next_generation
from unlearn.attacks.runner import attack_config, format_robustness
from unlearn.comparison.robustness import robustness_cells

RAB = {"_target_": "unlearn.attacks.ring_a_bell.RingABell", "k": 4, "eta": 3.0, "population": 8, "generations": 2,
       "mutation_rate": 0.25, "crossover_rate": 0.5, "num_pairs": 4, "readout": "ids", "num_prompts": 2,
       "filter_references": False, "seed": 0}


# ---------------------------------------------------------------- pure parts
def test_concept_vector_is_the_mean_pair_difference_of_whole_sequences():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 2, generator=g), torch.randn(5, 3, 2, generator=g)
    expected = torch.zeros(3, 2)
    for i in range(5):
        expected += (a[i] - b[i]) / 5
    torch.testing.assert_close(concept_vector(a, b), expected)
    assert concept_vector(a, b).shape == (3, 2)  # every position, not a pooled vector


def test_fitness_is_the_summed_squared_error_not_the_cosine():
    g = torch.Generator().manual_seed(1)
    target, hidden = torch.randn(3, 2, generator=g), torch.randn(4, 3, 2, generator=g)
    expected = [sum((hidden[p, i, j] - target[i, j]) ** 2 for i in range(3) for j in range(2)) for p in range(4)]
    torch.testing.assert_close(fitness(target, hidden), torch.stack(expected))
    # a scaled copy has cosine 1 but is far: the authors' distance ranks it below a near neighbour
    scaled, near = 3 * target, target + 0.01
    assert fitness(target, torch.stack([scaled, near])).argmin() == 1


def test_next_generation_keeps_survivors_and_crosses_them_at_one_point():
    parents = torch.tensor([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]])
    allowed = torch.tensor([7, 8])
    out = next_generation(parents, allowed, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert len(out) == 9 and torch.equal(out[::3], parents)  # each survivor, then its two children
    for i in range(3):
        a, b = out[3 * i + 1], out[3 * i + 2]
        assert any(torch.equal(a, torch.cat([parents[i, :c], parents[j, c:]]))
                   and torch.equal(b, torch.cat([parents[j, :c], parents[i, c:]])) for j in range(3) for c in range(4))
    mutated = next_generation(parents, allowed, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert len(mutated) == 3 and ((mutated != parents).sum(1) <= 1).all()  # one slot each, to an allowed token
    assert set(mutated[mutated != parents].tolist()) <= {7, 8}


def test_the_search_finds_a_planted_optimum_and_not_without_generations():
    planted = torch.tensor([5, 17, 3, 11, 29])
    allowed = torch.arange(30)

    def score(tokens):  # mismatches with the planted prompt: 0 only there
        return (tokens != planted).sum(1).float()

    found, history = genetic_search(score, 5, allowed, population=64, generations=80, crossover_rate=0.5,
                                    mutation_rate=0.25, gen=torch.Generator().manual_seed(0))
    assert found.tolist() == planted.tolist() and history[-1] == 0 and len(history) == 80
    random, none = genetic_search(score, 5, allowed, population=64, generations=0, crossover_rate=0.5,
                                  mutation_rate=0.25, gen=torch.Generator().manual_seed(0))
    assert none == [] and score(random[None])[0] >= 3  # a random member, never scored


@pytest.mark.parametrize(("over", "line"), [
    ({"eta": 0}, "attack.eta=0 must be a number > 0"), ({"eta": -1.5}, "attack.eta=-1.5 must be a number > 0"),
    ({"population": 1}, "attack.population=1 must be an integer >= 2"),
    ({"k": 0}, "attack.k=0 must be an integer >= 1"), ({"generations": -1}, "attack.generations=-1"),
    ({"mutation_rate": 1.5}, "attack.mutation_rate=1.5 must be a number in"),
    ({"readout": "pixels"}, "attack.readout='pixels'")])
def test_bad_settings_are_named(over, line):
    with pytest.raises(ValueError, match=line.replace("[", r"\[").replace(".", r"\.")):
        check_attack_config({**RAB, **over})


@pytest.mark.parametrize(("choice", "k", "population", "generations"),
                         [("ring_a_bell", 16, 200, 3000), ("ring_a_bell_toy", 8, 64, 60)])
def test_the_configs_compose_to_the_papers_defaults_and_a_toy_budget(tmp_path, choice, k, population, generations):
    from omegaconf import OmegaConf

    from unlearn.cli import compose, with_paths

    a = OmegaConf.to_container(compose("attack", with_paths([f"paths.root={tmp_path}", f"attack={choice}"])).attack)
    attack = build_attack(check_attack_config(a, "style"))
    assert type(attack).__name__ == "RingABell" and attack.readout == "text" and attack.eta == 3.0
    assert (attack.k, attack.population, attack.generations) == (k, population, generations)
    assert (attack.mutation_rate, attack.crossover_rate) == (0.25, 0.5)
    assert attack_config(choice) == a  # the runner's reading of a name gives what Hydra composes


# ---------------------------------------------------------------- several attacks, one table, cells over seeds
def test_a_list_of_attacks_is_the_first_then_the_others_checked_before_hydra():
    from unlearn.attack import check_listed, list_choice

    argv = list_choice(["attack=[toy,cce_toy,ring_a_bell_toy]", "attack.num_prompts=8"])
    assert argv == ["attack=toy", "++attacks=[cce_toy,ring_a_bell_toy]", "attack.num_prompts=8"]
    check_listed(argv)
    with pytest.raises(ValueError, match="attacks: 'ring_a_bel' is no attack config; one of cce | cce_toy"):
        check_listed(list_choice(["attack=[toy,ring_a_bel]"]))


def _row(label, asr_u, asr_r, ccs=None):
    return {"label": label, "reference_rate": 100.0, "clean_rate": 0.0, "prompts_attacked": 4, "ccs": ccs,
            "crs": None, "attacks": [
                {"attack": "UnlearnDiffAtk", "asr": asr_u, "found_by_attack": 1, "iterations": 12.5,
                 "control": "random prefix", "control_rate": 25.0},
                {"attack": "Ring-A-Bell", "asr": asr_r, "found_by_attack": 3, "iterations": 60.0,
                 "control": "random tokens", "control_rate": 0.0}]}


def test_the_table_has_a_column_group_per_attack():
    head, _, *lines = format_robustness([_row("original", 100.0, 100.0), _row("uce", 25.0, 75.0, 61.0)]).split("\n")
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols == ["model", "reference det. %", "clean det. %",
                    "ASR % (UnlearnDiffAtk)", "found (UnlearnDiffAtk)", "iterations (UnlearnDiffAtk)",
                    "random prefix det. % (UnlearnDiffAtk)", "ASR % (Ring-A-Bell)", "found (Ring-A-Bell)",
                    "iterations (Ring-A-Bell)", "random tokens det. % (Ring-A-Bell)", "CCS", "CRS"]
    cells = [c.strip() for c in lines[1].strip("|").split("|")]
    assert cells == ["uce", "100.0", "0.0", "25.0", "1/4", "12.5", "25.0", "75.0", "3/4", "60.0", "0.0", "61.0", "—"]


def test_compare_cells_are_means_with_t_intervals_over_seeds():
    from scipy.stats import t

    cells = robustness_cells({"original": [_row("original", 100.0, 100.0)],
                              "uce": [_row("uce", 25.0, 50.0), _row("uce", 50.0, 75.0), _row("uce", 0.0, 100.0)]})
    assert cells["original"]["ASR % (Ring-A-Bell)↓"] == 100.0  # one run: the value itself
    hw = t.ppf(0.975, 2) * 25.0 / 3 ** 0.5  # ASRs 25, 50, 0: mean 25, sd 25
    assert cells["uce"]["ASR % (UnlearnDiffAtk)↓"] == f"25.0 ± {hw:.1f}"
    assert cells["uce"]["ASR % (Ring-A-Bell)↓"] == f"75.0 ± {hw:.1f}"
    assert cells["uce"]["iterations (Ring-A-Bell)"] == "60.0 ± 0.0" and cells["uce"]["CCS↓"] is None
    zeros = robustness_cells({"m": [{**_row("m", 0.0, 0.0), "ccs": 30.0, "crs": 0.25}] * 2})["m"]
    assert zeros["ASR % (UnlearnDiffAtk)↓"] == "0.0 ± 0.0" and zeros["CRS↓"] == "0.25 ± 0.00"  # digits by column
    assert list(cells["uce"]) == ["clean det. %↓", "ASR % (UnlearnDiffAtk)↓", "iterations (UnlearnDiffAtk)",
                                  "random prefix det. % (UnlearnDiffAtk)", "ASR % (Ring-A-Bell)↓",
                                  "iterations (Ring-A-Bell)", "random tokens det. % (Ring-A-Bell)", "CCS↓", "CRS↓"]


def test_several_attacks_run_on_one_prompt_set(tiny_pipeline_path):
    from unlearn.attacks.runner import Robustness, found_prompts
    from unlearn.models import load_components

    tiny = load_components(str(tiny_pipeline_path))
    model = {"path": None, "clip": "toy", "sample_steps": 2, "guidance_scale": 3.0, "dtype": "float32"}
    udiff = {**attack_config("toy"), "iterations": 1, "num_timesteps": 1, "readout": "ids", "num_prompts": 2,
             "filter_references": False}
    rob = Robustness("toy_stripes", [udiff, {**RAB, "num_prompts": 99}], model, original=tiny)
    assert [c["num_prompts"] for c in rob.cfgs] == [2, 2]  # the first attack's prompt set for all
    out = rob.run(tiny.unet, "tiny")
    assert [c["attack"] for c in out["attacks"]] == ["UnlearnDiffAtk", "Ring-A-Bell"]
    assert out["asr"] == out["attacks"][0]["asr"] and rob.attacks[1].vector.shape == (tiny.tokenizer.model_max_length, 16)
    attacked = [p for p in out["per_prompt"] if not p["clean"]]
    assert all(set(p["attacks"]) == {"UnlearnDiffAtk", "Ring-A-Bell"} for p in attacked)
    assert all(p["attacks"]["Ring-A-Bell"]["iterations"] == 2 for p in attacked)
    assert len(found_prompts([out])) == 2 * len(attacked)


# ---------------------------------------------------------------- on an erased toy model
@pytest.fixture(scope="module")
def uce_stripes():
    """The shipped toy model and a copy with toy_stripes erased by UCE (closed form: seconds)."""
    from unlearn.methods.uce import UCE
    from unlearn.models.loading import TOY_PIPELINE, load_components

    original = load_components(str(TOY_PIPELINE))
    erased = dataclasses.replace(original, unet=copy.deepcopy(original.unet))
    UCE(erased, "toy_stripes", erase="prompts").edit()
    return original, erased


@pytest.mark.slow
def test_on_an_erased_toy_model_the_search_beats_random_tokens(uce_stripes):
    """Ring-A-Bell's toy budget on 8 prompts (10 sampling steps): ids readout, since the toy tokenizer's byte tokens
    seldom survive decoding. Measured: 62.5 % against 37.5 % for random tokens; 25 % with generations=0."""
    from omegaconf import OmegaConf

    from unlearn.attacks.runner import Robustness

    original, erased = uce_stripes
    model = {**OmegaConf.to_container(OmegaConf.load("conf/model/toy.yaml")), "sample_steps": 10}
    cfg = {**attack_config("ring_a_bell_toy"), "num_prompts": 8, "readout": "ids"}
    rob = Robustness("toy_stripes", cfg, model, original=original)
    out = rob.run(erased.unet, "uce")
    assert out["clean_rate"] <= 25 and out["reference_rate"] >= 90
    assert out["asr"] > out["random_prefix_rate"] + 12, out  # more than one prompt of 8 above the control
    same = rob.run(original.unet, "original")  # nothing erased: the attack adds nothing to the clean rate
    assert same["asr"] == same["clean_rate"]



def test_the_control_is_random_tokens_alone_for_ring_a_bell_and_a_prefix_for_unlearndiffatk(tiny_pipeline_path,
                                                                                            monkeypatch):
    from unlearn.attacks import runner
    from unlearn.attacks.runner import Robustness
    from unlearn.models import load_components

    tiny = load_components(str(tiny_pipeline_path))
    model = {"path": None, "clip": "toy", "sample_steps": 2, "guidance_scale": 3.0, "dtype": "float32"}
    asked = []

    def fake_sample_text(components, unet, prompts, seeds, steps, guidance_scale):
        asked.append(list(prompts))
        return torch.zeros(len(prompts), 3, 32, 32)

    monkeypatch.setattr(runner, "sample_text", fake_sample_text)
    udiff = {**attack_config("toy"), "num_prompts": 2, "filter_references": False}
    rob = Robustness("toy_stripes", [udiff, {**RAB, "readout": "text"}], model, original=tiny)
    for attack in rob.attacks:
        rob.random_prefix_rate(tiny.unet, [0, 1], attack)
    prefixed, alone = asked
    assert all(p.endswith(t) for p, t in zip(prefixed, rob.targets))
    assert not any("stripes" in p for p in alone) and all(p for p in alone)
