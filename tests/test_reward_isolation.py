"""Reward plugins run isolated: hangs, exits, crashes, exceptions and non-numbers score 0, are
counted and logged, the worker is replaced; too many failures stop the run naming the plugin;
trusted plugins may run in-process; scoring can overlap the caller (RewardSet.submit)."""

from __future__ import annotations

import logging
import os
import time

import pytest
import reward_plugins_for_tests as P

from framework.errors import ConfigError, UserError, one_line
from framework.registry import REWARDS
from rewards.base import Reward, RewardFailure, RewardSet, as_score, is_builtin

FAST = {"timeout_s": 1.0, "workers": 1}  # isolation settings for the tests


@pytest.fixture
def plugins():
    names = {"misbehaving": P.Misbehaving, "pid": P.PidReward, "bad_init": P.BadInit, "wrong_length": P.WrongLength}
    for name, cls in names.items():
        REWARDS.register(name, cls, override=True)
    yield
    for name in names:
        REWARDS._items.pop(name, None)


def recs(n: int, **extra) -> list[dict]:
    return [{"id": i, "answer": "1", **extra} for i in range(n)]


def make(frac: float = 0.5, **component) -> RewardSet:
    return RewardSet(
        {"misbehaving": {"weight": 1.0, **component}},
        correctness="misbehaving",
        max_failure_frac=frac,
        isolation=FAST,
    )


