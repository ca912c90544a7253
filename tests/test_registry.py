"""The registry: decorator registration, lookup errors that list names, plugins from
outside the package through an entry point and through plugins=[module]."""

import textwrap

import pytest

from framework.registry import Registry, UnknownNameError, import_plugins


def test_register_get_and_unknown_name_lists_registered():
    reg = Registry("widget")

    @reg.register("a")
    class A:
        pass

    reg.register("b", object())
    assert reg.get("a") is A
    assert reg.names() == ["a", "b"]
    with pytest.raises(UnknownNameError) as e:
        reg.get("zzz")
    assert "unknown widget 'zzz'" in str(e.value) and "a, b" in str(e.value)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", object())


def _write_plugin(tmp_path, group: str):
    pkg = tmp_path / "ext_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        textwrap.dedent("""
        from framework.registry import Registry
        REG = None
        class Thing:
            pass
    """)
    )
    dist = tmp_path / "ext_plugin_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-plugin-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\nthing = ext_plugin_pkg.mod:Thing\n")


def test_entry_point_plugin_from_outside_the_package(tmp_path, monkeypatch):
    _write_plugin(tmp_path, "apo_rl.gadgets")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    reg = Registry("gadget")
    assert "thing" in reg.names()
    assert reg.get("thing").__name__ == "Thing"


def test_plugins_config_imports_module(tmp_path, monkeypatch):
    (tmp_path / "my_reward_plugin.py").write_text(
        textwrap.dedent("""
        from framework.registry import REWARDS
        from rewards.base import Reward

        @REWARDS.register("always_half")
        class Half(Reward):
            def score(self, completion, record):
                return 0.5
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import_plugins(["my_reward_plugin"])
    from framework.registry import REWARDS

    assert "always_half" in REWARDS.names()
    assert REWARDS.get("always_half")()(["x"], [{"answer": "1"}]).scores == [0.5]
    with pytest.raises(ImportError, match="plugin module 'no_such_plugin_mod'"):
        import_plugins(["no_such_plugin_mod"])
