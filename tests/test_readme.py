"""The README's commands work as written: every ``python -m framework.run`` line of its fenced
blocks composes and passes the start-up checks (CPU commands: every check that needs no
model; GPU and cluster commands: the config checks, since this machine has no GPU), and the
CPU quick start runs end to end, shortened by config."""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from framework.config import validate_run_config
from framework.train import check_early, train

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHORT = [
    "trainer.max_steps=1",
    "trainer.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=8",
    "trainer.eval_every=0",
    "trainer.eval_size=4",
    "logger.wandb=false",
    "trainer.progress_bar=false",
]


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert m, f"README has no section '{title}'"
    return m.group(1)


def _run_commands(text: str) -> list[list[str]]:
    """The overrides of each ``apo-rl`` (``python -m framework.run``) command in the fenced bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            m = re.search(r"(?:-m framework\.run|^apo-rl(?=\s|$))(.*)$", line)
            if m:
                args = [a for a in shlex.split(m.group(1)) if "=" in a]  # overrides only (not -m, --cfg job)
                out.append([a for a in args if "$" not in a and not a.startswith("hydra.")])
    return out


def _compose(args, tmp_path):
    sweep = [a for a in args if "," in a.split("=", 1)[-1] and not a.split("=", 1)[-1].startswith("[")]
    single = [a if a not in sweep else a.split("=", 1)[0] + "=" + a.split("=", 1)[1].split(",")[0] for a in args]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", *single])


def test_cpu_quick_start_commands_pass_the_start_up_checks(tmp_path):
    cmds = _run_commands(_section("Quick start on a CPU"))
    assert len(cmds) >= 4
    for args in cmds:
        check_early(_compose(args, tmp_path))


def test_gpu_and_cluster_commands_compose_and_validate(tmp_path):
    cmds = _run_commands(_section("Quick start on one GPU, and on a cluster"))
    assert len(cmds) >= 3
    for args in cmds:
        validate_run_config(_compose(args, tmp_path))


@pytest.mark.slow
def test_the_cpu_quick_start_runs_shortened(tmp_path):
    args = _run_commands(_section("Quick start on a CPU"))[0]  # python -m framework.run algorithm=apo
    res = train(_compose([*args, *SHORT], tmp_path))
    assert [r["rl_step"] for r in res.history if "reward" in r] == [1.0]
    assert (res.final_checkpoint / "COMPLETE.json").exists()
