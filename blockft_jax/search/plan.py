"""A search's plan, before any data or weights: the config checked, the model built, and what
will be trained (strategies, candidates and their layers, runs, the lowest trainable unit).

The search runs this plan; `--dry_run` prints it, so a long search can be checked first.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path

import jax.numpy as jnp
import ml_collections

from blockft_jax import models
from blockft_jax.candidates import groups, halving, settings, strategies, subtuning
from blockft_jax.candidates.groups import Group
from blockft_jax.common.errors import UserError
from blockft_jax.engine import train
from blockft_jax.inputs import data, weights
from blockft_jax.search import costs

# model.weights values that are not files.
WEIGHT_SOURCES = ("imagenet", "random", "demo")
# 'adamw' is 'adam': with train.weight_decay > 0 both decay weights decoupled, as AdamW does.
OPTIMIZERS = ("adam", "adamw", "sgd")


class ConfigError(UserError, ValueError):
    """The config asks for something that does not exist or cannot work."""


def validate(config) -> None:
    """Checks every value of the config before any work; each problem is one line saying
    what is wrong and what is allowed (the first one found, section by section)."""
    _validate_model(config)
    _validate_data(config.data)
    _validate_train(config.train)
    _validate_strategies(config)
    _validate_schedule(config.search)
    if config.model.weights == "demo":
        _validate_demo(config.demo)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(value, name, allow_none=False):
    _need((allow_none and value is None) or (isinstance(value, int) and not
                                              isinstance(value, bool) and value >= 1),
          f"{name}={value!r}: use a whole number >= 1{' or None' if allow_none else ''}.")


def _number(value, name, low, high=math.inf, low_open=False):
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        value > low if low_open else value >= low) and value <= high
    bound = f"> {low}" if low_open else f">= {low}"
    _need(ok, f"{name}={value!r}: use a number {bound}"
              f"{f' and <= {high}' if high != math.inf else ''}.")


def _reach(value, name):
    _need(value is None or (isinstance(value, int) and not isinstance(value, bool)
                            and value >= 0),
          f"{name}={value!r}: use a whole number >= 1, or 0 for the whole backbone.")


def _validate_model(config) -> None:
    m = config.model
    _need(m.name in models.MODEL_NAMES,
          f"model.name={m.name!r} is unknown; choose one of {', '.join(models.MODEL_NAMES)}.")
    _number(m.width, "model.width", 0, low_open=True)
    _positive_int(m.input_size, "model.input_size")
    _need(m.input_size >= 32, f"model.input_size={m.input_size}: the backbones need >= 32.")
    _need(isinstance(m.weights, str)
          and (m.weights in WEIGHT_SOURCES or Path(m.weights).exists()),
          f"model.weights={m.weights!r}: no such file. Use {', '.join(map(repr, WEIGHT_SOURCES))}"
          f" or a path to a Keras .h5, .weights.h5 or .keras file or a converted .msgpack.")
    _number(m.dropout_rate, "model.dropout_rate", 0, 0.99)
    try:
        build_module(config, num_classes=2)
    except ValueError as e:  # an option this model does not have, or a bad value of one
        raise ConfigError(f"model.options: {e}") from None


def _validate_data(d) -> None:
    _need(isinstance(d.name, str) and d.name, "data.name is empty: name a TFDS dataset, "
                                              "'image_folder' or 'digits'.")
    _need(d.name != "image_folder" or bool(d.path),
          "data.name='image_folder' needs data.path=<directory with one subfolder per class>.")
    fractions = tuple(d.splits)
    _need(len(fractions) == 3 and all(isinstance(f, (int, float)) and f > 0 for f in fractions)
          and math.isclose(sum(fractions), 1.0, abs_tol=1e-6),
          f"data.splits={fractions!r}: use three positive fractions (train, validation, test) "
          f"summing to 1.")
    _positive_int(d.batch_size, "data.batch_size")  # any: devices split runs before batches
    _positive_int(d.train_per_class, "data.train_per_class", allow_none=True)
    _need(d.tfds_splits is None or (
          len(d.tfds_splits) == 3 and isinstance(d.tfds_splits[0], str) and d.tfds_splits[0]
          and all(x is None or (isinstance(x, str) and x) for x in d.tfds_splits[1:])),
          f"data.tfds_splits={d.tfds_splits!r}: use three TFDS split strings (train, "
          f"validation, test), e.g. ('train[:80%]', 'train[80%:]', 'test'); validation or test "
          f"may be None (carved from train); or None for all.")


def _validate_train(t) -> None:
    _positive_int(t.epochs, "train.epochs")
    _positive_int(t.seeds, "train.seeds")
    _need(t.optimizer in OPTIMIZERS, f"train.optimizer={t.optimizer!r}: use "
                                     f"{', '.join(map(repr, OPTIMIZERS))}.")
    _number(t.learning_rate, "train.learning_rate", 0, low_open=True)
    _number(t.momentum, "train.momentum", 0, 1)
    _number(t.weight_decay, "train.weight_decay", 0)
    _need(t.schedule in ("constant", "cosine"),
          f"train.schedule={t.schedule!r}: use 'constant' or 'cosine'.")
    _number(t.warmup_epochs, "train.warmup_epochs", 0, t.epochs)
    _need(t.compute_dtype in ("float32", "bfloat16", "float16"),
          f"train.compute_dtype={t.compute_dtype!r}: use float32, bfloat16 or float16.")
    _number(t.checkpoint_seconds, "train.checkpoint_seconds", 0)
    _need(t.freeze_bn is None,
          f"train.freeze_bn={t.freeze_bn!r}: replaced by search.bn_policies. Use "
          f"--config.search.bn_policies=\"('frozen',)\" to keep every BatchNorm in inference mode, "
          f"or \"('train', 'frozen')\" to search both.")
    if t.head_learning_rate is not None:
        _number(t.head_learning_rate, "train.head_learning_rate", 0, low_open=True)


def _validate_strategies(config) -> None:
    s = config.search
    known = strategies.SEARCH_ORDER
    unknown = [x for x in s.strategies if x not in known]
    _need(not unknown, f"search.strategies has unknown {unknown}; choose from "
                       f"{', '.join(known)}.")
    _need(len(s.strategies) > 0, "search.strategies is empty; choose from "
                                 f"{', '.join(known)}.")
    for x in s.strategies:
        after = strategies.REGISTRY[x].after
        _need(not after or after in s.strategies,
              f"search.strategies has {x!r} but no {after!r}: {x} trains from {after}'s "
              f"ranking, so add {after!r}.")
    _need(isinstance(s.parallel, int) and s.parallel >= 0,
          f"search.parallel={s.parallel!r}: use 0 (as many runs at once as memory allows), 1 "
          f"(one at a time) or a cohort size.")
    _reach(s.max_layers, "search.max_layers")
    for k in s.topk:
        _positive_int(k, "search.topk entry")
    for x in s.strategies:  # each strategy's own keys, as it reads them
        check_keys = strategies.REGISTRY[x].check
        problem = check_keys(config) if check_keys else None
        _need(problem is None, problem or "")
    _reach(s.max_blocks, "search.max_blocks")
    _positive_int(s.window, "search.window")
    _positive_int(s.stride, "search.stride", allow_none=True)
    _reach(s.max_windows, "search.max_windows")
    decays = tuple(s.llrd_decays)
    _need(len(decays) > 0 and all(isinstance(d, (int, float)) and not isinstance(d, bool)
                                  and math.isfinite(d) and 0 < d <= 1 for d in decays)
          and len(set(decays)) == len(decays),
          f"search.llrd_decays={decays!r}: use distinct numbers > 0 and <= 1 (the learning rate "
          f"is multiplied by decay ** depth below the head), e.g. (0.5, 0.65, 0.8).")
    every = tuple(s.gradual_epochs)
    _need(len(every) > 0 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                 for k in every) and len(set(every)) == len(every),
          f"search.gradual_epochs={every!r}: use distinct whole numbers >= 1 (epochs between "
          f"two units unfrozen), e.g. (1, 3).")
    _positive_int(s.auto_rgn_batches, "search.auto_rgn_batches")


def _validate_schedule(s) -> None:
    """The schedule, the settings and the engines."""
    _need(s.schedule in halving.SCHEDULES,
          f"search.schedule={s.schedule!r}: use 'halving' (successive halving) or 'exhaustive' "
          f"(the paper's protocol).")
    _need(isinstance(s.eta, int) and not isinstance(s.eta, bool) and s.eta >= 2,
          f"search.eta={s.eta!r}: use a whole number >= 2 (the best 1/eta go on at each rung).")
    _positive_int(s.halving_seeds, "search.halving_seeds")
    _positive_int(s.min_rung_steps, "search.min_rung_steps")
    _need(isinstance(s.prune_only_on_evidence, bool),
          f"search.prune_only_on_evidence={s.prune_only_on_evidence!r}: use True or False.")
    policies = tuple(s.bn_policies)
    _need(len(policies) > 0 and all(p in settings.BN_POLICIES for p in policies)
          and len(set(policies)) == len(policies),
          f"search.bn_policies={policies!r}: use distinct policies from "
          f"{', '.join(map(repr, settings.BN_POLICIES))}, e.g. ('train', 'frozen').")
    factors = tuple(s.lr_factors)
    _need(len(factors) > 0 and all(isinstance(f, (int, float)) and not isinstance(f, bool)
                                   and math.isfinite(f) and f > 0 for f in factors)
          and len(set(factors)) == len(factors),
          f"search.lr_factors={factors!r}: use distinct numbers > 0 (multipliers of the "
          f"backbone's learning rate), e.g. (0.1, 1.0, 10.0).")
    _positive_int(s.engines, "search.engines")


def _validate_demo(demo) -> None:
    _positive_int(demo.pretrain_epochs, "demo.pretrain_epochs")
    classes = tuple(demo.pretrain_classes)
    _need(len(classes) >= 2 and len(set(classes)) == len(classes) and
          all(isinstance(c, int) and 0 <= c <= 9 for c in classes),
          f"demo.pretrain_classes={classes!r}: use two or more distinct digits 0-9, e.g. "
          f"'(0, 1, 2, 3, 4)'.")
    _number(demo.pretrain_learning_rate, "demo.pretrain_learning_rate", 0,
            low_open=True)


def check(config) -> list[str]:
    """Every value of the config (`validate`) and what it reads (`check_inputs`), before any
    work; returns the inputs' lines for --dry_run."""
    validate(config)
    return check_inputs(config)


