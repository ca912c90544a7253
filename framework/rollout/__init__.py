"""Rollout engines (registered in ``framework.registry.ROLLOUT_ENGINES``) and the rollout
collector. Importing an engine module registers it; the vLLM engine imports vllm lazily, so
it registers without vllm installed (``check_available`` says how to install it)."""

from framework.rollout import hf, vllm_engine  # noqa: F401  register "hf" and "vllm"
