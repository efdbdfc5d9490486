"""SubTuning (blockft_jax/candidates/subtuning.py): its rounds' candidates and decisions, a
search of rounds end to end on configs/tiny.py (schedule.json, the rows, the chosen candidate's model, the
report's table of rounds), and a kill -9 between rounds resumed to the same files, bitwise."""
import json

import pytest

from blockft_jax import models
from blockft_jax.candidates import subtuning
from blockft_jax.candidates.groups import Group, bn_modes, unit_layers, weighted_units
from blockft_jax.search import plan
from configs import tiny
from test_resume import assert_same_search, finished, killed_line, rows, search
from test_search import same_engines

# Enough images and a rate at which the random tiny backbone's top unit learns in one epoch what
# the head alone does not (+0.037, 3 validation examples): round 1 adds it, round 2 is run.
ROUNDS = {"train.seeds": 2, "train.learning_rate": 1e-2, "data.train_per_class": 40,
          "search.subtuning_epsilon": 0.0, "search.strategies": ["classifier_only", "subtuning"]}


def _table(config=None):
    config = config or tiny.get_config()
    module = plan.build_module(config, 3)
    return models.layer_table(module, (config.model.input_size,) * 2 + (3,))


def test_rounds_offer_the_chosen_units_plus_each_other_unit():
    table = _table()
    units = weighted_units(table)
    first = subtuning.round_groups(table, None, None)
    assert [g.candidate for g in first] == [subtuning.HEAD] + [f"subtuning:{u}" for u in units]
    assert first[0].layers == () and first[1].layers == unit_layers(table, [units[0]])
    second = subtuning.round_groups(table, (units[1],), None)
    assert [g.option for g in second] == [(units[0], units[1])] + [
        (units[1], u) for u in units[2:]]  # top first, whatever the order of choice
    assert all(set(g.layers) == set(unit_layers(table, g.option)) for g in second)
    assert len(subtuning.round_groups(table, None, 2)) == 3  # the head and the top two units
    # A frozen unit runs its BatchNorm in inference mode, a chosen one in train mode.
    modes = bn_modes(table, second[0].layers)
    trained = {r.name for r in table if r.unit in second[0].option and r.kind == "batchnorm"}
    assert trained and {k for k, v in modes.items() if v} == trained


def _groups(*names):
    return [Group("subtuning", n, (), tuple(n.split(":")[1].split("+")) if n != subtuning.HEAD
                  else ()) for n in names]


def test_a_round_adds_its_leader_only_when_it_gains_epsilon():
    head, a, b = _groups(subtuning.HEAD, "subtuning:a", "subtuning:b")
    # Round 1: the head alone is the base; a gains 0.05.
    entry = subtuning.decide(1, [head, a, b], {head.candidate: 0.5, a.candidate: 0.55,
                                               b.candidate: 0.52}, None, 0.01, False)
    assert (entry["chosen"], entry["added"], entry["stop"]) == ("subtuning:a", "a", False)
    assert set(entry["pruned"]) == {head.candidate, b.candidate}
    assert entry["gain"] == pytest.approx(0.05) and entry["units"] == ["a"]
    # Round 2 from a (0.55): a+b gains 0.005 < 0.01: nothing added, the round's runs pruned.
    (ab,) = _groups("subtuning:a+b")
    entry = subtuning.decide(2, [ab], {ab.candidate: 0.555}, ("subtuning:a", ("a",), 0.55),
                             0.01, False)
    assert (entry["chosen"], entry["added"], entry["stop"]) == ("subtuning:a", None, True)
    assert set(entry["pruned"]) == {ab.candidate}
    # ... with 0.02 it is added, and the choice it replaces is pruned.
    entry = subtuning.decide(2, [ab], {ab.candidate: 0.57}, ("subtuning:a", ("a",), 0.55),
                             0.01, True)
    assert (entry["chosen"], entry["added"], entry["stop"]) == ("subtuning:a+b", "b", True)
    assert set(entry["pruned"]) == {"subtuning:a"}
    # The head alone leading round 1 stops the search there (ties keep plan order).
    entry = subtuning.decide(1, [head, a], {head.candidate: 0.5, a.candidate: 0.5}, None, 0.0,
                             False)
    assert (entry["chosen"], entry["stop"], set(entry["pruned"])) == (
        subtuning.HEAD, True, {a.candidate})