def check_inputs(config) -> list[str]:
    """What the search will read, checked without loading images: the image folder (its
    classes and their image files), the TFDS dataset's name, a Keras weights file of the
    user's (converted: its backbone found and every variable filled). Returns the lines
    --dry_run prints; raises a UserError saying what to fix."""
    d, m = config.data, config.model
    if d.name == "image_folder":
        classes = data.image_folder_classes(d.path)
        empty = [str(folder) for folder, files in classes if not files]
        if empty:
            raise data.DataError(f"Class folder(s) {', '.join(empty)} have no image files "
                                 f"({'/'.join(sorted(x[1:] for x in data.IMAGE_SUFFIXES))}); "
                                 "add images to them or remove them.")
        files = sum(len(f) for _, f in classes)
        counts = ", ".join(f"{folder.name} ({len(f):,})" for folder, f in classes)
        lines = [f"Data: image folder {d.path}: {len(classes)} classes, {files:,} image files "
                 f"(decoded on the first run): {counts}."]
    elif d.name == "digits":
        lines = [f"Data: scikit-learn's digits {tuple(d.classes or range(10))} (bundled)."]
    else:
        builder = data.check_tfds_name(d.name)
        data_dir = d.data_dir or os.environ.get("TFDS_DATA_DIR") or str(
            Path("~/tensorflow_datasets").expanduser())
        where = (f"in {data_dir}" if "://" in data_dir else
                 f"found in {data_dir}" if (Path(data_dir) / builder).is_dir() else
                 f"not in {data_dir} yet: downloaded there on the first run")
        lines = [f"Data: TFDS dataset {d.name} ({where})."]
    lines += [f"Note: data.{key} is set but data.name={d.name!r} does not use it."
              for key in data.unused_keys(d)]
    known = {
        "imagenet": f"Keras's ImageNet file for {m.name} (downloaded once, then cached).",
        "random": "random initialisation (nothing pretrained).",
        "demo": "the demo backbone (pretrained on digits "
        f"{', '.join(map(str, config.demo.pretrain_classes))}: shipped, or pretrained here "
        "once, then cached)."}
    lines.append("Weights: " + (known.get(m.weights) or _weights_file(config)))
    return lines


