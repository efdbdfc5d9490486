"""A candidate is (layers, setting): settings expanded per group where they can change its
training, named by what varies, checked in the config; rungs sized in steps that prune only on
evidence; a baseline's settings compete among themselves."""
import numpy as np
import pytest

from blockft_jax import models
from blockft_jax.candidates import groups, halving, settings, strategies
from blockft_jax.search import plan
from configs import demo, tiny


@pytest.fixture(scope="module")
def table():
    config = tiny.get_config()
    return models.layer_table(plan.build_module(config, 3), (32, 32, 3))


def names(members):
    return [g.candidate for g in members]


def test_settings_expand_only_where_they_change_training(table):
    both = [settings.Setting(p, f) for p in ("train", "frozen") for f in (1.0, 0.1)]
    conv = next(r.name for r in table if r.kind == "conv" and r.unit != "head")
    bn = next(r.name for r in table if r.kind == "batchnorm")
    layer = lambda name: groups.Group("layerwise", f"layerwise:{name}", (name,))
    # The head alone: neither the BN policy nor the backbone's factor can matter.
    assert names(settings.expand(groups.classifier_only(), table, both)) == ["classifier_only"]
    # A conv layer: only the factor; a BN layer: both.
    assert names(settings.expand([layer(conv)], table, both)) == [
        f"layerwise:{conv}@lr=x1", f"layerwise:{conv}@lr=x0.1"]
    expanded = settings.expand([layer(bn)], table, both)
    assert names(expanded) == [f"layerwise:{bn}@bn={p},lr=x{f:g}" for p in ("train", "frozen")
                               for f in (1.0, 0.1)]
    assert [(g.bn_policy, g.lr_factor) for g in expanded] == [(s.bn_policy, s.lr_factor)
                                                              for s in both]
    assert {settings.base(g.candidate) for g in expanded} == {f"layerwise:{bn}"}
    # One setting: the groups as they were, names and all.
    full = groups.full(table)
    assert settings.expand(full, table, [settings.Setting()]) == full


def test_frozen_policy_and_factors_are_data(table):
    """'frozen' puts every BN in inference mode, also in masks that change by epoch; the
    factor scales the backbone, the head its own."""
    params = models.variable_shapes(plan.build_module(tiny.get_config(), 3), (32, 32, 3))
    params = {"params": jax_zeros(params["params"])}["params"]
    group = groups.gradual(table, [1], 3)[0]
    frozen = settings.apply(strategies.inputs(params, table, group),
                            groups.Group(**{**group.__dict__, "bn_policy": "frozen",
                                            "lr_factor": 0.5}), 4.0)
    for epoch in range(3):
        mask, modes = frozen.mask_at(epoch)
        assert not any(bool(v) for v in modes.values())
        head = [float(v) for k, v in flat(mask).items() if k[0] == models.HEAD_UNIT]
        body = {float(v) for k, v in flat(mask).items() if k[0] != models.HEAD_UNIT}
        assert set(head) == {4.0} and body <= {0.0, 0.5} and 0.5 in body


