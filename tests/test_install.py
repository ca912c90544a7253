"""apo-rl as a user installs it: the built wheel carries every config and the commands, the
commands run from any folder (a user folder named ``framework/``, ``benchmarks/`` or
``rewards/`` changes nothing), ``--help`` says where the config groups are, and a mistyped
key gets one ``error:`` line whether or not it was given with ``+``.

(.ci/run also installs the wheel into a fresh environment and runs a short training run and a
sweep's dry run from an empty folder: .ci/wheel_check.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from framework.run import entry_command

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _command(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}: reinstall apo-rl (pip install -e .)")
    return str(path)


def _run(args, cwd, env=None, timeout=300):
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def _shadow_folder(tmp_path: Path) -> Path:
    """A user's project folder with packages named like ours that would break everything if
    they were imported."""
    for pkg in ("framework", "benchmarks", "rewards", "algorithms", "tools"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("raise SystemExit('SHADOWED: the user folder was imported')\n")
        (tmp_path / pkg / "run.py").write_text("raise SystemExit('SHADOWED: the user folder was imported')\n")
    return tmp_path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("apo_rl-*.whl")
    return whl


def test_the_wheel_carries_every_config_and_the_commands(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert len(shipped) > 40
    missing = [p for p in shipped if f"framework/configs/{p}" not in names]
    assert not missing, f"configs missing from the wheel: {missing}"
    (ep,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(ep).decode()
    for line in (
        "apo-rl = framework.run:cli",
        "apo-rl-sweep = benchmarks.run:cli",
        "apo-rl-eval = benchmarks.evaluate:cli",
    ):
        assert line in text
    for pkg in (
        "framework/data/",
        "framework/models/",
        "framework/rollout/",
        "algorithms/",
        "rewards/",
        "benchmarks/",
        "tools/",
    ):
        assert any(n.startswith(pkg) and n.endswith(".py") for n in names), pkg


def test_the_unpacked_wheel_composes_from_its_own_configs(wheel, tmp_path):
    """The wheel's code, not the clone's, with the configs it carries: run from an empty folder
    with only the unpacked wheel on the path, the config folder lies inside it."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import framework.resources as r; "
        "print(r.config_dir()); print(r.compose_config(['algorithm=apo']).algorithm.name)"
    )
    r = _run([sys.executable, "-c", code, str(site)], cwd=empty)
    assert r.returncode == 0, r.stderr[-2000:]
    where, name = r.stdout.split()
    assert Path(where) == site / "framework" / "configs"
    assert name == "apo"