def _weights_file(config) -> str:
    """A file of the user's: a Keras file is converted here, so that a file for another model
    (or one without the backbone) is refused before anything trains."""
    path = Path(config.model.weights)
    if path.suffix not in (".h5", ".keras"):
        return f"{path}."
    stat = path.stat()
    model = json.dumps({"model": config.model.to_dict(),
                        "train": {"compute_dtype": config.train.compute_dtype}},
                       sort_keys=True, default=list)
    count = _converted_arrays(str(path), stat.st_mtime_ns, stat.st_size, model)
    return f"{path} (Keras file: the backbone found and converted, {count} parameter arrays)."


@functools.lru_cache(maxsize=4)
def _converted_arrays(path: str, mtime_ns: int, size: int, model: str) -> int:
    """The backbone's parameter arrays converted from a Keras file for the model `model`
    (JSON) describes: once per file state and model in a process, though the command line
    checks its inputs before its log file opens and the search again before its workdir."""
    config = ml_collections.ConfigDict(json.loads(model))
    shape = (config.model.input_size, config.model.input_size, 3)
    variables = weights.load_keras(path, build_module(config, None), shape)
    return sum(len(layer) for layer in variables["params"].values())


def build_module(config, num_classes: int | None):
    options = {k: v for k, v in config.model.options.items() if v is not None}
    return models.create(config.model.name, num_classes=num_classes, width=config.model.width,
                         dropout_rate=config.model.dropout_rate,
                         dtype=jnp.dtype(config.train.compute_dtype), **options)