def jax_zeros(shapes):
    import jax
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def flat(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(tree)


@pytest.mark.parametrize("key, value, expected", [
    ("train.freeze_bn", True, "replaced by search.bn_policies"),
    ("search.bn_policies", ("train", "frozn"), "search.bn_policies"),
    ("search.bn_policies", (), "search.bn_policies"),
    ("search.lr_factors", (1.0, 1.0), "distinct numbers > 0"),
    ("search.lr_factors", (0.0,), "distinct numbers > 0"),
    ("train.head_learning_rate", -1.0, "train.head_learning_rate"),
    ("search.min_rung_steps", 0, "search.min_rung_steps"),
])
def test_bad_settings_are_refused_with_the_fix(key, value, expected):
    config = tiny.get_config()
    section, name = key.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(plan.ConfigError, match=expected.replace("(", r"\(")):
        plan.validate(config)


def test_rungs_shorter_than_the_minimum_steps_are_dropped():
    # The demo: 100 training images in batches of 25, 4 steps an epoch: rungs of 1 and 3
    # epochs (4 and 12 steps) rank noise; 10 epochs (40 steps) stay.
    rungs = halving.rungs("halving", 30, 4, eta=3, min_steps=30, steps_per_epoch=4)
    assert [r.epochs for r in rungs] == [10, 30]
    assert [r.epochs for r in halving.rungs("halving", 30, 4, eta=3)] == [1, 3, 10, 30]
    config = demo.get_config()
    module = plan.build_module(config, 5)
    searched = plan.make_plan(config, models.layer_table(module, (32, 32, 3)), module)
    assert [r.epochs for r in searched.rungs] == [10, 30]


def test_a_rung_prunes_only_on_evidence():
    def right(start, stop):  # (seeds, examples): right on examples start..stop-1 of 400
        correct = np.zeros((1, 400), bool)
        correct[0, start:stop] = True
        return correct
    # close: 6 examples lead gets and it misses, 4 the other way round: no clear gap.
    correct = {"lead": right(0, 360), "close": right(6, 364), "far": right(0, 200),
               "farther": right(100, 260)}
    accuracy = {k: float(v.mean()) for k, v in correct.items()}
    order = list(correct)
    decided = halving.evidence(order, accuracy, correct, eta=3, chance=0.3)
    # promote keeps 2 of 4 (lead, close); the far ones are clearly below the leader.
    assert decided["kept"] == ["lead", "close"] and set(decided["pruned"]) == {"far", "farther"}
    assert all(e["ci95"][0] > 0 for e in decided["pruned"].values())
    # Without a clear gap, the rung holds: 'close' would be pruned at eta=4, but goes on.
    decided = halving.evidence(order, accuracy, correct, eta=4, chance=0.3)
    assert decided["kept"] == ["lead", "close"] and "close" in decided["held"]
    # A leader within chance: nothing is pruned.
    decided = halving.evidence(order, accuracy, correct, eta=3, chance=0.95)
    assert decided["kept"] == order and decided["within_chance"] and not decided["pruned"]
    assert halving.chance_bound(5, 400) == pytest.approx(0.2 + 2 * (0.2 * 0.8 / 400) ** 0.5)


def test_a_baselines_settings_compete_among_themselves():
    """Pools: a searched strategy's (layers, setting) pairs rank together; each baseline
    candidate's settings among themselves (a baseline candidate is never pruned)."""
    config = demo.get_config()
    with config.unlocked():
        config.search.strategies = ("classifier_only", "full", "blocks", "llrd")
        config.search.llrd_decays = (0.5, 0.8)
        config.train.seeds = 4
    module = plan.build_module(config, 5)
    searched = plan.make_plan(config, models.layer_table(module, (32, 32, 3)), module)
    assert list(searched.pools("full")) == ["full"] and len(searched.pools("full")["full"]) == 2
    assert list(searched.pools("llrd")) == ["llrd:0.5", "llrd:0.8"]
    assert list(searched.pools("blocks")) == ["blocks"]
    assert searched.pool_sizes("classifier_only") == [1]
    # full's two settings: one seed to 10 epochs each, the better one every seed to 30.
    assert searched.expected("full") == (1 + 4, 2 * 10 + 20 + 3 * 30)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A tiny halving search over two BN policies and two factors, the head at its own rate;
    rungs of at least 6 steps (3 an epoch: the 1-epoch rung goes); the paired test decides
    (the random tiny backbone sits near chance, so chance is put at 0 here)."""
    from blockft_jax.search import search
    from test_search import tiny_config
    config = tiny_config(**{
        "search.strategies": ("classifier_only", "full", "blocks"),
        "search.bn_policies": ("train", "frozen"), "search.lr_factors": (1.0, 0.3),
        "train.head_learning_rate": 3e-3, "train.epochs": 4, "train.seeds": 2,
        "search.schedule": "halving", "search.eta": 2, "search.min_rung_steps": 6})
    workdir = tmp_path_factory.mktemp("settings")
    patch = pytest.MonkeyPatch()
    patch.setattr(halving, "chance_bound", lambda classes, examples: 0.0)
    try:
        summary = search.run(config, workdir)
    finally:
        patch.undo()
    return config, workdir, summary


def test_a_search_of_settings_compiles_no_more_and_records_them(searched):
    import json
    from blockft_jax.engine import checkpoint
    config, workdir, summary = searched
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    # Settings are data: one train-step compilation per engine, the engines of one setting.
    record = json.loads((workdir / "runs.jsonl").read_text().splitlines()[-1])
    assert {c["train"] for c in record["compilations"].values()} == {1}
    module = plan.build_module(config, 3)
    table = models.layer_table(module, (32, 32, 3))
    with config.unlocked():
        one = config.copy_and_resolve_references()
        one.search.bn_policies, one.search.lr_factors = ("train",), (1.0,)
    assert len(record["compilations"]) <= len(plan.make_plan(one, table, module).from_units) + 1
    # Each row says its setting; full's four settings compete; classifier-only has one.
    for r in rows:
        suffix = r["candidate"].partition("@")[2]
        assert ("bn=frozen" in suffix) == (r["bn_policy"] == "frozen")
        assert (f"lr=x{r['lr_factor']:g}" in suffix) or "lr=" not in suffix
    assert {r["candidate"] for r in rows if r["strategy"] == "classifier_only"} == {
        "classifier_only"}
    full = {r["candidate"] for r in rows if r["strategy"] == "full"}
    assert len(full) == 4
    # Rung 0 is 2 epochs (6 steps); its decision on evidence, kept in schedule.json.
    decisions = json.loads((workdir / "schedule.json").read_text())
    d = decisions["full"]["0"]
    assert sorted(d["kept"] + list(d["pruned"])) == sorted(full)
    assert all(e["ci95"][0] > 0 for e in d["pruned"].values())
    assert all(e["ci95"][0] <= 0 for e in d["held"].values())
    for name in d["pruned"]:
        assert {(r["epochs"], r["status"]) for r in rows if r["candidate"] == name} == {
            (2, "pruned")}
    for name in d["kept"]:
        assert sorted(r["seed"] for r in rows if r["candidate"] == name
                      and r["epochs"] == 4) == [0, 1]
    # The saved model records its setting; under 'frozen' no moving average moved (the
    # classifier-only model holds the backbone's as they were).
    for strategy in ("full",):
        variables, meta = checkpoint.load_model(workdir / "models" / strategy)
        selected = summary["strategies"][strategy]["selected"]
        assert meta["setting"]["bn_policy"] == selected["bn_policy"]
        assert meta["setting"]["lr_factor"] == selected["lr_factor"]
        before, _ = checkpoint.load_model(workdir / "models" / "classifier_only")
        stats = zip(jax_leaves(variables["batch_stats"]), jax_leaves(before["batch_stats"]))
        same = all(np.array_equal(a, b) for a, b in stats)
        assert same == (selected["bn_policy"] == "frozen"), strategy
    report = (workdir / "report.md").read_text()
    assert "## What each rung pruned" in report and "`full`, rung 0 (2 epochs" in report
    if len(summary["settings"]):
        assert "## What mattered" in report
        winner = summary["winner"]["candidate"]
        assert {settings.base(c["b"]) for c in summary["settings"]} == {settings.base(winner)}


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_only_the_registry_names_strategies():
    """One place per strategy: the modules that plan, search, cost and report a search read
    strategies.REGISTRY and name none (adding one touches strategies.py, groups.py, tests)."""
    import inspect
    import re
    from blockft_jax.search import costs, report, results, search
    from blockft_jax import launch, target
    for module in (plan, search, costs, report, results, launch, target):
        source = inspect.getsource(module)
        named = [name for name in strategies.SEARCH_ORDER if re.search(f"[\"']{name}[\"':]",
                                                                       source)]
        assert not named, f"{module.__name__} names {named}"
