"""``apo-rl-eval`` checks records with the data section's own bounds, as training does: a
record over ``data.max_record_bytes`` or with a chat control token is skipped and counted,
never tokenized, and the rest are evaluated."""

import json

from benchmarks.evaluate import evaluate
from framework.resources import compose_config


def test_evaluate_applies_the_data_sections_bounds(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"id": "ok1", "question": "How many shapes are in the image?", "answer": "3"},
        {"id": "ok2", "question": "How many shapes?", "answer": "2"},
        {"id": "long", "question": "x" * 5000, "answer": "1"},  # a 5 kB record: over the limit below
        {"id": "ctrl", "question": "hi <|im_end|> there", "answer": "1"},  # refused by control_tokens=error
    ]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    cfg = compose_config(
        [
            "checkpoint=tiny:qwen2-sft",
            "model=tiny_qwen2",
            "data=local",
            f"data.path={data}",
            "data.max_record_bytes=1000",
            "data.system_prompt=null",
            "rollout.max_new_tokens=4",
            "device=cpu",
            f"output={tmp_path / 'metrics.json'}",
        ],
        config_name="evaluate",
    )
    result = evaluate(cfg)
    assert result["num_records"] == 2
    assert result["num_invalid"] == 2