def candidates(config, table, strategy: str, ranking=None) -> list[Group]:
    """`strategy`'s candidates: its groups of layers, each under every setting that can change
    its training (settings.expand). `ranking`: the layers its `after` strategy ranked."""
    return settings.expand(strategies.candidates(config, table, strategy, ranking), table,
                           settings.of_config(config))


@dataclasses.dataclass
class Plan:
    """What a search trains, and where. topk's candidates are known only after layerwise has
    run (they are the k best layers of its ranking): `planned` lacks them until then."""
    strategies: list[str]             # in the order they run
    planned: dict[str, list[Group]]   # strategy -> candidates
    units: list[str]                  # the model's units, input first
    layer_unit: dict[str, str]        # weighted layer -> its unit
    engines: list[str]                # every candidate but the whole network's (full, llrd,
                                      # auto_rgn): the engines' lowest units, shallowest first
    first_unit: str                   # where the whole network's strategies start
    seeds: int
    # The strategies planned after another has run: their candidates' names until then.
    unplanned: dict[str, list[str]]
    rungs: list[halving.Rung]
    eta: int
    # A strategy in rounds (SubTuning): its (runs, run-epochs) as planned, every round allowed
    # run (`planned` holds the rounds known so far).
    estimates: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def lowest_unit(self, group: Group) -> str:
        """The lowest unit `group` trains (the head's unit when it trains no backbone layer)."""
        if not group.layers:
            return self.units[-1]
        return min((self.layer_unit[name] for name in group.layers), key=self.units.index)

    def covers(self, engines: list[str]) -> bool:
        """Whether `engines` (units) can train every shared candidate: one lies at or below
        the deepest candidate's lowest unit."""
        lowest = [self.units.index(self.lowest_unit(g)) for g in self.shared]
        return all(e in self.units for e in engines) and (
            not lowest or min(self.units.index(e) for e in engines) <= min(lowest))

    def engine_of(self, group: Group) -> str:
        """The unit of the engine that trains `group`: the first unit for the strategies that
        train the whole network, else the shallowest engine at or below the group's lowest
        unit."""
        if group.strategy in strategies.WHOLE_NETWORK:
            return self.first_unit
        lowest = self.units.index(self.lowest_unit(group))
        return max((e for e in self.engines if self.units.index(e) <= lowest),
                   key=self.units.index)

    def anchored(self, unit: str) -> bool:
        """Whether the engine from `unit` trains a strategy that penalises (L2-SP): its step
        then carries the starting weights and each run's penalty (train.Engine.anchored)."""
        return any(self.engine_of(g) == unit for s in self.strategies
                   if strategies.REGISTRY[s].penalises for g in self.planned.get(s, []))

    @property
    def shared(self) -> list[Group]:
        """The candidates of the shared engines (all but the whole network's; topk's once
        known)."""
        return [g for s, gs in self.planned.items() if s not in strategies.WHOLE_NETWORK
                for g in gs]

    def names(self, strategy: str) -> list[str]:
        """Its candidates' names: planned, or (for a strategy planned after another) as they
        are expected to be."""
        if strategy in self.planned:
            return [g.candidate for g in self.planned[strategy]]
        return self.unplanned[strategy]

    def pools(self, strategy: str) -> dict[str, list[Group]]:
        """What successive halving ranks together: all of a searched strategy's candidates
        (layers, setting); a baseline's settings, candidate by candidate (a baseline candidate
        is never pruned: its settings compete, and its best trains every seed to the end)."""
        members = self.planned.get(strategy, [])
        if strategy not in strategies.BASELINES:
            return {strategy: members}
        pools: dict[str, list[Group]] = {}
        for g in members:
            pools.setdefault(settings.base(g.candidate), []).append(g)
        return pools

    def pool_sizes(self, strategy: str) -> list[int]:
        if strategy not in self.planned:
            return [len(self.unplanned[strategy])]
        return [len(m) for m in self.pools(strategy).values()]

    def candidate_count(self, strategy: str) -> int:
        return sum(self.pool_sizes(strategy))

    def stopping_rungs(self, pool_size: int) -> list[int]:
        """The rungs where a pool of `pool_size` candidates stops, as planned (a pool of one
        only at the last)."""
        return halving.stopping_rungs(pool_size, self.rungs, self.eta)

    def expected(self, strategy: str) -> tuple[int, int]:
        """(runs recorded, epochs trained over all runs) of `strategy`, as planned (a rung that
        finds no evidence to prune trains more; a strategy in rounds that stops early less)."""
        if strategy in self.estimates:
            return self.estimates[strategy]
        counts = [halving.expected(n, self.rungs, self.eta) for n in self.pool_sizes(strategy)]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    @property
    def runs(self) -> int:
        """The runs (rows of results.jsonl) the schedule will record."""
        return sum(self.expected(s)[0] for s in self.strategies)

    @property
    def run_epochs(self) -> int:
        """The epochs the schedule will train, over every run."""
        return sum(self.expected(s)[1] for s in self.strategies)

    @property
    def from_units(self) -> set[str]:
        """The distinct lowest trainable units: one train-step compilation each."""
        whole = any(s in strategies.WHOLE_NETWORK for s in self.strategies)
        return set(self.engines) | ({self.first_unit} if whole else set())


