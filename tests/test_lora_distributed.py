"""LoRA under 2-process DDP and FSDP (gloo, CPU) against 1 process over the same global batch,
launched as tests/test_distributed.py launches its runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


# =========================================================================== DDP / FSDP
@pytest.fixture(scope="module")
def lora_one_process(tmp_path_factory):
    from test_distributed import _run

    out = tmp_path_factory.mktemp("lora_one")
    return out, _run(out, *LORA_DIST)


LORA_DIST = ["model.lora.enabled=true", "optim.lr=3e-3"]


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "step-000003" / "policy" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        ["trainer.strategy=ddp"],
        ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.fsdp.mixed_precision=null"],
    ],
    ids=["ddp", "fsdp"],
)
def test_lora_two_processes_match_one_process(tmp_path, lora_one_process, strategy):
    """2 processes over the same global batch train the same adapters as 1 process (the
    adapter checkpoint is gathered from the shards under FSDP): B starts at 0, so B is the
    whole update; A moves little from its (seeded, identical) init."""
    from test_distributed import _run

    one_dir, one = lora_one_process
    two = _run(tmp_path / "two", *LORA_DIST, *strategy, "trainer.devices=2")
    for a, b in zip([r for r in one if "reward" in r], [r for r in two if "reward" in r]):
        for k in ("reward", "loss", "kl", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["rl_step"], k)
    ref, got = _adapters(one_dir), _adapters(tmp_path / "two")
    assert ref.keys() == got.keys() and len(ref) == 2 * 2 * 7
    B = sorted(k for k in ref if "lora_B" in k)
    d_ref = torch.cat([ref[k].flatten() for k in B])
    d_got = torch.cat([got[k].flatten() for k in B])
    assert float(d_ref.norm()) > 1e-3  # trained
    assert float((d_got - d_ref).norm() / d_ref.norm()) < 1e-3
    for k in ref:
        if "lora_A" in k:
            assert torch.allclose(ref[k], got[k], rtol=1e-3, atol=1e-5), k