# mode -> (failures, timeouts, text in the first error, worker restarted)
CASES = {
    "hang": (0, 1, "timed out after 1s (interrupted)", False),
    "hard_hang": (0, 1, "its worker was killed", True),
    "swallow": (0, 1, "its worker was killed", True),
    "exit": (1, 0, "SystemExit: 3", True),
    "os_exit": (1, 0, "exit code 3", True),
    "segv": (1, 0, "SIGSEGV", True),
    "null": (1, 0, "SIGSEGV", True),
    "boom": (1, 0, "RuntimeError: kaboom", False),
    "string": (1, 0, "str ('7'), not a number", False),
    "none": (1, 0, "NoneType", False),
    "nan": (1, 0, "non-finite", False),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_misbehaving_plugin_scores_zero_counted_logged_restarted(plugins, caplog, mode):
    failures, timeouts, text, restarted = CASES[mode]
    caplog.set_level(logging.WARNING, logger="rewards")
    with make() as rs:
        assert rs.rewards["misbehaving"].isolated  # not a built-in: isolated by default
        t0 = time.monotonic()
        s = rs(["ok", mode, "ok", "ok"], recs(4))
        assert time.monotonic() - t0 < 6
        assert s.components["misbehaving"] == [1.0, 0.0, 1.0, 1.0] and s.total == [1.0, 0.0, 1.0, 1.0]
        m = s.metrics
        assert m["rewards/misbehaving/failures"] == failures and m["rewards/misbehaving/timeouts"] == timeouts
        assert m["rewards/misbehaving/worker_restarts"] == float(restarted)
        warned = [
            r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "'misbehaving'" in r.getMessage()
        ]
        assert warned and text in warned[-1] and "record id=1" in warned[-1], warned
        # the (replacement) worker serves the next call
        s = rs(["ok", "ok"], recs(2))
        assert s.components["misbehaving"] == [1.0, 1.0] and s.metrics["rewards/misbehaving/failures"] == 0


def test_bool_is_a_number_a_string_is_not(plugins):
    assert as_score(True) == 1.0 and as_score(False) == 0.0 and as_score(3) == 3.0
    np = pytest.importorskip("numpy")
    assert as_score(np.float32(0.5)) == 0.5 and as_score(np.array(2.0)) == 2.0
    for bad in ("7", b"7", None, [1.0], {"score": 1}):
        with pytest.raises(TypeError):
            as_score(bad)
    local = P.Misbehaving()(["bool", "string", "ok"], recs(3))  # in-process: the same rule
    assert local.scores == [1.0, 0.0, 1.0] and local.failures == 1 and "not a number" in local.errors[0]
    with make(frac=1.0) as rs:
        assert rs(["bool", "string"], recs(2)).components["misbehaving"] == [1.0, 0.0]


def test_over_the_failure_fraction_stops_naming_plugin_and_first_error(plugins):
    with make(frac=0.5) as rs:
        rs(["boom", "boom", "ok", "ok"], recs(4))  # exactly half: goes on
        with pytest.raises(RewardFailure) as ei:
            rs(["ok", "boom", "boom", "boom"], recs(4))
    e = ei.value
    assert isinstance(e, UserError)
    msg = one_line(e)
    assert "'misbehaving'" in msg and "RuntimeError: kaboom (record id=1)" in msg and "3 of 4" in msg
    assert "max_failure_frac=0.5" in msg


def test_a_plugin_hanging_everywhere_stops_early(plugins):
    """Once the call is bound to exceed the fraction, the rest is not waited for."""
    with make(frac=0.1) as rs:
        t0 = time.monotonic()
        with pytest.raises(RewardFailure, match="timed out"):
            rs(["hang"] * 10, recs(10))  # > 1 timeout of 10 stops: 2 timeouts, not 10
        assert time.monotonic() - t0 < 6
        assert rs(["ok"], recs(1)).components["misbehaving"] == [1.0]


def test_trusted_plugin_in_process_and_the_default_rule(plugins):
    me = recs(2, pid=os.getpid())
    with RewardSet({"pid": {"isolate": False}, "format": {}}, correctness="pid", isolation=FAST) as rs:
        assert not rs.rewards["pid"].isolated and not rs.rewards["format"].isolated
        assert rs(["a", "b"], me).components["pid"] == [1.0, 1.0]  # scored in this process
    with RewardSet({"pid": {}}, correctness="pid", max_failure_frac=1.0, isolation=FAST) as rs:
        assert rs.rewards["pid"].isolated
        assert rs(["a", "b"], me).components["pid"] == [0.0, 0.0]  # scored in a worker
    assert is_builtin(REWARDS.get("accuracy")) and not is_builtin(P.PidReward)
    with make(frac=1.0, isolate=False) as rs:  # in-process, SystemExit does not end the run either
        s = rs(["ok", "exit"], recs(2))
        assert s.components["misbehaving"] == [0.0, 0.0] and s.metrics["rewards/misbehaving/failures"] == 2


def test_builtins_give_the_same_scores_isolated_or_not():
    comps = ["<think>r</think><answer>3</answer>", "<answer>3</answer>", "<think>r</think><answer>4</answer>", "3"]
    rec = [{"answer": "3"}] * 4
    cfg = {"accuracy": {"weight": 1.0, "workers": 0}, "format": {"weight": 0.5}}
    with RewardSet(cfg) as rs:
        assert not any(r.isolated for r in rs.rewards.values())
        local = rs(comps, rec)
    iso = {k: dict(v, isolate={"timeout_s": 5.0, "workers": 1}) for k, v in cfg.items()}
    with RewardSet(iso) as rs:
        assert all(r.isolated for r in rs.rewards.values())
        isolated = rs(comps, rec)
    assert local.components == isolated.components == {"accuracy": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]}
    assert local.total == isolated.total == [1.5, 1.0, 0.5, 0.0]
    assert isolated.metrics["rewards/accuracy/missing_answer"] == 1


def test_unimportable_or_unbuildable_plugins_refused_at_start(plugins):
    class Local(Reward):
        def score(self, completion, record):
            return 1.0

    REWARDS.register("local_test_plugin", Local, override=True)
    try:
        with pytest.raises(ConfigError, match="inside a function.*isolate: false"):
            RewardSet({"local_test_plugin": {}}, correctness="local_test_plugin")
        with RewardSet({"local_test_plugin": {"isolate": False}}, correctness="local_test_plugin") as rs:
            assert rs(["x"], recs(1)).components["local_test_plugin"] == [1.0]
    finally:
        REWARDS._items.pop("local_test_plugin", None)
    with pytest.raises(ConfigError, match=r"'bad_init'.*ValueError: level 2 is not supported"):
        RewardSet({"bad_init": {"level": 2}}, correctness="bad_init", isolation=FAST)
    with pytest.raises(ConfigError, match=r"'bad_init'.*\['levle'\].*level"):
        RewardSet({"bad_init": {"levle": 2}}, correctness="bad_init", isolation=FAST)


