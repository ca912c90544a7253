"""User errors and console logging: every :class:`framework.errors.UserError` reaches the CLIs'
handler and is printed as one ``error:`` line (exit status 2, ``APO_RL_DEBUG=1`` for the
traceback); anything else keeps its traceback; the library logs through ``logging`` and the
CLIs print apo-rl's messages as plain text."""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import framework.errors as errors
from framework.errors import ConfigError, DataError, ModelNotFoundError, NonFiniteError, UnknownNameError, UserError
from framework.registry import PluginImportError, import_plugins
from framework.run import DEBUG_HINT, LOGGERS, setup_console_logging, user_errors

ROOT = Path(__file__).resolve().parents[1]
HINT = "(set APO_RL_DEBUG=1 for the full traceback)"

USER_ERRORS = [
    c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, UserError) and c is not UserError
] + [PluginImportError]


# ------------------------------------------------------------------ the handler, in-process
def test_every_user_error_keeps_its_builtin_base():
    assert {ConfigError, UnknownNameError, ModelNotFoundError, DataError, NonFiniteError} <= set(USER_ERRORS)
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(UnknownNameError, KeyError) and issubclass(ModelNotFoundError, FileNotFoundError)
    assert issubclass(NonFiniteError, FloatingPointError) and issubclass(PluginImportError, ImportError)
    assert DEBUG_HINT == HINT


@pytest.mark.parametrize("cls", USER_ERRORS, ids=lambda c: c.__name__)
def test_user_errors_print_one_line_and_exit_2(cls, capsys, monkeypatch):
    monkeypatch.delenv("APO_RL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as ei, user_errors():
        raise cls("key.x=3 is wrong;\n  set key.x=<1 or 2>")
    assert ei.value.code == getattr(cls, "exit_code", 2)  # 2; Preempted: 75 (requeue)
    out, err = capsys.readouterr()
    assert out == ""
    # KeyError would quote its message; a user error reads as the sentence, line breaks joined
    if getattr(cls, "exit_code", 2) == 2:
        assert err == f"error: key.x=3 is wrong; set key.x=<1 or 2>\n{HINT}\n"
    else:  # preempted (75), Ctrl-C (130): stopped on purpose, no error and no debug hint
        assert err == "apo-rl: key.x=3 is wrong; set key.x=<1 or 2>\n"


@pytest.mark.parametrize("value", ["1", "true"])
def test_debug_reraises_the_user_error(value, capsys, monkeypatch):
    monkeypatch.setenv("APO_RL_DEBUG", value)
    with pytest.raises(ConfigError, match="key.x"), user_errors():
        raise ConfigError("key.x=3 is wrong")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("exc", [ValueError("v"), KeyError("k"), ImportError("i"), FileNotFoundError("f")])
def test_other_errors_pass_through_untouched(exc, capsys, monkeypatch):
    monkeypatch.delenv("APO_RL_DEBUG", raising=False)
    with pytest.raises(type(exc)) as ei, user_errors():
        raise exc
    assert ei.value is exc and not isinstance(ei.value, UserError)
    assert capsys.readouterr().err == ""


def test_a_missing_plugin_module_is_a_user_error():
    with pytest.raises(PluginImportError, match="plugin module 'no_such_plugin_mod_xyz'.*PYTHONPATH") as ei:
        import_plugins(["no_such_plugin_mod_xyz"])
    assert isinstance(ei.value, UserError) and isinstance(ei.value, ImportError)


# ------------------------------------------------------------------ the CLIs (subprocesses)
def _env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("APO_RL_DEBUG", "HYDRA_FULL_ERROR")}
    e.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1", **extra)
    return e


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """All CLI runs at once (each spends most of its time importing torch and lightning)."""
    tmp = tmp_path_factory.mktemp("cli")
    runs = {
        "unknown_name": (["framework.run", "algorithm.name=nope"], {}),
        "unknown_name_debug": (["framework.run", "algorithm.name=nope"], {"APO_RL_DEBUG": "1"}),
        "bad_value": (["framework.run", "trainer.max_steps=-1"], {}),
        "no_checkpoint": (["benchmarks.evaluate", "checkpoint=/nonexistent/ckpt", "data=synthetic"], {}),
        "evaluate": (
            [
                "benchmarks.evaluate",
                "checkpoint=tiny:qwen2_5_vl",
                "data=synthetic",
                "data.train_size=4",
                "data.test_size=2",
                "limit=2",
                "batch_size=2",
                "device=cpu",
                "rollout.max_new_tokens=4",
                "+reward.components.accuracy.workers=0",
                f"output={tmp / 'evaluate' / 'metrics.json'}",
            ],
            {},
        ),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", *args, f"hydra.run.dir={tmp / name}"],
            cwd=ROOT,
            env=_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env) in runs.items()
    }
    out = {}
    try:
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=240)
            out[name] = (p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def _one_error_line(result) -> str:
    rc, stdout, stderr = result
    assert rc == 2, (rc, stdout, stderr)
    assert "Traceback" not in stdout + stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1] == HINT, stderr
    return lines[0]


def test_cli_unknown_name_is_one_error_line(cli):
    line = _one_error_line(cli["unknown_name"])
    assert "unknown algorithm 'nope'" in line and "Registered algorithms:" in line and "grpo" in line


