"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, section 3.1).

PPO/GRPO's clip zeroes the gradient of a token whose ratio leaves the trust region, and the
tokens it drops are often the rare "fork" tokens (However, Wait, ...). CISPO clips the
importance-sampling weight instead, stops its gradient, and keeps every token's REINFORCE term:

    r_it = pi_theta(o_it|q,o_i<t) / pi_old(o_it|q,o_i<t)
    w_it = clip(r_it, 1 - eps_low^IS, 1 + eps_high^IS)
    J(theta) = (1 / sum_i |o_i|) sum_i sum_t sg(w_it) A_it log pi_theta(o_it|q,o_i<t)

with GRPO's group advantage A_it = A_i and token-level aggregation (``loss_agg=token_mean``:
1 / sum_i |o_i| over the whole mini-batch, ``norm.num_tokens``). The paper puts no lower bound
on the weight (eps_low^IS large: ``clip_low=1``, weight >= 0) and tunes only eps_high^IS, whose
value it does not state; 5.0 is ScaleRL's (arXiv 2510.13786), as TRL's ScaleRL recipe sets it.
No KL term. ``clip_ratio`` reports the tokens whose weight was capped (they keep a gradient).
"""

from dataclasses import dataclass, field

from framework.registry import ALGORITHMS
from framework.types import TrainBatch

from .base import KLConfig
from .grpo import GRPO, AlgorithmConfig
from .losses import cispo_surrogate


@dataclass
class CISPOConfig(AlgorithmConfig):
    """CISPO's defaults (configs/algorithm/cispo.yaml states the same, with sources);
    ``clip_low`` / ``clip_high`` are eps_low^IS / eps_high^IS of the weight."""

    name: str = "cispo"
    loss_agg: str = "token_mean"
    clip_low: float = 1.0
    clip_high: float = 5.0
    kl: KLConfig = field(default_factory=lambda: KLConfig(coef=0.0))


@ALGORITHMS.register("cispo")
class CISPO(GRPO):
    Config = CISPOConfig

    def policy_objective(self, logp, logp_old, mb: TrainBatch):
        """sg(w_it) A_i log pi_it per token, and the tokens whose weight was capped."""
        return cispo_surrogate(logp, logp_old, mb.advantages, self.cfg.clip_low, self.cfg.clip_high)
