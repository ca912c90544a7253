"""Reward plugins run isolated: hangs, exits, crashes, exceptions and non-numbers score 0, are
counted and logged, a lost worker is replaced; too many failures stop the run naming the
plugin; trusted plugins may run in-process; built-ins are known by where they come from;
batch-aware plugins get the batch; workers are bounded (memory, children, output, stats keys)."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import reward_plugins_for_tests as P

from framework.errors import ConfigError, UserError, one_line
from framework.registry import REWARDS
from rewards import Reward, RewardFailure, RewardSet, as_score, is_builtin
from rewards.format import FormatReward

FAST = {"timeout_s": 1.0, "workers": 1}  # isolation settings for the tests


@pytest.fixture
def plugins():
    names = {
        "misbehaving": P.Misbehaving,
        "pid": P.PidReward,
        "bad_init": P.BadInit,
        "wrong_length": P.WrongLength,
        "group_longest": P.GroupLongest,
        "many_stats": P.ManyStats,
    }
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


# mode -> (failures, timeouts, text in the first error, worker restarted). A Python-level hang
# is interrupted in its worker and SystemExit is caught there: that worker goes on.
CASES = {
    "hang": (0, 1, "timed out after 1s (interrupted)", False),
    "hard_hang": (0, 1, "its worker was killed", True),
    "swallow": (0, 1, "its worker was killed", True),
    "exit": (1, 0, "SystemExit: 3", False),
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
        # not the plugin's 600 s: its time limit (2 s at most) and, where its worker is lost, a
        # replacement's start (a fresh interpreter importing torch: 20 s seen at load 15 on 2 cores)
        assert time.monotonic() - t0 < 120
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
        with pytest.raises(RewardFailure, match="timed out") as ei:
            rs(["hang"] * 10, recs(10))  # > 1 timeout of 10 stops: its first task's 3, not 10
        # its first task's 3 (a stall of the loaded machine past the grace period can make one
        # of them a hard timeout, the others of its task then run again): never all 10
        assert re.search(r"timed out on [1-9] of 10", str(ei.value)), str(ei.value)
        assert time.monotonic() - t0 < 9.5  # not 10 s
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


def test_results_keep_their_order_and_a_failing_call_raises(plugins):
    with RewardSet(
        {"misbehaving": {"sleep_s": 0.4, "isolate": {"workers": 2}}}, correctness="misbehaving", isolation=FAST
    ) as rs:
        assert rs(["slow", "ok", "slow", "ok"], recs(4)).components["misbehaving"] == [0.5, 1.0, 0.5, 1.0]
        with pytest.raises(RewardFailure, match="kaboom"):
            rs(["boom"] * 3, recs(3))


def test_close_during_a_call_returns_promptly(plugins):
    rs = make()
    out = {}

    def call():
        try:
            out["scores"] = rs(["hard_hang"], recs(1))
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    rs.close()
    assert time.monotonic() - t0 < 10
    t.join(5)
    assert not t.is_alive() and "error" in out  # the call ended: the pool was closed under it
    with pytest.raises(RuntimeError, match="closed"):
        rs(["ok"], recs(1))


def test_reward_config_options_checked():
    ok = RewardSet.from_config(
        {
            "components": {"format": {"isolate": False}},
            "correctness": "format",
            "max_failure_frac": 0.25,
            "isolation": {"timeout_s": 3, "workers": 1},
        }
    )
    assert ok.max_failure_frac == 0.25 and ok.isolation.timeout_s == 3.0 and ok.isolation.workers == 1
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


# ----------------------------------------------------------------------------- trust by location


def test_builtins_are_known_by_where_they_come_from_not_by_name(plugins, tmp_path):
    """A module named ``rewards.evil`` loaded from outside the installed package is a plugin like
    any other: isolated by default (here its workers cannot even import it: refused at start)."""
    src = tmp_path / "evil.py"
    src.write_text(
        "from rewards.base import Reward\n\n\nclass Evil(Reward):\n"
        "    def __init__(self):\n        pass\n\n    def score(self, completion, record):\n        return 1.0\n"
    )
    spec = importlib.util.spec_from_file_location("rewards.evil", src)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rewards.evil"] = mod
    try:
        spec.loader.exec_module(mod)
        assert mod.Evil.__module__ == "rewards.evil"
        assert not is_builtin(mod.Evil)
        assert is_builtin(FormatReward) and is_builtin(REWARDS.get("accuracy"))
        assert not is_builtin(P.Misbehaving)
        REWARDS.register("evil", mod.Evil, override=True)
        with pytest.raises(ConfigError, match=r"'evil'.*cannot run in a worker process.*rewards\.evil"):
            RewardSet({"evil": {}}, correctness="evil", isolation=FAST)
        with RewardSet({"evil": {"isolate": False}}, correctness="evil") as rs:  # trusted by name: only when asked
            assert not rs.rewards["evil"].isolated and rs(["x"], recs(1)).components["evil"] == [1.0]
    finally:
        sys.modules.pop("rewards.evil", None)
        REWARDS._items.pop("evil", None)
    del sys.modules["rewards.format"]  # a module not (or no longer) imported is no built-in either
    try:
        assert not is_builtin(FormatReward)
    finally:
        sys.modules["rewards.format"] = sys.modules["rewards"].format


# ----------------------------------------------------------------------------- batch-aware plugins


def test_a_group_relative_plugin_gets_the_whole_batch_by_default(plugins):
    comps = ["a", "bbb", "cc", "dddd", "ee", "f", "ggg", "hh"]
    records = [{"id": i, "group": i // 4, "answer": "1"} for i in range(8)]
    # longest of each group of 4: "dddd" (group 0), "ggg" (group 1)
    want = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    with RewardSet({"group_longest": {}}, correctness="group_longest", isolation=FAST) as rs:
        assert rs.rewards["group_longest"].isolated
        assert rs(comps, records).components["group_longest"] == want
    # one completion per task (what the default once was): every completion is its group's longest
    with RewardSet(
        {"group_longest": {"isolate": {"batch_size": 1}}}, correctness="group_longest", isolation=FAST
    ) as rs:
        assert rs(comps, records).components["group_longest"] == [1.0] * 8


# ----------------------------------------------------------------------------- bounds


def test_memory_limit_scores_zero_with_a_clear_error_and_the_run_goes_on(plugins, caplog):
    caplog.set_level(logging.WARNING, logger="rewards")
    with make(frac=1.0, isolate={"memory_limit_mb": 256}) as rs:
        s = rs(["alloc", "ok"], recs(2))
        assert s.components["misbehaving"] == [0.0, 1.0] and s.metrics["rewards/misbehaving/failures"] == 1
        warned = [r.getMessage() for r in caplog.records if "'misbehaving'" in r.getMessage()]
        assert warned and "MemoryError" in warned[-1] and "memory limit" in warned[-1] and "256 MiB" in warned[-1]
        assert rs(["ok"], recs(1)).components["misbehaving"] == [1.0]  # the same worker serves on
    with make(frac=1.0, isolate={"memory_limit_mb": 4096, "timeout_s": 60}) as rs:  # the default: 1 GiB fits
        s = rs(["alloc"], recs(1))
        assert s.components["misbehaving"] == [1.0], s.metrics


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie is dead (its new parent may not reap it at once)


def _gone(pid: int, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_plugins_children_die_with_its_worker(plugins, tmp_path):
    pidfile = tmp_path / "pids"
    rs = make(frac=1.0)
    try:
        s = rs(["fork_segv"], recs(1, pidfile=str(pidfile)))  # the worker dies: its child with it
        assert s.metrics["rewards/misbehaving/worker_restarts"] == 1
        (first,) = map(int, pidfile.read_text().split())
        assert _gone(first)
        assert rs(["fork"], recs(1, pidfile=str(pidfile))).components["misbehaving"] == [1.0]
        second = int(pidfile.read_text().split()[1])
        time.sleep(0.2)
        assert _alive(second)  # its worker lives
    finally:
        rs.close()
    assert _gone(second)  # closed: no child survives


def test_plugin_output_is_forwarded_capped(plugins, capsys, caplog):
    caplog.set_level(logging.WARNING, logger="rewards")
    with make(frac=1.0) as rs:
        rs(["hello", "ok"], recs(2))
        err = capsys.readouterr().err
        assert "hello from the plugin" in err
        rs(["print", "print", "ok"], recs(3))  # 400 KiB printed in one call
        err = capsys.readouterr().err
    assert 60 * 1024 <= err.count("x") <= 64 * 1024
    dropped = [r.getMessage() for r in caplog.records if "output dropped" in r.getMessage()]
    assert len(dropped) == 1 and "'misbehaving'" in dropped[0] and "max_output_kb" in dropped[0]


def test_stats_keys_are_capped_and_reported_once(plugins, caplog):
    caplog.set_level(logging.WARNING, logger="rewards")
    with RewardSet({"many_stats": {}}, correctness="many_stats", isolation=FAST) as rs:
        m = rs(["a"], recs(1)).metrics
        assert sorted(k for k in m if k.startswith("rewards/many_stats/a")) == [
            f"rewards/many_stats/a{i:02d}" for i in range(32)
        ]
        assert m["rewards/many_stats/worker_restarts"] == 0  # the isolation's own counter is always kept
        m = rs(["b"], recs(1)).metrics  # 40 new keys: the 32 columns are taken
        assert not [k for k in m if k.startswith("rewards/many_stats/b")]
    warned = [r.getMessage() for r in caplog.records if "max_stat_keys" in r.getMessage()]
    assert len(warned) == 1 and "'many_stats'" in warned[0]


def test_a_lost_worker_costs_only_the_item_it_was_running(plugins, caplog):
    """Items go to workers a few at a time (16 completions, 1 worker: 4 per task); a crash or a
    hang the timer cannot interrupt loses that item alone: the others of its task run again."""
    caplog.set_level(logging.WARNING, logger="rewards")
    comps = ["ok"] * 16
    comps[5], comps[10] = "segv", "hard_hang"
    with make(frac=1.0) as rs:
        assert rs.rewards["misbehaving"].pool.chunk_size(16) == 4
        s = rs(comps, recs(16))
    want = [1.0] * 16
    want[5] = want[10] = 0.0
    assert s.components["misbehaving"] == want
    m = s.metrics
    assert m["rewards/misbehaving/failures"] == 1 and m["rewards/misbehaving/timeouts"] == 1
    assert m["rewards/misbehaving/worker_restarts"] == 2
    warned = [r.getMessage() for r in caplog.records if "first error" in r.getMessage()][-1]
    assert "SIGSEGV) (record id=5)" in warned and "killed) (record id=10)" in warned