def test_cli_bad_config_value_is_one_error_line(cli):
    line = _one_error_line(cli["bad_value"])
    assert line == "error: trainer.max_steps=-1 must be > 0", line


def test_cli_debug_shows_the_traceback(cli):
    rc, stdout, stderr = cli["unknown_name_debug"]
    assert rc not in (0, 2), (rc, stderr)
    assert "Traceback" in stderr and "UnknownNameError" in stderr and "unknown algorithm 'nope'" in stderr


def test_evaluate_missing_checkpoint_is_one_error_line(cli):
    line = _one_error_line(cli["no_checkpoint"])
    assert "/nonexistent/ckpt" in line and "does not exist" in line, line


def test_evaluate_logs_plain_lines_to_stderr_and_prints_only_json(cli):
    rc, stdout, stderr = cli["evaluate"]
    assert rc == 0, stderr[-3000:]
    result = json.loads(stdout)  # stdout is the JSON result alone
    assert result["num_records"] == 2
    lines = stderr.splitlines()
    # Hydra's job logging would print "[time][name][INFO] - evaluated 2/2"; apo-rl's own
    # messages are the plain text, once
    assert lines.count("evaluated 2/2") == 1, stderr
    assert not any("][INFO]" in ln for ln in lines), stderr


# ------------------------------------------------------------------ the library logs
@pytest.fixture
def restore_loggers():
    saved = {n: (lg.handlers[:], lg.level, lg.propagate) for n in LOGGERS for lg in [logging.getLogger(n)]}
    yield
    for n, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_console_logging_prints_plain_messages_once_on_stdout(restore_loggers, capsys, monkeypatch):
    root_seen = io.StringIO()
    root_handler = logging.StreamHandler(root_seen)
    logging.getLogger().addHandler(root_handler)
    try:
        setup_console_logging()
        setup_console_logging()  # idempotent: still one handler per logger
        for name in LOGGERS:
            assert len(logging.getLogger(name).handlers) == 1
        logging.getLogger("framework.data.validation").warning("split train: 1 of 2 records invalid")
        logging.getLogger("rewards.base").info("progress %d/%d", 1, 2)
        logging.getLogger("algorithms.apo").debug("not shown at INFO")
        out, err = capsys.readouterr()  # the handler writes to the sys.stdout of the moment
        assert out == "split train: 1 of 2 records invalid\nprogress 1/2\n" and err == ""
        assert root_seen.getvalue() == ""  # not propagated: Hydra's root handler would print it again

        setup_console_logging(stream="stderr")
        logging.getLogger("benchmarks.evaluate").info("evaluated 2/2")
        assert capsys.readouterr() == ("", "evaluated 2/2\n")
    finally:
        logging.getLogger().removeHandler(root_handler)


def test_validation_logs_the_skipped_records_instead_of_printing(caplog, capsys):
    from datasets import Dataset

    from framework.data import FEATURES
    from framework.data.validation import validate_records

    row = {"images": [], "choices": [], "task": "t", "difficulty": 0, "metadata": "{}"}
    ds = Dataset.from_dict(
        {
            k: [v1, v2]
            for k, v1, v2 in [
                ("id", "ok", "bad"),
                ("question", "what is 2+2?", ""),
                ("answer", "4", "5"),
                *[(k, v, v) for k, v in row.items()],
            ]
        },
        features=FEATURES,
    )
    with caplog.at_level(logging.INFO, logger="framework"):
        out, report = validate_records(ds, on_invalid="skip", split="train")
    assert len(out) == 1 and report.invalid == 1
    recs = [r for r in caplog.records if r.name == "framework.data.validation"]
    assert [(r.levelno, r.getMessage()) for r in recs] == [
        (logging.WARNING, "split train: 1 of 2 records invalid (skipped): #1 id=bad: empty question")
    ]
    assert capsys.readouterr() == ("", "")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="framework"):
        validate_records(ds.select([0]), on_invalid="skip", split="train")
    assert not [r for r in caplog.records if r.name == "framework.data.validation"]  # all valid: silent
    with pytest.raises(ConfigError, match="data.on_invalid"):
        validate_records(ds, on_invalid="drop")


def test_memory_budget_logs_its_table_and_warning(caplog, capsys):
    from framework.memory import GiB, MemoryBudget

    b = MemoryBudget(
        rows=[("weights", 2 * GiB, "1B params x 2 B")],
        update_bytes=3 * GiB,
        rollout_bytes=2 * GiB,
        device_bytes=2 * GiB,
    )
    with caplog.at_level(logging.INFO, logger="framework"):
        b.log()
    recs = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert recs == [
        ("framework.memory", logging.INFO, b.format()),
        ("framework.memory", logging.WARNING, b.warning()),
    ]
    assert "DOES NOT FIT" in recs[0][2] and "trainer=fsdp" in recs[1][2]
    assert capsys.readouterr() == ("", "")

    caplog.clear()
    fits = MemoryBudget(rows=[], update_bytes=GiB, rollout_bytes=GiB, device_bytes=80 * GiB)
    with caplog.at_level(logging.INFO, logger="framework"):
        fits.log()
    assert [r.levelno for r in caplog.records] == [logging.INFO]
