"""One source of truth for every config value.

* Every group option of every typed group (algorithm, data, model, rollout, trainer, logger,
  optim, reward) composes and passes the start-up checks, starts from its group's ``base``
  (the dataclass defaults, framework/config.py ``register_schemas``) and states only what
  differs from what it builds on: a YAML key restating its base's value fails. Experiments
  restate by design (a published recipe written out in full), but every key they state must
  be a key of the typed schema.
* The code reads no config key with a default of its own: an AST check of ``framework/``,
  ``algorithms/``, ``rewards/`` and ``benchmarks/`` (the rule: :func:`config_reads_with_default`).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import algorithms  # noqa: F401  (registers the algorithms)
from algorithms.base import AlgorithmConfig, base_config, build_algorithm
from framework.config import DEFAULT_SYSTEM_PROMPT, SECTIONS, DataConfig, base_options, validate_run_config
from framework.registry import ALGORITHMS
from framework.resources import compose_config, config_dir

ROOT = Path(__file__).resolve().parents[1]
TYPED_GROUPS = ("algorithm", "data", "model", "rollout", "trainer", "logger", "optim", "reward")
SOURCES = ("framework", "algorithms", "rewards", "benchmarks")
LOCAL_SOURCES = {"local", "geoqa", "superclevr"}  # data options that need data.path


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _compose(*overrides: str):
    return compose_config([*overrides, "output_dir=/tmp/apo-rl-config-sources"])


def _flat(d, prefix: str = "") -> dict[str, object]:
    """{"a.b.c": leaf}; an empty dict is a leaf (the whole of an empty config: nothing)."""
    if not prefix and d == {}:
        return {}
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _raw(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(config_dir() / group / f"{name}.yaml"))


def _is_global(group: str, name: str) -> bool:
    return "# @package _global_" in (config_dir() / group / f"{name}.yaml").read_text()


def _defaults(raw: dict) -> list[str]:
    entries = raw.get("defaults") or []
    return [e for e in entries if e != "_self_"]


def _inherited(group: str, name: str) -> dict:
    """What the option ``group/name`` builds on (its defaults list without itself), composed by
    hand: ``base`` is the registered schema option, any other entry another YAML of the group."""
    merged = OmegaConf.create({})
    for entry in _defaults(_raw(group, name)):
        if entry in ("base", f"/{group}/base@{group}"):
            merged = OmegaConf.merge(merged, base_options()[group])
        else:
            parent = _raw(group, entry)
            merged = OmegaConf.merge(
                merged, _inherited(group, entry), {k: v for k, v in parent.items() if k != "defaults"}
            )
    return OmegaConf.to_container(merged)


def _reaches_base(group: str, name: str, chain=()) -> bool:
    for entry in _defaults(_raw(group, name)):
        if entry in ("base", f"/{group}/base@{group}"):
            return True
        if entry not in chain and _reaches_base(group, entry, (*chain, entry)):
            return True
    return False


# ----------------------------------------------------------------------------- YAMLs
def test_every_group_of_the_run_config_is_covered():
    """A new config group (a folder of configs/ or a base option) joins TYPED_GROUPS, so the
    checks below cover it. Not run-config groups: experiment (whole recipes, checked apart),
    hydra (Hydra's own) and suite (benchmark sweeps, configs/benchmark.yaml)."""
    folders = {p.name for p in config_dir().iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert (folders - {"experiment", "hydra", "suite"}) | set(base_options()) == set(TYPED_GROUPS)


@pytest.mark.parametrize("group", TYPED_GROUPS)
def test_every_group_option_composes_and_passes_the_start_checks(group, tmp_path):
    from framework.train import check_early

    options = _options(group) or ["base"]  # optim has no YAML: its only option is the schema
    for opt in options:
        extra = [f"data.path={tmp_path}"] if group == "data" and opt in LOCAL_SOURCES else []
        early = check_early(_compose(f"{group}={opt}", *extra))
        assert early["sections"]["data"].system_prompt == DEFAULT_SYSTEM_PROMPT, (group, opt)


@pytest.mark.parametrize("group", TYPED_GROUPS)
def test_every_group_has_a_base_and_each_option_builds_on_it(group):
    from hydra.core.config_store import ConfigStore

    import framework.config  # noqa: F401  (registers the base options)

    try:
        stored = ConfigStore.instance().list(group)
    except OSError:  # the group has nothing in the ConfigStore
        stored = []
    assert "base.yaml" in stored, f"no {group}/base in Hydra's ConfigStore (framework/config.py register_schemas)"
    for opt in _options(group):
        assert _reaches_base(group, opt), (
            f"configs/{group}/{opt}.yaml does not start from base (defaults: [base, _self_])"
        )


@pytest.mark.parametrize("group", [g for g in TYPED_GROUPS if g != "optim"])
def test_no_yaml_restates_a_value_of_what_it_builds_on(group):
    """A key may be stated only to change it. A model config is a global package (its own keys
    under ``model:``, and the model's own recommendations for other groups, the documented
    exceptions: the tiny model's ``rollout.temperature``); each of those sections is compared
    with that group's base."""
    stated_twice = []
    for opt in _options(group):
        raw = _raw(group, opt)
        own = {k: v for k, v in raw.items() if k != "defaults"}
        if _is_global(group, opt):
            for section, values in own.items():
                base = _inherited(group, opt) if section == group else base_options()[section]
                known = _flat(base)
                for key, value in _flat(values).items():
                    if key in known and known[key] == value:
                        stated_twice.append(f"configs/{group}/{opt}.yaml: {section}.{key}={value!r}")
            continue
        known = _flat(_inherited(group, opt))
        for key, value in _flat(own).items():
            if key in known and known[key] == value:
                stated_twice.append(f"configs/{group}/{opt}.yaml: {group}.{key}={value!r}")
    assert not stated_twice, "restates the value it builds on (drop it): " + "; ".join(stated_twice)


def _schema_keys(group: str, cfg) -> set[str]:
    if group == "algorithm":
        cls = ALGORITHMS.get(cfg.algorithm.name)
        return set(_flat(OmegaConf.to_container(OmegaConf.structured(cls.Config))))
    return set(_flat(base_options()[group])) if group in base_options() else set()


@pytest.mark.parametrize("group", ["algorithm", "data"])
def test_every_stated_key_is_a_schema_key(group, tmp_path):
    """The algorithm and data YAMLs state keys of their typed schema only (the algorithm's own
    ``Config``; ``DataConfig``) and say where each algorithm's values come from."""
    for opt in _options(group):
        cfg = _compose(f"{group}={opt}", *([f"data.path={tmp_path}"] if opt in LOCAL_SOURCES else []))
        keys = _schema_keys(group, cfg)
        stated = set(_flat({k: v for k, v in _raw(group, opt).items() if k != "defaults"}))
        # a dict-valued option (data.splits, data.field_map, ...) holds keys of its own
        unknown = {k for k in stated if k not in keys and not any(k.startswith(f"{s}.") for s in keys)}
        assert not unknown, f"configs/{group}/{opt}.yaml: {sorted(unknown)} not in the schema"
        if group == "algorithm":
            assert "arXiv " in (config_dir() / group / f"{opt}.yaml").read_text(), f"{opt}: no source (arXiv id)"


def test_the_algorithm_base_is_grpo():
    """algorithm/base is GRPO's options (DeepSeekMath, arXiv 2402.03300) as AlgorithmConfig
    holds them; grpo.yaml states nothing more."""
    base = base_config()
    assert "defaults" not in base
    assert (base["name"], base["kl"]["coef"], base["kl"]["estimator"], base["clip_low"], base["clip_high"]) == (
        "grpo",
        0.04,
        "k3",
        0.2,
        0.2,
    )
    assert (base["loss_agg"], base["advantage"]["scale"], base["stcr"]["enabled"]) == (
        "seq_mean_token_mean",
        "group",
        False,
    )
    assert _raw("algorithm", "grpo") == {"defaults": ["base", "_self_"]}
    assert dataclasses.asdict(build_algorithm(_raw("algorithm", "grpo"), 10).cfg) == {
        **dataclasses.asdict(AlgorithmConfig()),
        "defaults": ["base", "_self_"],
    }


def test_each_algorithm_composes_as_its_raw_yaml_builds():
    """Hydra's composition (algorithm/base from the ConfigStore) and build_algorithm on the raw
    YAML (resolve_defaults) give the same algorithm."""
    for opt in _options("algorithm"):
        hydra = build_algorithm(OmegaConf.to_container(_compose(f"algorithm={opt}").algorithm), 50)
        raw = build_algorithm(_raw("algorithm", opt), 50)
        a, b = dataclasses.asdict(hydra.cfg), dataclasses.asdict(raw.cfg)
        a.pop("defaults"), b.pop("defaults")
        assert a == b and type(hydra) is type(raw), opt


def test_the_default_run_is_the_dataclass_defaults_but_the_stated_differences():
    """``apo-rl`` with no override: each typed section is its dataclass default except the
    differences its YAMLs state, written out here (configs/model/tiny_qwen2_5_vl.yaml: the tiny
    model's temperature and learning rate; configs/data/synthetic.yaml: the default task)."""
    cfg = compose_config(["output_dir=/tmp/x"])
    expected = {
        "rollout.temperature": 0.7,
        "optim.lr": 3e-4,  # = model.lr (config.yaml: optim.lr: ${model.lr})
        "data.task": "synthetic",
        "data.test_size": 200,
        "data.difficulty": [1, 2],
        "data.kinds": ["count"],
        "data.balanced_answers": True,
    }
    seen = {}
    for group in ("algorithm", "data", "model", "rollout", "trainer", "logger", "optim"):
        composed = _flat(OmegaConf.to_container(cfg[group], resolve=True))
        base = _flat(base_options()[group])
        assert set(composed) == set(base), group
        seen.update({f"{group}.{k}": v for k, v in composed.items() if v != base[k]})
    assert seen == expected
    assert cfg.model.lr == 3e-4 and SECTIONS["model"]().lr == 3e-4


def test_data_keys_are_set_without_plus():
    """data/base gives every DataConfig key to every data option: overriding one needs no ``+``."""
    cfg = _compose("data.control_tokens=escape", "data.allow_absolute_paths=true", "data.max_image_bytes=1000")
    d = validate_run_config(cfg)["data"]
    assert (d.control_tokens, d.allow_absolute_paths, d.max_image_bytes) == ("escape", True, 1000)
    d = validate_run_config(_compose("data=mathvista", "data.control_tokens=escape"))["data"]
    assert (d.task, d.control_tokens, d.max_prompt_tokens) == ("hub", "escape", 8192)
    # an algorithm that states only its differences still takes every base key without +
    a = build_algorithm(
        OmegaConf.to_container(_compose("algorithm=dapo", "algorithm.kl.schedule.start=0.5").algorithm), 10
    )
    assert (a.cfg.kl.schedule.start, a.cfg.clip_high, a.cfg.filter_groups.enabled) == (0.5, 0.28, True)


def test_the_system_prompt_is_written_once():
    text = "A conversation between User and Assistant"
    where = [
        str(p.relative_to(ROOT))
        for d in (*SOURCES, "configs")
        for p in sorted((ROOT / d).rglob("*"))
        if p.suffix in (".py", ".yaml") and text in p.read_text(encoding="utf-8")
    ]
    assert where == ["framework/config.py"], where
    assert DataConfig().system_prompt == DEFAULT_SYSTEM_PROMPT
    assert DEFAULT_SYSTEM_PROMPT.startswith(text) and DEFAULT_SYSTEM_PROMPT.endswith("</answer>.")


@pytest.mark.parametrize("name", _options("experiment"))
def test_experiment_keys_are_schema_keys(name):
    """An experiment restates a whole recipe by design; every key it states must still be a key
    of the typed schema of its section (a typo would otherwise add a key nobody reads)."""
    raw = _raw("experiment", name)
    cfg = _compose(f"experiment={name}")
    validate_run_config(cfg)
    build_algorithm(OmegaConf.to_container(cfg.algorithm, resolve=True), 10)
    for section, values in raw.items():
        if section == "defaults":
            continue
        keys = _schema_keys(section, cfg)
        if section == "reward":  # components hold the plugins' own parameters
            keys = set(_flat(OmegaConf.to_container(cfg.reward)))
        assert keys, f"configs/experiment/{name}.yaml: '{section}' is not a typed section"
        for key in _flat(values):
            assert key in keys or any(key.startswith(f"{k}.") for k in keys), f"{name}: {section}.{key}"


# ----------------------------------------------------------------------------- code
# (file, source prefix) of reads the rule flags on a dict that is not the run config although
# its name says config, each with its reason. None today.
ALLOWED: set[tuple[str, str]] = set()


def _fields(schema, out: set[str]) -> set[str]:
    for f in dataclasses.fields(schema):
        out.add(f.name)
        t = f.type
        if isinstance(t, str):  # from __future__ import annotations
            t = vars(sys.modules[schema.__module__]).get(t)
        if dataclasses.is_dataclass(t):
            _fields(t, out)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if dataclasses.is_dataclass(value):
                _fields(type(value), out)
    return out


def config_keys() -> set[str]:
    """Every key of the run config: the typed sections' fields (nested ones included), every
    registered algorithm's Config, the keys of every composed group option (the reward section
    included) and the top-level keys."""
    keys: set[str] = {"seed", "plugins", "resume", "output_dir"}
    for schema in SECTIONS.values():
        _fields(schema, keys)
    for name in ALGORITHMS.names():
        _fields(ALGORITHMS.get(name).Config, keys)
    for group in TYPED_GROUPS:
        for opt in _options(group) or ["base"]:
            extra = ["data.path=/tmp"] if opt in LOCAL_SOURCES else []
            section = OmegaConf.to_container(_compose(f"{group}={opt}", *extra)[group])
            for key in _flat(section):
                keys.update(key.split("."))
    reward = OmegaConf.to_container(compose_config([]).reward)
    keys -= set(reward.get("components", {}))  # plugin names (accuracy, format) are not option keys
    return keys


CONFIG_NAME = re.compile(r"cfg|config|section", re.IGNORECASE)


def _key(call: ast.Call, i: int):
    arg = call.args[i] if len(call.args) > i else None
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def config_reads_with_default(tree: ast.AST, keys: set[str]):
    """The rule. A read of config key ``k`` (``k`` in :func:`config_keys`) with a fallback of
    its own is flagged:

    * ``X.get("k", default)`` and ``X.get("k") or default`` where ``X``'s source names a config
      (it contains cfg, config or section: ``cfg.data``, ``data_cfg``, ``self.sections``);
    * ``getattr(X, "k", default)`` with such an ``X``;
    * ``cfg_get(X, "k", default)`` (framework/data's config reader), whatever ``X``.

    A default of ``None`` in ``X.get("k", None)`` is a default too. Reads without a default
    (``cfg.get("task")``) and plain records, JSON and metrics (``record.get("answer", "")``)
    are not flagged. Such code reads the typed section instead (``sections["data"].max_prompt_tokens``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            with_default = len(node.args) >= 2 or any(k.arg == "default" for k in node.keywords)
            if (
                isinstance(f, ast.Attribute)
                and f.attr == "get"
                and with_default
                and _key(node, 0) in keys
                and CONFIG_NAME.search(ast.unparse(f.value))
            ):
                yield node
            elif isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) >= 3 and _key(node, 1) in keys:
                if CONFIG_NAME.search(ast.unparse(node.args[0])):
                    yield node
            elif (
                isinstance(f, ast.Name)
                and f.id == "cfg_get"
                and (len(node.args) >= 3 or node.keywords)
                and _key(node, 1) in keys
            ):
                yield node
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            first = node.values[0]
            if (
                isinstance(first, ast.Call)
                and isinstance(first.func, ast.Attribute)
                and first.func.attr == "get"
                and len(first.args) == 1
                and _key(first, 0) in keys
                and CONFIG_NAME.search(ast.unparse(first.func.value))
            ):
                yield node


def test_the_rule_flags_what_it_should():
    """Hand-written cases, so the check itself is checked."""
    keys = {"max_prompt_tokens", "question_template", "plugins", "seed"}
    flagged = [
        'cfg.data.get("max_prompt_tokens", 1024)',
        'data_cfg.get("question_template", "{question}")',
        'self.data_cfg.get("question_template", default="{q}")',
        'cfg.get("plugins") or []',
        'getattr(data_cfg, "seed", 0)',
        'cfg_get(cfg, "seed", 0)',
        'cfg_get(row, "seed", 0)',
    ]
    fine = [
        'cfg.data.get("task")',  # no default
        'record.get("max_prompt_tokens", 3)',  # not a config
        'cfg.get("answer", "")',  # not a config key
        'sections["data"].max_prompt_tokens',
        'cfg_get(cfg, "seed")',
        'getattr(module, "seed", 0)',
    ]
    for src in flagged:
        assert list(config_reads_with_default(ast.parse(src), keys)), src
    for src in fine:
        assert not list(config_reads_with_default(ast.parse(src), keys)), src


def test_no_code_reads_a_config_key_with_its_own_default():
    keys = config_keys()
    assert {"max_prompt_tokens", "question_template", "system_prompt", "correctness", "temperature"} <= keys
    found = []
    for d in SOURCES:
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for node in config_reads_with_default(ast.parse(path.read_text(encoding="utf-8")), keys):
                src = ast.unparse(node)
                if any(rel == f and src.startswith(s) for f, s in ALLOWED):
                    continue
                found.append(f"{rel}:{node.lineno}: {src[:100]}")
    assert not found, "config keys read with a default of their own (read the typed section instead):\n" + "\n".join(
        found
    )
