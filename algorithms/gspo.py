"""GSPO: Group Sequence Policy Optimization (Zheng et al., Qwen team, arXiv 2507.18071).

GRPO's group advantages with the importance ratio and the clip moved from tokens to sequences
(section 4, "Group Sequence Policy Optimization"):

    s_i(theta) = (pi_theta(o_i|q) / pi_old(o_i|q))^(1/|o_i|)
               = exp((1/|o_i|) sum_t log(pi_theta(o_it|q,o_i<t) / pi_old(o_it|q,o_i<t)))
    J(theta)   = (1/G) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
    A_i        = (r_i - mean_g(r)) / std_g(r)

The length normalisation 1/|o_i| keeps s_i on one scale for short and long answers; a
sequence outside the clip range contributes no gradient at all (every token of it). The
paper's clip range is small (eps_low 3e-4, eps_high 4e-4, section 5.1) because s_i is a
geometric mean. GSPO-token (section 4.3, ``variant=token``):

    s_it(theta) = sg[s_i(theta)] * pi_theta(o_it|.) / sg[pi_theta(o_it|.)]

clipped per token, for per-token advantages; with one advantage per sequence (as here) its
value, clipping and gradient are GSPO's.

Aggregation: ``loss_agg=seq_mean_token_mean`` (default) makes the loss -(1/B) sum_i J_i (each
token carries J_i; the mean over its |o_i| tokens is J_i); micro-batches hold whole rows, so
s_i is exact in each and the global ``norm.num_sequences`` gives the mini-batch mean. Only
off-policy steps (``trainer.num_mini_batches > 1`` or ``ppo_epochs > 1``; the paper splits each
rollout into 4 mini-batches) differ from GRPO: on-policy s_i = 1.
"""

from dataclasses import dataclass, field

from framework.registry import ALGORITHMS
from framework.types import TrainBatch

from .base import KLConfig, check_choice
from .grpo import GRPO, AlgorithmConfig
from .losses import gspo_surrogate

GSPO_VARIANTS = ("sequence", "token")


@dataclass
class GSPOConfig(AlgorithmConfig):
    """GSPO's defaults (configs/algorithm/gspo.yaml states the same, with sources)."""

    name: str = "gspo"
    variant: str = "sequence"  # sequence (GSPO) | token (GSPO-token)
    clip_low: float = 3e-4
    clip_high: float = 4e-4
    kl: KLConfig = field(default_factory=lambda: KLConfig(coef=0.0))

    def validate(self) -> None:
        super().validate()
        check_choice("variant", self.variant, GSPO_VARIANTS)


@ALGORITHMS.register("gspo")
class GSPO(GRPO):
    Config = GSPOConfig

    def policy_objective(self, logp, logp_old, mb: TrainBatch):
        """J_i broadcast to the tokens of sequence i, the clip flags of its sequence."""
        return gspo_surrogate(
            logp,
            logp_old,
            mb.advantages,
            mb.completion_mask,
            self.cfg.clip_low,
            self.cfg.clip_high,
            token_level=self.cfg.variant == "token",
        )
