"""Rollout engines (registered in ``framework.registry.ROLLOUT_ENGINES``)."""

from framework.rollout import hf  # noqa: F401  registers "hf"

try:  # the vLLM engine registers itself; its import of vllm is lazy
    from framework.rollout import vllm_engine  # noqa: F401
except ImportError:
    pass