def test_batching_plugin_with_a_bad_result_is_a_failure(plugins):
    with RewardSet({"wrong_length": {}}, correctness="wrong_length", max_failure_frac=1.0, isolation=FAST) as rs:
        s = rs(["a", "b"], recs(2))
    assert s.components["wrong_length"] == [0.0, 0.0] and s.metrics["rewards/wrong_length/failures"] == 2


def test_submit_overlaps_the_caller_and_keeps_order(plugins):
    with RewardSet(
        {"misbehaving": {"sleep_s": 0.4, "isolate": {"workers": 2}}}, correctness="misbehaving", isolation=FAST
    ) as rs:
        t0 = time.monotonic()
        f1 = rs.submit(["slow", "slow"], recs(2))
        f2 = rs.submit(["ok", "slow"], recs(2))
        assert time.monotonic() - t0 < 0.2  # returned at once: the caller generates meanwhile
        assert not f1.done()
        assert f1.result(timeout=10).components["misbehaving"] == [0.5, 0.5]
        assert f2.result(timeout=10).components["misbehaving"] == [1.0, 0.5]
        f3 = rs.submit(["boom"] * 3, recs(3))
        with pytest.raises(RewardFailure, match="kaboom"):
            f3.result(timeout=10)


def test_close_during_a_call_returns_promptly(plugins):
    rs = make()
    f = rs.submit(["hard_hang"], recs(1))
    time.sleep(0.3)
    t0 = time.monotonic()
    rs.close()
    assert time.monotonic() - t0 < 3
    f.exception(timeout=5)  # finished one way or the other
    with pytest.raises(RuntimeError, match="closed"):
        rs.submit(["ok"], recs(1))


def test_reward_config_options_checked():
    ok = RewardSet.from_config(
        {
            "components": {"format": {"isolate": False}},
            "correctness": "format",
            "max_failure_frac": 0.25,
            "isolation": {"timeout_s": 3, "workers": 1},
        }
    )
    assert ok.max_failure_frac == 0.25 and ok.isolation["timeout_s"] == 3.0
    ok.close()
    bad = [
        ({"max_failure_frac": 2}, "max_failure_frac"),
        ({"max_failure_frac": "x"}, "max_failure_frac"),
        ({"isolation": {"timeout_s": 0}}, "timeout_s"),
        ({"isolation": {"workers": 0.5}}, "workers"),
        ({"isolation": {"timeuot_s": 1}}, "timeuot_s"),
        ({"components": {"format": {"isolate": "yes"}}}, "isolate"),
        ({"components": {"format": {"isolate": {"workerz": 1}}}}, "workerz"),
    ]
    for extra, key in bad:
        cfg = {"components": {"format": {}}, "correctness": "format", **extra}
        with pytest.raises(ConfigError, match=key):
            RewardSet.from_config(cfg)


def test_a_reply_read_together_with_the_workers_exit_is_kept():
    """A worker that replies and then exits (SystemExit in a plugin) can be read after it has
    gone: its reply and the end of its pipe arrive in one read. The reply must be kept (it
    once was dropped and the item reported as 'worker died (exit code 0)', which CI caught)."""
    import pickle

    from rewards.workers import _HEADER, _Worker

    w = _Worker(
        {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(P.__file__), os.environ.get("PYTHONPATH", "")])},
        {"handler": "reward_plugins_for_tests:leaving_handler", "init": None, "sys_path": []},
    )
    try:
        data = pickle.dumps({"id": 7, "timeout": 5.0, "call": 1})
        w.proc.stdin.write(_HEADER.pack(len(data)) + data)
        w.proc.stdin.flush()
        assert w.proc.wait(timeout=30) == 0  # gone before the parent reads a byte
        lines, eof = w.read_lines()
        assert eof
        assert lines[0] == {"ready": True}
        assert lines[1]["id"] == 7 and lines[1]["status"] == "error" and lines[1]["leaving"] is True
        assert "SystemExit: 3" in lines[1]["error"]
    finally:
        w.kill()