@pytest.mark.parametrize(
    "command, config", [("apo-rl", "config"), ("apo-rl-sweep", "benchmark"), ("apo-rl-eval", "evaluate")]
)
def test_help_says_what_it_does_and_where_the_config_groups_are(command, config, tmp_path):
    r = _run([_command(command), "--help"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{command}:")
    assert f"Primary config: {ROOT / 'configs' / (config + '.yaml')}" in r.stdout
    assert "  algorithm: apo, cispo, dapo, dr_grpo, grpo, grpo_d" in r.stdout
    assert "--config-dir" in r.stdout


def test_a_user_folder_with_our_package_names_changes_nothing(tmp_path):
    cwd = _shadow_folder(tmp_path)
    job = _run([_command("apo-rl"), "algorithm=apo", "--cfg", "job"], cwd=cwd)
    assert job.returncode == 0 and "SHADOWED" not in job.stdout + job.stderr, job.stderr[-2000:]
    assert "name: apo" in job.stdout
    # a sweep's run processes are started the same way (benchmarks.run: entry_command)
    child = _run(entry_command("framework.run", "algorithm=grpo_d", "--cfg", "job"), cwd=cwd)
    assert child.returncode == 0 and "SHADOWED" not in child.stdout + child.stderr, child.stderr[-2000:]
    assert "name: grpo_d" in child.stdout
    sweep = _run([_command("apo-rl-sweep"), "suite=smoke", "dry_run=true", f"sweep_dir={tmp_path / 'sw'}"], cwd=cwd)
    assert sweep.returncode == 0 and "SHADOWED" not in sweep.stdout + sweep.stderr, sweep.stderr[-2000:]


def test_a_users_config_folder_composes_on_top(tmp_path):
    mine = tmp_path / "my_configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /algorithm: apo\ntrainer:\n  max_steps: 7\n"
    )
    for how in (
        ["--config-dir", str(tmp_path / "my_configs")],
        [f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]"],
    ):
        r = _run([_command("apo-rl"), *how, "experiment=mine", "--cfg", "job"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "\n  name: apo\n" in r.stdout and "\n  max_steps: 7\n" in r.stdout


def test_a_plugin_module_in_the_current_folder_still_imports(tmp_path):
    """The current folder goes at the end of the path: a user's own plugin module there is found."""
    (tmp_path / "my_plugin_mod.py").write_text("print('PLUGIN IMPORTED')\n")
    r = _run(
        [_command("apo-rl"), "plugins=[my_plugin_mod]", "trainer.max_steps=0"],
        cwd=tmp_path,
    )
    assert "PLUGIN IMPORTED" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_a_typo_gets_the_same_one_line_error_with_or_without_plus(tmp_path):
    plain = _run([_command("apo-rl"), "trainer.max_step=5"], cwd=tmp_path)
    plus = _run([_command("apo-rl"), "+trainer.max_step=5"], cwd=tmp_path)
    for r in (plain, plus):
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "HYDRA_FULL_ERROR" not in r.stderr
        (line,) = _error_lines(r.stderr)
        assert line.startswith("error: unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'?")
        assert "allowed keys in trainer: max_steps, prompts_per_step," in line
    assert _error_lines(plain.stderr) == _error_lines(plus.stderr)


def test_an_algorithm_key_typo_gets_the_same_line_with_or_without_plus(tmp_path):
    """Without ``+`` Hydra refuses it while composing; with ``+`` the algorithm's own Config does."""
    plain = _run([_command("apo-rl"), "algorithm.clip_eps=0.1"], cwd=tmp_path)
    plus = _run([_command("apo-rl"), "+algorithm.clip_eps=0.1", f"output_dir={tmp_path / 'run'}"], cwd=tmp_path)
    for r in (plain, plus):
        assert r.returncode == 2, r.stderr
        (line,) = _error_lines(r.stderr)
        assert line.startswith("error: unknown key 'algorithm.clip_eps'; did you mean 'algorithm.clip_low'?"), line
    assert _error_lines(plain.stderr) == _error_lines(plus.stderr)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainr.max_steps=5", "error: unknown key 'trainr'; did you mean 'trainer'? allowed keys in the top level:"),
        ("model.lora.rank=8", "error: unknown key 'model.lora.rank'; allowed keys in model.lora: enabled, r, alpha"),
        ("algorithm=nope", "error: no config 'algorithm/nope'; options of algorithm: apo, cispo, dapo,"),
    ],
)
def test_composition_errors_are_one_line(override, expected, tmp_path):
    r = _run([_command("apo-rl"), override], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    (line,) = _error_lines(r.stderr)
    assert line.startswith(expected), line


def test_the_sweep_command_reports_typos_the_same_way(tmp_path):
    r = _run([_command("apo-rl-sweep"), "suite.step=3", "dry_run=true"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    (line,) = _error_lines(r.stderr)
    assert line.startswith("error: unknown key 'suite.step'; did you mean 'suite.steps'?"), line


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_no_code_finds_configs_through_the_source_tree():
    """Every path to a config goes through the installed package (framework/resources.py)."""
    r = subprocess.run(
        [
            "git",
            "grep",
            "-n",
            "-E",
            r"parents\[[0-9]\].*configs|\"configs\" /",
            "--",
            "framework",
            "algorithms",
            "rewards",
            "benchmarks",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.stdout == "", r.stdout


def test_every_package_of_the_repository_is_installed():
    """A new subpackage that pyproject.toml does not list would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in ROOT.rglob("__init__.py")
        if p.parent.relative_to(ROOT).parts[0] not in ("tests", "examples", "configs", "build", ".venv", ".cache")
    }
    assert found | {"framework.configs"} == listed
