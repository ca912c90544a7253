"""The prepared GPU check (benchmarks/gpu_check.py) in its CPU dry run: every part (update,
rollout, the team's anchor, one full RL run, ``pytest -m gpu``) runs end to end in its own
process on tiny shapes and writes finite numbers to gpu_check.json and a Markdown table, so the
GPU job cannot fail on a typo. Plus the parsers it reads the anchor's and pytest's output with,
the anchor copy, and the wheel script's syntax."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SHARED_ANCHOR = ROOT.parent / "shared" / "bench" / "gpu_anchor.py"


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def positive(d: dict, *keys: str) -> None:
    for k in keys:
        assert is_number(d.get(k)) and d[k] > 0, (k, d.get(k))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_runs_every_part(dry_run):
    _, res = dry_run
    parts = res["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    for name, r in parts.items():
        assert r["status"] == "ok", (name, r.get("error_tail"))
        assert is_number(r["seconds"]) and r["seconds"] < r["limit_s"]
    v = res["meta"]["versions"]
    for k in ("python", "torch", "transformers", "lightning", "hydra-core", "datasets"):
        assert v[k], k
    assert v["transformers_checked"] is True


def test_dry_run_update_numbers(dry_run):
    u = dry_run[1]["parts"]["update"]
    assert u["master_dtype"] == "float32" and u["gradient_checkpointing"] and u["needs_reference"]
    positive(u, "peak_tflops", "matmul_tflops_measured", "n_params", "n_text_params")
    assert [r["shape"] for r in u["rows"]] == [f"{B}x{L}" for B, L in gpu_check.TINY.update_shapes]
    for r in u["rows"]:
        assert not r["oom"]
        positive(r, "tokens_per_s", "mfu", "mfu_vs_matmul", "peak_mem_gib", "fwd_s", "bwd_s", "optim_s", "step_s")


def test_dry_run_rollout_and_anchor_numbers(dry_run):
    res = dry_run[1]
    ro, an = res["parts"]["rollout"], res["parts"]["anchor"]
    assert ro["static_cache"] == "not offered"
    assert [r["batch"] for r in ro["rows"]] == list(gpu_check.TINY.rollout_batches)
    for r in ro["rows"]:
        positive(r, "tokens_per_s", "seconds", "completion_tokens", "peak_mem_gib")
    assert an["mode"].startswith("tiny")
    assert sorted(an["generate"], key=int) == [str(b) for b in gpu_check.TINY.rollout_batches]
    for g in an["generate"].values():
        positive(g, "tokens_per_s")
    assert sorted(an["train"]) == sorted(f"{B}x{L}" for B, L in gpu_check.TINY.update_shapes)
    for t in an["train"].values():
        positive(t, "tokens_per_s", "step_s")
        assert is_number(t["mfu"]) and is_number(t["peak_mem_gib"])
    # every update shape and rollout batch is a ratio against the anchor
    cmp = res["comparison"]
    assert len(cmp) == len(gpu_check.TINY.update_shapes) + len(gpu_check.TINY.rollout_batches)
    assert all(is_number(x) and x > 0 for x in cmp.values())


def test_dry_run_rl_step_numbers(dry_run):
    st = dry_run[1]["parts"]["step"]
    assert len(st["steps"]) == gpu_check.TINY.step_steps
    positive(st["timing_s"], "rollout", "update", "step")
    positive(st["perf"], "rollout_tokens_per_s", "update_tokens_per_s")
    positive(st, "peak_mem_gib", "peak_vs_budget", "peak_vs_budget_at_prompt", "prompt_tokens")
    positive(st["budget"], "peak_gib", "update_gib", "rollout_gib")
    assert st["precision"] == "bf16-mixed"  # model=qwen2_5_vl_3b: bf16 compute, fp32 masters
    assert st["full_model_params"] > 3e9  # the real-size step model's config, checked on the meta device
    assert st["checkpoint"].startswith("not written")


def test_dry_run_pytest_and_markdown(dry_run):
    out, res = dry_run
    py = res["parts"]["pytest"]
    assert py["failed"] == 0 and py["errors"] == 0
    assert py["skipped"] + py["passed"] >= 2  # the GPU-marked tests (skipped on the CPU)
    md = (out / "gpu_check.md").read_text()
    assert "| part | status | seconds | CPU s | limit s |" in md
    for name in gpu_check.PARTS:
        assert f"| {name} | ok |" in md
    assert "## Goals" in md and "static cache: not offered" in md
    assert {g["goal"].split(" ")[0] for g in res["goals"]} == {"update", "rollout", "RL"}


def test_parse_anchor_reads_the_anchors_gpu_output(tmp_path):
    log = "\n".join(
        [
            "torch 2.11.0+cu130 transformers 5.17.0 NVIDIA H100 80GB HBM3",
            "params total 3.755B text 3.086B build 4.1s",
            "HF generate B=64 new=256: 605 tok/s (27.1s)",
            "HF generate B=256 new=256: 2,382 tok/s (27.5s)",
            "train B=8 L=1024: 16,100 tok/s step 0.51s MFU(6N, vs 989T) 30.1% peak mem 40.2 GiB",
            "train B=16 L=1024: 17,225 tok/s step 0.95s MFU(6N, vs 989T) 32.0% peak mem 63.0 GiB",
        ]
    )
    (tmp_path / "gpu_anchor.json").write_text(json.dumps({"hf_generate_B256_tok_per_s": 2381.7}))
    a = gpu_check.parse_anchor(log, tmp_path / "gpu_anchor.json")
    assert a["params_text_b"] == 3.086
    assert a["generate"]["64"]["tokens_per_s"] == 605.0
    assert a["generate"]["256"]["tokens_per_s"] == 2381.7  # the JSON's unrounded figure
    assert a["train"]["16x1024"] == {
        "tokens_per_s": 17225.0,
        "step_s": 0.95,
        "mfu": 0.32,
        "mfu_peak_tflops": 989.0,
        "peak_mem_gib": 63.0,
    }
    assert gpu_check.parse_anchor("OOM at 16 1024", tmp_path / "none.json")["train"]["16x1024"] == {"oom": True}


def test_parse_pytest_summary():
    r = gpu_check.parse_pytest("..F\n==== 1 failed, 2 passed, 3 deselected in 9.1s ====\n")
    assert (r["passed"], r["failed"], r["deselected"], r["skipped"]) == (2, 1, 3, 0)
    assert gpu_check.parse_pytest("1 error in 2.0s")["errors"] == 1


def test_anchor_copy_is_verbatim_and_its_tiny_rewrite_applies(tmp_path):
    copy = gpu_check.ANCHOR.read_text()
    body = copy.split("# fmt: off\n", 1)[1]
    if SHARED_ANCHOR.exists():
        assert body == SHARED_ANCHOR.read_text(), "benchmarks/gpu_anchor.py differs from ../shared/bench/gpu_anchor.py"
    assert gpu_check.anchor_script(False, tmp_path) == gpu_check.ANCHOR
    tiny = gpu_check.anchor_script(True, tmp_path).read_text()
    assert "cuda" not in tiny.replace("torch.cuda.OutOfMemoryError", "").replace("torch.OutOfMemoryError", "")


def test_wheel_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_wheels.sh")], check=True)
