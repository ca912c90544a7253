"""The interface the trainer calls: :class:`Algorithm`, its :class:`AlgorithmConfig`, and
:func:`build_algorithm`.

The trainer never branches on the algorithm's name. Per rollout batch it calls
``algo.keep_groups`` (optional dynamic sampling), then ``prepared = algo.prepare(rollout,
step)`` (a :class:`framework.types.Prepared`: shaped rewards, advantages, per-sample KL weights,
the loss mask, metrics; the rollout is not changed), takes the log-probs the loss needs, and
for each of ``algo.ppo_epochs`` epochs and each micro-batch ``mb = batch.select(idx)`` of the
:class:`framework.types.TrainBatch` it assembled::

    loss, metrics = algo.loss(logp, mb, norm)   # norm: global LossNormalizer of the mini-batch
    loss.backward()

``loss`` and every entry of ``metrics`` are normalised by the global denominators of the
mini-batch, so summing them over micro-batches (and ranks) gives the mini-batch value.

Subclasses change behaviour through hooks, called by ``prepare`` in this order:
``shape_rewards -> compute_advantages -> shape_advantages -> sample_kl_coef -> loss_mask``.
``shape_rewards`` returns the new rewards; the later hooks see a copy of the rollout that holds
them.

The step clock of the schedules: ``step`` (given to ``prepare``) counts optimizer steps, as the
learning-rate schedule does, derived from the RL step: the RL step ``k`` makes optimizer steps
``k * u .. k * u + u - 1``, ``u = ppo_epochs * trainer.num_mini_batches`` (the updates per step,
fixed when the run is built), over ``total_steps = trainer.max_steps * u``. beta is taken once per
RL step, at its first optimizer step (beta_i is part of what ``prepare`` returns), the learning
rate at every optimizer step; with one update per RL step both count RL steps.

Two components every algorithm takes from its config (algorithms/components.py):
``shape_advantages`` applies STCR when ``stcr.enabled``; ``sample_kl_coef`` gives the per-sample
KL weight beta_i = schedule(step) * shaping_i, the schedule ``kl.schedule`` and the shaping
``kl.sample_weight`` (none | dads | dads_exp). An override of either hook should call ``super()``
to keep them.

Every algorithm yaml starts with a Hydra defaults list, ``defaults: [base, _self_]`` (``base``:
:func:`base_config`, GRPO's options as :class:`AlgorithmConfig` defines them, registered as
``algorithm/base``) or another algorithm yaml (``defaults: [grpo_d, _self_]``), and states only
what differs from it; :func:`build_algorithm` resolves that list the way Hydra does when it is
given the raw yaml.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from framework.errors import ConfigError
from framework.registry import ALGORITHMS
from framework.types import LossNormalizer, Prepared, Rollout, TrainBatch

from .advantages import ADVANTAGE_SCALES, zero_std_groups
from .components import SAMPLE_KL_WEIGHTS, apply_stcr, completion_lengths, sample_kl_coef
from .kl import KL_ESTIMATORS, kl_estimator
from .losses import LOSS_AGGREGATIONS, aggregate, clipped_surrogate, token_sum_mean
from .schedules import SCHEDULES, make_schedule


# ----------------------------------------------------------------------------- config
@dataclass
class AdvantageConfig:
    scale: str = "group"  # group | batch | none (Dr. GRPO)
    eps: float = 1e-4  # A = (r - mean) / (std + eps)


@dataclass
class KLScheduleConfig:
    """beta over optimizer steps (the schedule clock, see the module docstring). ``constant``: beta = kl.coef. ``linear``/``cosine``: start ->
    end (None = kl.coef). ``grpo_d``: beta_min, beta_max, explore_frac (kl.coef unused)."""

    name: str = "constant"  # constant | linear | cosine | grpo_d (see schedules.SCHEDULES)
    start: Optional[float] = None
    end: Optional[float] = None
    beta_min: float = 0.0
    beta_max: float = 0.02
    explore_frac: float = 0.3


@dataclass
class KLConfig:
    """beta_i = schedule(step) * shaping_i: ``schedule`` over optimizer steps, ``sample_weight``
    per sample (components.SAMPLE_KL_WEIGHTS)."""

    estimator: str = "k3"  # k1 | k2 | k3, x = logp_ref - logp
    coef: float = 0.04  # beta (DeepSeekMath); value of the constant schedule
    schedule: KLScheduleConfig = field(default_factory=KLScheduleConfig)
    # per-sample shaping: none | dads (View-R1: beta f(d) on positives) | dads_exp (f = exp(-e d))
    sample_weight: str = "none"


STCR_LENGTH_UNITS = ("tokens", "chars")
# with stcr.length_unit=chars the rollout must carry the completion texts (list[str], N)


@dataclass
class STCRConfig:
    """STCR (View-R1) on the advantages of wrong answers longer than the correct ones; off
    unless an algorithm (APO) or its config switches it on."""

    enabled: bool = False
    lam: float = 1.00001
    only_negative_advantage: bool = True  # False reproduces the release exactly
    length_unit: str = "tokens"  # tokens (mask sum, incl. EOS) | chars


@dataclass
class FilterGroupsConfig:
    enabled: bool = False  # DAPO dynamic sampling: drop zero-std groups, resample
    max_extra_rounds: int = 3  # extra rollout rounds the trainer may spend to refill


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss_agg: str = "seq_mean_token_mean"  # | token_mean | seq_mean_token_sum_norm
    kl_agg: Optional[str] = None  # aggregation of the KL term; None = loss_agg
    kl: KLConfig = field(default_factory=KLConfig)
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO clip-higher: 0.28
    ppo_epochs: int = 1  # mu: updates per rollout batch
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)
    # completions that hit max_new_tokens without EOS get loss mask 0 (Algorithm.loss_mask, the
    # last hook of prepare(): STCR still sees their lengths)
    mask_truncated_completions: bool = False
    stcr: STCRConfig = field(default_factory=STCRConfig)
    # the Hydra defaults list of the algorithm yaml this came from (e.g. [grpo, _self_]); Hydra
    # consumes it when composing, build_algorithm resolves it when given the raw yaml
    defaults: Optional[list[str]] = None

    def validate(self) -> None:
        """Raise ValueError naming the key and its allowed values."""
        if not self.name:
            invalid_value("name", self.name, "a registered algorithm name")
        check_choice("advantage.scale", self.advantage.scale, ADVANTAGE_SCALES)
        check_nonneg("advantage.eps", self.advantage.eps)
        check_choice("loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        if self.kl_agg is not None:
            check_choice("kl_agg", self.kl_agg, LOSS_AGGREGATIONS)
        check_choice("kl.estimator", self.kl.estimator, KL_ESTIMATORS)
        check_nonneg("kl.coef", self.kl.coef)
        s = self.kl.schedule
        check_choice("kl.schedule.name", s.name, tuple(SCHEDULES))
        for k in ("start", "end"):
            if getattr(s, k) is not None:
                check_nonneg(f"kl.schedule.{k}", getattr(s, k))
        check_nonneg("kl.schedule.beta_min", s.beta_min)
        check_nonneg("kl.schedule.beta_max", s.beta_max)
        if not 0.0 <= s.explore_frac <= 1.0:
            invalid_value("kl.schedule.explore_frac", s.explore_frac, "a number in [0, 1]")
        if not 0.0 <= self.clip_low <= 1.0:
            invalid_value("clip_low", self.clip_low, "a number in [0, 1]")
        check_nonneg("clip_high", self.clip_high)
        if self.ppo_epochs < 1:
            invalid_value("ppo_epochs", self.ppo_epochs, "an integer >= 1")
        check_nonneg("filter_groups.max_extra_rounds", self.filter_groups.max_extra_rounds)
        check_choice("kl.sample_weight", self.kl.sample_weight, tuple(SAMPLE_KL_WEIGHTS))
        check_choice("stcr.length_unit", self.stcr.length_unit, STCR_LENGTH_UNITS)
        if self.stcr.lam < 1.0:
            invalid_value("stcr.lam", self.stcr.lam, "a number >= 1")


def invalid_value(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid value algorithm.{key}={value!r}; allowed: {allowed}")


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        invalid_value(key, value, ", ".join(map(str, allowed)))


def check_nonneg(key: str, value: float) -> None:
    if value < 0:
        invalid_value(key, value, "a number >= 0")


# ----------------------------------------------------------------------------- interface
class Algorithm:
    """Policy-gradient algorithm of the GRPO family: advantages, KL weights and the loss.

    Subclasses override hooks (``shape_rewards``, ``compute_advantages``,
    ``shape_advantages``, ``sample_kl_coef``, ``loss_mask``, ``policy_objective``) and set
    ``Config``. ``total_steps``: the optimizer steps of the whole run (the schedule clock's end).
    """

    Config = AlgorithmConfig

    def __init__(self, cfg: AlgorithmConfig, total_steps: int):
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self._beta = make_schedule(cfg.kl.schedule, coef=cfg.kl.coef)

    # -- properties the trainer reads
    @property
    def needs_reference(self) -> bool:
        """The reference model is needed when beta can be > 0 at any step (GRPO-D keeps it
        even while its schedule sits at 0)."""
        return self._beta.peak > 0  # type: ignore[attr-defined]

    @property
    def needs_old_logprobs(self) -> bool:
        """logp_old is needed when the batch is reused (ppo_epochs > 1); otherwise
        rho = exp(logp - logp.detach()) = 1."""
        return self.ppo_epochs > 1

    @property
    def ppo_epochs(self) -> int:
        return int(self.cfg.ppo_epochs)

    @property
    def filter_groups(self) -> FilterGroupsConfig:
        return self.cfg.filter_groups

    def beta(self, step: int) -> float:
        """Scheduled KL coefficient at optimizer step ``step`` of ``total_steps``."""
        return float(self._beta(step, self.total_steps))

    @property
    def sample_weight(self) -> str:
        """Name of the per-sample KL shaping (components.SAMPLE_KL_WEIGHTS): ``kl.sample_weight``."""
        return self.cfg.kl.sample_weight

    def completion_lengths(self, rollout: Rollout) -> torch.Tensor:
        """|o_i| [N] in ``stcr.length_unit``."""
        return completion_lengths(rollout, self.cfg.stcr.length_unit)

    # -- hooks
    def shape_rewards(self, rollout: Rollout) -> torch.Tensor:
        """The rewards [N] the advantages are computed from (reward shaping), a new tensor;
        ``rollout`` is left as it is. Default: ``rollout.rewards`` unchanged."""
        return rollout.rewards

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        """Advantages [N] from ``rollout.rewards``."""
        raise NotImplementedError

    def shape_advantages(self, rollout: Rollout, advantages: torch.Tensor, metrics: dict) -> torch.Tensor:
        """Reweight advantages [N]: STCR when ``stcr.enabled`` (A_i <- w_i A_i), else identity."""
        if not self.cfg.stcr.enabled:
            return advantages
        return apply_stcr(self.cfg.stcr, rollout, advantages, metrics, lengths=self.completion_lengths(rollout))

    def sample_kl_coef(self, rollout: Rollout, advantages: torch.Tensor, beta: float, metrics: dict) -> torch.Tensor:
        """Per-sample KL weight beta_i = beta * f_i [N], f the shaping named by
        :attr:`sample_weight` (none: beta everywhere; dads: DADS on the positives)."""
        return sample_kl_coef(self.sample_weight, rollout, advantages, beta, metrics)

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """The tokens that count in the loss [N, T] float: the completion mask, with completions
        that hit max_new_tokens without EOS zeroed when ``mask_truncated_completions``."""
        if not self.cfg.mask_truncated_completions:
            return rollout.completion_mask
        return rollout.completion_mask * (~rollout.truncated).float().unsqueeze(1)

    def policy_objective(self, logp: torch.Tensor, logp_old: torch.Tensor, mb: TrainBatch):
        """Per-token surrogate to maximise: (s [n,T], clipped_low, clipped_high)."""
        return clipped_surrogate(logp, logp_old, mb.advantages, self.cfg.clip_low, self.cfg.clip_high)

    # -- entry points
    def prepare(self, rollout: Rollout, step: int) -> Prepared:
        """What the loss needs from this algorithm for ``rollout`` (a :class:`Prepared`: shaped
        rewards, advantages [N], beta_i [N], the loss mask [N, T], metrics), at optimizer step
        ``step`` of the schedule clock. ``rollout`` is not changed."""
        metrics: dict[str, float] = {}
        rewards = self.shape_rewards(rollout)
        if not isinstance(rewards, torch.Tensor):
            raise ConfigError(
                f"algorithm {type(self).__name__}: shape_rewards returned {type(rewards).__name__}; it returns "
                "the shaped rewards [N] (a new tensor) instead of setting rollout.rewards"
            )
        # the later hooks see the shaped rewards in a copy of the rollout (a new value, not a rewrite)
        rollout = dataclasses.replace(rollout, rewards=rewards)
        zero = zero_std_groups(rollout.rewards, rollout.group_ids)
        metrics["frac_reward_zero_std"] = zero.float().mean().item() if zero.numel() else 0.0
        adv = self.compute_advantages(rollout)
        adv = self.shape_advantages(rollout, adv, metrics)
        beta = self.beta(step)
        kl_coef = self.sample_kl_coef(rollout, adv, beta, metrics)
        a = adv.double()
        metrics["advantages/mean"] = a.mean().item() if a.numel() else 0.0
        metrics["advantages/std"] = a.std().item() if a.numel() > 1 else 0.0
        metrics["beta"] = beta
        metrics["beta/effective"] = kl_coef.double().mean().item() if a.numel() else beta
        return Prepared(
            rewards=rewards, advantages=adv, kl_coef=kl_coef, loss_mask=self.loss_mask(rollout), metrics=metrics
        )

    def keep_groups(self, rollout: Rollout) -> torch.Tensor:
        """bool [num_groups] (groups in sorted group-id order): False for groups with
        zero reward std when ``filter_groups.enabled`` (DAPO dynamic sampling)."""
        zero = zero_std_groups(rollout.rewards, rollout.group_ids)
        if not self.cfg.filter_groups.enabled:
            return torch.ones_like(zero)
        return ~zero

    def loss(
        self, logp: torch.Tensor, mb: TrainBatch, norm: LossNormalizer
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of micro-batch ``mb`` (a ``TrainBatch.select`` slice):

            loss = aggregate(-s * w_tis, loss_agg) + aggregate(beta_i * k, kl_agg)

        ``w_tis``: ``mb.tis_weights`` (truncated importance sampling,
        ``algorithms.losses.truncated_is_weights``; ones without it). The KL term is there when
        :attr:`needs_reference` (decided when the algorithm is built), ``s`` is against
        ``mb.logp_old`` when ``mb.off_policy``, else against ``logp.detach()`` (rho = 1).

        logp [n, T] (requires grad) for the sampled tokens under the current policy.
        Metrics (detached 0-d tensors), each normalised with the global ``norm`` so the sum
        over micro-batches gives the mini-batch value: policy_loss, kl_loss, kl (per-token
        mean of the estimator), clip_ratio, clip_ratio/low, clip_ratio/high (token fractions).
        """
        mask = mb.completion_mask
        # on-policy (one update per rollout): rho = exp(logp - logp.detach()) = 1, gradient A
        logp_old = mb.logp_old if mb.off_policy else logp.detach()
        s, low, high = self.policy_objective(logp, logp_old, mb)
        # truncated IS correction of the sampler mismatch (rollout.tis_cap); x * 1.0 is exact without it
        s = s * mb.tis_weights.detach().to(s.dtype)
        policy_loss = aggregate(-s, mask, self.cfg.loss_agg, norm)

        if self.needs_reference:  # static: beta can be > 0 at some step of this run
            kl_coef = mb.kl_coef.detach().to(logp.dtype)
            k = kl_estimator(logp, mb.logp_ref, self.cfg.kl.estimator)
            kl_loss = aggregate(kl_coef.unsqueeze(-1) * k, mask, self.cfg.kl_agg or self.cfg.loss_agg, norm)
            kl_mean = token_sum_mean(k.detach(), mask, norm)
        else:
            kl_loss = kl_mean = logp.new_zeros(())
        loss = policy_loss + kl_loss
        m = mask.to(logp.dtype)
        c_low = token_sum_mean(low.to(logp.dtype), m, norm)
        c_high = token_sum_mean(high.to(logp.dtype), m, norm)
        metrics = {
            "policy_loss": policy_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "kl": kl_mean,
            "clip_ratio": c_low + c_high,
            "clip_ratio/low": c_low,
            "clip_ratio/high": c_high,
        }
        return loss, metrics


# ----------------------------------------------------------------------------- factory
BASE = "base"  # the name of the algorithm group's schema option (framework/config.py register_schemas)


def base_config() -> dict:
    """``algorithm/base``: every option of :class:`AlgorithmConfig` at its default (GRPO's), as
    a plain dict without ``defaults`` (Hydra's own key in a config node)."""
    out = OmegaConf.to_container(OmegaConf.structured(AlgorithmConfig))
    out.pop("defaults", None)
    return out


# the algorithm yamls (configs/algorithm/), where a ``defaults`` entry is looked up
def resolve_defaults(cfg: dict, config_dir: Path | None = None, _chain: tuple = ()) -> dict:
    """Resolve the Hydra defaults list of an algorithm yaml the way Hydra composes it: each
    entry names ``<config_dir>/<entry>.yaml`` (itself resolved) or ``base`` (:func:`base_config`),
    merged in order, with the yaml's own keys at ``_self_`` (at the end when not listed). The
    list is kept under ``defaults`` in the result. A config without ``defaults`` is returned as
    it is."""
    if config_dir is None:
        from framework.resources import config_dir as installed

        config_dir = installed() / "algorithm"
    defaults = cfg.get("defaults")
    if not defaults:
        return cfg
    if isinstance(defaults, str):
        defaults = [defaults]
    own = {k: v for k, v in cfg.items() if k != "defaults"}
    merged = OmegaConf.create({})
    entries = list(defaults) if "_self_" in defaults else [*defaults, "_self_"]
    for entry in entries:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, own)
            continue
        if not isinstance(entry, str):
            invalid_value("defaults", defaults, "a list of algorithm config names (configs/algorithm/<name>.yaml)")
        if entry == BASE:
            merged = OmegaConf.merge(merged, base_config())
            continue
        path = Path(config_dir) / f"{entry}.yaml"
        if entry in _chain:
            raise ConfigError(f"algorithm.defaults: '{entry}' includes itself ({' -> '.join([*_chain, entry])})")
        if not path.is_file():
            raise ConfigError(f"algorithm.defaults: no algorithm config '{entry}' ({path} does not exist)")
        base = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        base = resolve_defaults(base, config_dir, (*_chain, entry))
        base.pop("defaults", None)
        merged = OmegaConf.merge(merged, base)
    out = OmegaConf.to_container(merged, resolve=True)
    out["defaults"] = list(defaults)
    return out