def test_the_plan_counts_every_round_allowed_and_the_dry_run_says_so():
    config = tiny.get_config()
    config.search.strategies = ("subtuning",)
    config.search.bn_policies = ("train", "frozen")
    table = _table(config)
    module = plan.build_module(config, 3)
    p = plan.make_plan(config, table, module, train_images=24)
    # Round 1: the head, and two units under two BN policies; round 2: one unit, two policies.
    assert plan.round_sizes(config, table, "subtuning") == [5, 2]
    budget = plan.round_rung(config, p.rungs)
    assert (budget.epochs, budget.seeds, budget.final) == (1, (0,), False)
    assert p.expected("subtuning") == subtuning.expected([5, 2], budget, p.rungs[-1])
    assert p.expected("subtuning") == (5 + 2 - 1 + 1, (5 + 2) * 1 + 1)
    words = plan.describe(config, p, table)
    assert "subtuning: in rounds" in words and "7 runs if every round is run" in words


@pytest.mark.parametrize("key,value,words", [
    ("subtuning_epsilon", -0.1, "subtuning_epsilon"), ("subtuning_units", -1, "subtuning_units"),
    ("subtuning_rounds", -2, "subtuning_rounds")])
def test_bad_subtuning_keys_are_refused_in_one_line(key, value, words):
    config = tiny.get_config()
    config.search[key] = value
    with pytest.raises(plan.ConfigError, match=words):
        plan.validate(config)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return finished(tmp_path_factory.mktemp("subtuning"), ROUNDS)


def test_a_search_in_rounds_records_each_round_and_trains_the_chosen_every_seed(whole):
    decisions = json.loads((whole / "schedule.json").read_text())
    rounds = [decisions[f"subtuning round {i}"]["0"] for i in (1, 2)]
    assert rounds[0]["added"] is not None and rounds[1]["stop"], rounds
    chosen = rounds[-1]["chosen"]
    table = [r for r in rows(whole).values() if r["strategy"] == "subtuning"]
    # Every round's candidate trained 1 epoch (the round's budget) with seed 0, recorded pruned
    # but the chosen, which trained both seeds to the end (seed 0 from where its round left it).
    assert sorted((r["seed"], r["epochs"], r["status"]) for r in table
                  if r["candidate"] == chosen) == [(0, 2, "ok"), (1, 2, "ok")]
    others = [r for r in table if r["candidate"] != chosen]
    assert {(r["seed"], r["epochs"], r["status"]) for r in others} == {(0, 1, "pruned")}
    assert len(others) == rounds[0]["candidates"] + rounds[1]["candidates"] - 1
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["strategies"]["subtuning"]["selected"]["candidate"] == chosen
    assert [e["round"] for e in summary["rounds"]["subtuning"]] == [1, 2]
    assert not any(p.startswith("subtuning") for p in summary.get("halving", {}).get(
        "decisions", {}))
    model = json.loads((whole / "models" / "subtuning" / "model.json").read_text())
    assert model["candidate"] == chosen
    report = (whole / "report.md").read_text()
    assert "## SubTuning (greedy units): rounds" in report
    assert f"| 1 | {rounds[0]['candidates']} | `{rounds[0]['leader']}` |" in report
    assert f"Chosen: `{chosen}`." in report
    # The chosen candidate's pruned competitors rank below it, whatever their accuracy.
    ranking = summary["strategies"]["subtuning"]["ranking"]
    assert ranking[0]["candidate"] == chosen and all(c["pruned"] for c in ranking[1:])


@pytest.mark.slow
def test_killed_between_rounds_resumes_bitwise(whole, tmp_path):
    """kill -9 right after round 1's decision (its pruned rows written, the chosen parked),
    then, in the process that resumed there, at round 2's first checkpoint, then the same
    command: the uninterrupted search's rows, summary, models and schedule.json."""
    same_engines(whole, tmp_path)
    cut = search(tmp_path, ROUNDS, "round:1")
    assert cut.returncode == -9, cut.stdout[-3000:] + cut.stderr[-3000:]
    assert "round 1 of subtuning" in killed_line(cut.stdout)
    decided = json.loads((tmp_path / "schedule.json").read_text())
    assert "subtuning round 1" in decided and "subtuning round 2" not in decided
    cut = search(tmp_path, ROUNDS, "save:1")
    assert cut.returncode == -9, cut.stdout[-3000:] + cut.stderr[-3000:]
    assert "subtuning:" in killed_line(cut.stdout)
    finished(tmp_path, ROUNDS)
    assert_same_search(whole, tmp_path)
    assert (tmp_path / "schedule.json").read_text() == (whole / "schedule.json").read_text()
