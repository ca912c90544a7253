"""Command-line entry point: ``python -m framework.run algorithm=apo model=qwen2_5_vl_3b``.

Any config value can be overridden (``trainer.max_steps=100``); ``-m`` sweeps
(``-m algorithm=grpo,grpo_d,apo seed=0,1,2``); ``--cfg job`` prints the composed config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

# Errors that are the user's to fix: print the message, not a stack trace.
USER_ERRORS = ("ConfigError", "UnknownNameError", "ModelNotFoundError", "DataError", "NonFiniteError", "ImportError")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from framework.train import train

    try:
        result = train(cfg)
    except Exception as e:  # noqa: BLE001
        if (type(e).__name__ in USER_ERRORS or isinstance(e, (ValueError, FileNotFoundError))) and not os.environ.get(
            "APO_RL_DEBUG"
        ):
            print(f"error: {e}", file=sys.stderr)
            print("(set APO_RL_DEBUG=1 for the full traceback)", file=sys.stderr)
            sys.exit(2)
        raise
    acc = result.metric("eval/accuracy")
    return acc[-1] if acc else None


if __name__ == "__main__":
    main()