def make_plan(config, table, module, *, speed=None, images: tuple[int, int] | None = None,
              train_images: int | None = None) -> Plan:
    """The plan of `config`'s search. With the machine's `speed` (costs.measure) and the
    (train, validation) image counts, the candidates but the whole network's go to at most
    `search.engines` engines by depth (costs.split); without, to one engine. The rungs are
    sized in optimizer steps from `train_images` (default: `images`' or the dataset's size
    when known without loading it; unknown, no rung is dropped)."""
    s = config.search
    names = [x for x in strategies.SEARCH_ORDER if x in s.strategies]
    # A strategy that needs another's ranking is planned once that has run (`Plan.planned`).
    planned = {x: candidates(config, table, x) for x in names
               if not strategies.REGISTRY[x].after}
    units = list(module.unit_names())
    layer_unit = {r.name: r.unit for r in groups.backbone_layers(table)}
    if train_images is None:
        known = images or dataset_sizes(config)
        train_images = known[0] if known else None
    steps_per_epoch = None if train_images is None else -(-train_images // config.data.batch_size)
    rungs = halving.rungs(s.schedule, config.train.epochs, config.train.seeds, s.eta,
                           s.halving_seeds, min_steps=s.min_rung_steps,
                           steps_per_epoch=steps_per_epoch)
    unplanned = {x: settings.expected_names(strategies.REGISTRY[x].names_before(config),
                                            settings.of_config(config))
                 for x in names if x not in planned}
    plan = Plan(names, planned, units, layer_unit, [], units[0], config.train.seeds,
                unplanned, rungs, s.eta)
    for x in names:
        if strategies.REGISTRY[x].rounds:
            plan.estimates[x] = subtuning.expected(round_sizes(config, table, x), round_rung(
                config, rungs), rungs[-1])
    # topk's layers come from layerwise's, so layerwise's reach bounds theirs.
    shared = plan.shared
    lowest = sorted({plan.lowest_unit(g) for g in shared}, key=units.index)
    if not lowest:
        return plan
    if speed is None or images is None or s.engines == 1 or len(lowest) == 1:
        plan.engines = [lowest[0]]
        return plan
    suffix = costs.suffix_flops(table, models.variable_shapes(module, (
        config.model.input_size, config.model.input_size, 3)), units)
    work: dict[str, float] = {}
    for strategy in names:
        if strategy in strategies.WHOLE_NETWORK:
            continue
        members = planned.get(strategy, [])
        count = plan.candidate_count(strategy)
        run_epochs = plan.expected(strategy)[1] / max(count, 1)
        for g in members or []:
            work[plan.lowest_unit(g)] = work.get(plan.lowest_unit(g), 0.0) + run_epochs * (
                3 * images[0] + images[1])
    plan.engines = costs.split(work, suffix, units, s.engines, speed)
    return plan


def round_rung(config, rungs) -> halving.Rung:
    """The budget of each round of a strategy in rounds."""
    return subtuning.round_rung(rungs, config.train.epochs, config.search.eta,
                                config.search.halving_seeds)


def round_sizes(config, table, strategy: str) -> list[int]:
    """The candidates of each round of a strategy in rounds, as planned (every round allowed
    run, subtuning.planned_choices)."""
    return [len(candidates(config, table, strategy, chosen))
            for chosen in subtuning.planned_choices(config, table)]


def engine_work(plan: Plan) -> dict:
    """Per engine: the (candidate, seed) keys it trains (topk's by name, before its layers are
    known: the deepest engine's), the runs of its first rung (what bounds its cohort size), its
    expected run-epochs, and Auto-RGN's measurement, (runs, epochs, batches an epoch) for each
    of its candidates (baselines train every seed to the end)."""
    work: dict[str, dict] = {}
    for strategy in plan.strategies:
        count = plan.candidate_count(strategy)
        members = ([(g.candidate, g) for g in plan.planned[strategy]]
                   if strategy in plan.planned else [(n, None) for n in plan.names(strategy)])
        run_epochs = plan.expected(strategy)[1] / max(count, 1)
        pool_of = {}
        for members_of_pool in plan.pools(strategy).values():
            pool_of.update({g.candidate: len(members_of_pool) for g in members_of_pool})
        for name, group in members:
            first = plan.rungs[plan.stopping_rungs(pool_of.get(name, count))[0]]
            unit = plan.engines[-1] if group is None else plan.engine_of(group)
            if unit not in work:
                work[unit] = {"keys": [], "runs": 0, "run_epochs": 0.0, "measurements": [],
                              "anchored": plan.anchored(unit)}
            entry = work[unit]
            entry["keys"] += [(name, seed) for seed in range(plan.seeds)]
            entry["runs"] += len(first.seeds)
            entry["run_epochs"] += run_epochs
            if strategies.REGISTRY[strategy].measures:
                entry["measurements"].append(
                    (plan.seeds, plan.rungs[-1].epochs, int(group.option)))
    return work


def caches_prefix(config, unit: str, units) -> bool:
    """Whether an engine from `unit` trains on its frozen prefix's cached output: something
    lies frozen below it (not the first of `units`), train.prefix_cache is on, and no
    augmentation changes the images from epoch to epoch."""
    d = config.data
    return bool(config.train.prefix_cache and not (d.augment_flip or d.augment_crop)
                and unit != units[0])


def engine(config, module, tx, table, unit: str, devices, runs_axis: int, anchored,
           prefix_chunk_bytes: int | None) -> train.Engine:
    """The engine from `unit` as the search wires it, on `devices` laid out with `runs_axis`
    runs: its frozen prefix cached (`caches_prefix`), else the images augmented as the config
    says. One place for the search and `--target`, so the two compile the same program."""
    cached = caches_prefix(config, unit, module.unit_names())
    augment = {"flip": config.data.augment_flip, "crop": config.data.augment_crop}
    return train.Engine(module, tx, unit, train.mesh(devices, runs=runs_axis), cached=cached,
                        augment=None if cached else augment, table=table,
                        prefix_chunk_bytes=prefix_chunk_bytes, anchored=anchored)


def at_once(config, runs: int) -> int:
    """How many of an engine's `runs` may train at once: all, or `search.parallel`'s cap."""
    parallel = config.search.parallel
    return min(runs, parallel) if parallel >= 1 else runs


def prefix_bytes_per_image(table, unit: str | None) -> int | None:
    """Bytes of the prefix cache per image for an engine from `unit` (float32 output of the
    unit below), or None when nothing is cached (the first unit)."""
    units = list(dict.fromkeys(r.unit for r in table))
    if unit is None or units.index(unit) == 0:
        return None
    below = units[units.index(unit) - 1]
    last = [r for r in table if r.unit == below][-1]
    return math.prod(last.output_shape[1:]) * 4


def describe(config, plan: Plan, table, estimate: str | None = None) -> str:
    """The plan in words, for --dry_run (`estimate`: the estimated time, when known)."""
    c = config
    lines = [f"Plan: {c.model.name} (width {c.model.width}, {c.model.input_size} px, weights "
             f"{c.model.weights}) on {c.data.name}; {c.train.epochs} epochs x {c.train.seeds} "
             f"seed(s) per candidate, batch {c.data.batch_size}.",
             f"Strategies, in the order they run: {', '.join(plan.strategies)}.",
             describe_settings(config)]
    for strategy in plan.strategies:
        if strategy not in plan.planned:
            lines.append(f"  {strategy}: {strategies.REGISTRY[strategy].preview(config)}")
            continue
        members = plan.planned[strategy]
        if strategies.REGISTRY[strategy].rounds:
            lines.append(f"  {strategy}: {strategies.REGISTRY[strategy].preview(config)}; "
                         f"{plan.expected(strategy)[0]} runs if every round is run; round 1's "
                         f"{len(members)} candidate(s):")
        else:
            lines.append(f"  {strategy}: {len(members)} candidate(s)")
        shown = members if len(members) <= 12 else members[:6] + [None] + members[-3:]
        for g in shown:
            if g is None:
                lines.append(f"    ... {len(members) - 9} more")
                continue
            layers = ", ".join(g.layers) if len(g.layers) <= 6 else \
                f"{', '.join(g.layers[:3])}, ... {g.layers[-1]} ({len(g.layers)} layers)"
            lines.append(f"    {g.candidate}: {layers or 'head only'}")
    if len(plan.rungs) == 1:
        lines.append(f"Schedule: {c.search.schedule}: every candidate trains "
                     f"{c.train.epochs} epochs x {c.train.seeds} seed(s).")
    else:
        lines.append(f"Schedule: halving: rungs of {[r.epochs for r in plan.rungs]} epochs "
                     f"({len(plan.rungs[0].seeds)} seed(s) before the last; none under "
                     f"{c.search.min_rung_steps} steps); at each, every searched strategy's best "
                     f"1/{plan.eta} (layers, setting) go on, and each baseline candidate's best "
                     f"settings"
                     + ("; a candidate is pruned only when the paired test puts it below the "
                        "rung's leader" if c.search.prune_only_on_evidence else "")
                     + "; the finalists train every seed.")
    more = len(plan.rungs) > 1 and c.search.prune_only_on_evidence
    lines.append(f"Runs: {plan.runs}, {plan.run_epochs:,} run-epochs"
                 f"{' if every rung prunes (one that finds no evidence trains more)' if more else ''}"
                 f" (the paper's exhaustive protocol: {exhaustive_runs(plan)} runs).")
    for unit in sorted(plan.from_units, key=plan.units.index, reverse=True):
        users = [s for s in plan.strategies if any(
            plan.engine_of(g) == unit for g in plan.planned.get(s, []))] or [
            s for s in plan.strategies if s not in plan.planned]  # planned later (top-k)
        per_image = (prefix_bytes_per_image(table, unit)
                     if caches_prefix(c, unit, plan.units) else None)
        cache = (f"prefix cache {per_image:,} bytes per image" if per_image else
                 "no prefix cache (nothing frozen below it, or augmentation/prefix_cache off)")
        lines.append(f"Engine from unit {unit} ({', '.join(users)}): {cache}.")
    lines.append(f"Train-step compilations: {len(plan.from_units)}.")
    if estimate:
        lines.append(estimate)
    return "\n".join(lines)


def describe_settings(config) -> str:
    """The settings line of the dry run."""
    t, s = config.train, config.search
    head = (f"the head at {t.head_learning_rate:g}" if t.head_learning_rate is not None
            else "the head at the same rate")
    return (f"Settings, searched with the layers where they can change training: BatchNorm "
            f"{' / '.join(s.bn_policies)}; backbone learning rate {t.learning_rate:g} x "
            f"{' / '.join(f'{f:g}' for f in s.lr_factors)}; {head}.")


def exhaustive_runs(plan: Plan) -> int:
    """The runs of the paper's protocol (a strategy in rounds: its rounds, as planned)."""
    return sum(plan.expected(s)[0] if s in plan.estimates
               else plan.candidate_count(s) * plan.seeds for s in plan.strategies)


# Images in TFDS datasets the configs name, for estimates before the download
# (https://www.tensorflow.org/datasets/catalog): (images, classes).
TFDS_SIZES = {"tf_flowers": (3670, 5)}


def dataset_sizes(config) -> tuple[int, int, int, int] | None:
    """(train, validation, test, classes) of the search's splits, approximately (per-class
    rounding aside), when they are known without loading the dataset: an image folder's files,
    the bundled digits, a TFDS dataset of TFDS_SIZES carved by data.splits; else None."""
    d = config.data
    if d.name == "image_folder":
        per_class = [len(files) for _, files in data.image_folder_classes(d.path)]
    elif d.name == "digits":
        _, targets = data.digits_arrays()
        per_class = [int((targets == c).sum()) for c in (d.classes or range(10))]
    elif d.name in TFDS_SIZES and d.tfds_splits is None:
        images, classes = TFDS_SIZES[d.name]
        per_class = [images / classes] * classes
    else:
        return None
    train_share, validation_share, _ = d.splits
    train = sum(min(round(n * train_share), d.train_per_class or n) for n in per_class)
    validation = sum(round(n * validation_share) for n in per_class)
    test = int(sum(per_class)) - sum(round(n * train_share) for n in per_class) - validation
    return int(train), int(validation), int(test), len(per_class)


def approximate_images(config) -> tuple[int, int] | None:
    """(train, validation) images for the dry run's estimate, when the dataset is local (an
    image folder, the digits: nothing to download); None for a TFDS dataset."""
    sizes = dataset_sizes(config) if config.data.name in ("image_folder", "digits") else None
    return None if sizes is None else sizes[:2]