def build_algorithm(
    cfg: Any, total_steps: int | None = None, *, rl_steps: int | None = None, num_mini_batches: int = 1
) -> Algorithm:
    """Algorithm from its config (dict, DictConfig or Config dataclass instance).

    Looks up ``ALGORITHMS.get(cfg.name)`` (UnknownNameError lists the registered names),
    merges ``cfg`` onto the class's structured ``Config`` (unknown key or wrong type ->
    ValueError naming ``algorithm.<key>``), validates and instantiates with ``total_steps``,
    the optimizer steps of the run (the schedule clock's end). Given ``rl_steps`` instead, the
    run's optimizer steps are ``rl_steps * ppo_epochs * num_mini_batches``, with the validated
    config's ``ppo_epochs``: the trainer builds the algorithm once.
    A raw yaml's ``defaults`` list is resolved first (:func:`resolve_defaults`).
    """
    if (total_steps is None) == (rl_steps is None):
        raise TypeError("build_algorithm takes total_steps or rl_steps, exactly one")
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = resolve_defaults(dict(cfg or {}))
    if not cfg.get("name"):
        raise ConfigError("algorithm.name is required; registered: " + ", ".join(ALGORITHMS.names()))
    cls = ALGORITHMS.get(cfg["name"])
    from .hooks import check_hooks

    check_hooks(cls, Algorithm)  # a plugin's hooks against the interface, before any model loads
    schema = OmegaConf.structured(cls.Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except ConfigKeyError as e:  # the same line as a mistyped key without `+` (framework/overrides.py)
        from framework.overrides import unknown_key_error

        key = e.full_key or str(e.key)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        # (``defaults`` is the yaml's Hydra defaults list, not an option: Hydra's composed node has none)
        keys = [k for k in node if parent or k != "defaults"] if isinstance(node, DictConfig) else []
        where = f"algorithm.{parent}" if parent else "algorithm"
        raise unknown_key_error(f"algorithm.{key}", keys, where) from e
    except (ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"invalid value for 'algorithm.{key}': {msg}") from e
    obj = OmegaConf.to_object(merged)
    obj.validate()
    if total_steps is None:
        total_steps = rl_steps * obj.ppo_epochs * num_mini_batches
    return cls(obj, total_steps)
