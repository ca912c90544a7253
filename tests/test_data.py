"""Data layer: synthetic tasks, loading (local / hub / plugin tasks), validation, configs."""

from __future__ import annotations

import collections
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

from framework.data import (
    FEATURES,
    DataError,
    load_data,
    prepare_data,
    reference_completion,
    to_record,
    validate_records,
)
from framework.data.synthetic import build, generate_split
from framework.registry import TASKS, UnknownNameError

FIX = Path(__file__).resolve().parent / "fixtures"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_KINDS = ["count", "count_color", "color_choice", "compare"]
# the palette is restated here on purpose: the checks below must not trust the generator
PALETTE = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 20)}


def raw_images(ds: Dataset) -> list[list[bytes]]:
    """Encoded image bytes per row, without decoding."""
    return [[im["bytes"] for im in ims] for ims in ds.with_format("arrow")["images"].to_pylist()]


@pytest.fixture(scope="module")
def mixed():
    cfg = {
        "task": "synthetic",
        "seed": 3,
        "train_size": 300,
        "test_size": 60,
        "difficulty": [1, 2, 3],
        "kinds": ALL_KINDS,
    }
    return load_data(cfg)


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_registered():
    assert "synthetic" in TASKS and {"local", "hub"} <= set(TASKS.names())
    with pytest.raises(UnknownNameError, match="synthetic"):
        load_data({"task": "no_such_task"})


def test_synthetic_deterministic():
    cfg = {
        "task": "synthetic",
        "seed": 7,
        "train_size": 80,
        "test_size": 20,
        "difficulty": [1, 2, 3],
        "kinds": ALL_KINDS,
    }
    a, b = load_data(cfg), load_data(dict(cfg))
    c = load_data({**cfg, "seed": 8})
    for split in ("train", "test"):
        cols = ["id", "question", "answer", "choices", "task", "difficulty", "metadata"]
        assert a[split].select_columns(cols).to_list() == b[split].select_columns(cols).to_list()
        assert raw_images(a[split]) == raw_images(b[split])
        assert raw_images(a[split]) != raw_images(c[split])
        assert a[split]["question"] != c[split]["question"] or a[split]["answer"] != c[split]["answer"]
    assert a["train"].features == FEATURES


def read_grid(img: Image.Image) -> tuple[int, list]:
    """Independent reading of an image: per cell None or (colour, shape), from pixels."""
    arr = np.asarray(img.convert("RGB")).astype(int)
    h, w, _ = arr.shape
    assert h == w and h % 28 == 0
    k = h // 28
    names = list(PALETTE)
    pal = np.array([PALETTE[n] for n in names])
    cells = []
    for r in range(k):
        for c in range(k):
            cell = arr[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28]
            # shapes stay inside their cell, so cells = connected regions
            border = np.concatenate(
                [
                    cell[:4].reshape(-1, 3),
                    cell[-4:].reshape(-1, 3),
                    cell[:, :4].reshape(-1, 3),
                    cell[:, -4:].reshape(-1, 3),
                ]
            )
            assert (border == 255).all()
            centre = cell[14, 14]
            if (centre == 255).all():
                assert (cell == 255).all()
                cells.append(None)
                continue
            colour = names[int(np.abs(pal - centre).sum(1).argmin())]
            coloured = np.abs(cell - np.array(PALETTE[colour])).sum(-1) == 0
            assert ((cell == 255).all(-1) | coloured).all()  # one solid colour on white
            shape = "square" if coloured[6, 6] else "circle"  # the 18 px box's corner
            assert 200 <= coloured.sum() <= 18 * 18
            cells.append((colour, shape))
    return k, cells


def expected_answer(question: str, k: int, cells: list, choices: list[str]) -> str:
    shapes = [c for c in cells if c is not None]
    if question.startswith("How many shapes"):
        return str(len(shapes))
    m = re.match(r"How many (\w+) shapes", question)
    if m:
        return str(sum(c[0] == m.group(1) for c in shapes))
    m = re.match(r"Are there more (\w+) shapes or (\w+) shapes", question)
    if m:
        na, nb = (sum(c[0] == m.group(i) for c in shapes) for i in (1, 2))
        assert na != nb
        return m.group(1) if na > nb else m.group(2)
    m = re.match(r"What color is (.*?)\?\n(.*)$", question)
    assert m, question
    where = m.group(1)
    opts = re.findall(r"\(([A-D])\) (\w+)", m.group(2))
    assert [o[1] for o in opts] == choices and sorted(choices) == sorted(PALETTE)
    if where == "the only shape in the image":
        assert len(shapes) == 1
        colour = shapes[0][0]
    else:
        where = where.removeprefix("the shape in ")
        if k == 4:
            r, c = (int(x) - 1 for x in re.search(r"row (\d), column (\d)", where).groups())
        else:
            rows = ["top", "bottom"] if k == 2 else ["top", "middle", "bottom"]
            cols = ["left", "right"] if k == 2 else ["left", "center", "right"]
            words = re.sub(r"^the |cell$", "", where).strip().replace("-", " ").split()
            if words == ["center"]:
                r, c = 1, 1
            else:
                r, c = rows.index(words[0]), cols.index(words[1])
        colour = cells[r * k + c][0]
    return {name: letter for letter, name in opts}[colour]


def test_synthetic_answers_match_pixels(mixed):
    seen_kinds, seen_sizes = set(), set()
    for split in ("train", "test"):
        for row in mixed[split]:
            rec = to_record(row)
            assert len(rec["images"]) == 1 and "<image>" not in rec["question"]
            img = rec["images"][0]
            k, cells = read_grid(img)
            assert k == {1: 2, 2: 3, 3: 4}[rec["difficulty"]]
            assert img.size == (28 * k, 28 * k)
            assert rec["answer"] == expected_answer(rec["question"], k, cells, rec["choices"]), rec["id"]
            seen_kinds.add(rec["metadata"]["kind"])
            seen_sizes.add(img.size)
    assert seen_kinds == set(ALL_KINDS)
    assert seen_sizes == {(56, 56), (84, 84), (112, 112)}


def test_text_modality_matches_image_modality():
    cfg = {
        "task": "synthetic",
        "seed": 5,
        "train_size": 60,
        "test_size": 20,
        "difficulty": [1, 2, 3],
        "kinds": ALL_KINDS,
    }
    img_ds = load_data(cfg)
    txt_ds = load_data({**cfg, "modality": "text"})
    codes = {"R": "red", "G": "green", "B": "blue", "Y": "yellow"}
    for split in ("train", "test"):
        for ri, rt in zip(img_ds[split], txt_ds[split]):
            a, b = to_record(ri), to_record(rt)
            assert b["images"] == [] and a["id"] == b["id"] and a["answer"] == b["answer"]
            assert b["question"].endswith("\n" + a["question"])
            k, cells = read_grid(a["images"][0])
            rows = b["question"].split("\n")[1 : 1 + k]
            text_cells = [
                None if t == "." else (codes[t.upper()], "square" if t.isupper() else "circle")
                for row in rows
                for t in row.split()
            ]
            assert text_cells == cells


def test_splits_disjoint_on_small_space():
    # default task (difficulty 1, counting): 2x2 grids, a small space where repeats are likely
    d = build({"seed": 0, "train_size": 2000, "test_size": 200, "difficulty": [1], "kinds": ["count"]})
    assert len(d["train"]) == 2000 and len(d["test"]) == 200
    assert not set(d["train"]["id"]) & set(d["test"]["id"])
    pairs = {
        split: set(zip((ims[0] for ims in raw_images(d[split])), d[split]["question"])) for split in ("train", "test")
    }
    assert not pairs["train"] & pairs["test"]
    answers = d["train"]["answer"]
    assert {a: answers.count(a) for a in set(answers)}.keys() == {"1", "2", "3", "4"}
    assert min(answers.count(a) for a in "1234") > 300  # redraws keep the answers balanced


def test_balanced_answers_make_every_count_equally_frequent():
    """Drawn level first, a 2x2 count (1-4) is 3.3x as frequent as a count only a 3x3 grid
    holds (5-9): 1/2*1/4 + 1/2*1/9 against 1/2*1/9. ``balanced_answers`` draws the answer first:
    each of 1-9 is 1/9, and a count only a 3x3 grid holds comes on a 3x3 grid."""
    n = 4500
    plain, _ = generate_split("train", n, seed=0, difficulty=[1, 2], kinds=["count"])
    counts = collections.Counter(plain["answer"])
    assert counts["1"] / counts["9"] > 2.5  # expected 0.181 / 0.056 = 3.25
    ds, _ = generate_split("train", n, seed=0, difficulty=[1, 2], kinds=["count"], balanced_answers=True)
    counts = collections.Counter(ds["answer"])
    assert set(counts) == {str(i) for i in range(1, 10)}
    assert all(abs(c / n - 1 / 9) < 0.02 for c in counts.values()), counts  # binomial sd 0.0047
    for ans, d in zip(ds["answer"], ds["difficulty"]):
        assert d == 2 or int(ans) <= 4
    # count_color: 0-9 equally frequent; the other kinds are drawn as before
    ds, _ = generate_split("train", n, seed=0, difficulty=[1, 2], kinds=["count_color"], balanced_answers=True)
    counts = collections.Counter(ds["answer"])
    assert set(counts) == {str(i) for i in range(10)} and all(abs(c / n - 0.1) < 0.02 for c in counts.values())
    a, _ = generate_split("train", 50, seed=0, difficulty=[1, 2], kinds=["compare"], balanced_answers=True)
    b, _ = generate_split("train", 50, seed=0, difficulty=[1, 2], kinds=["compare"])
    assert a["question"] == b["question"] and a["answer"] == b["answer"]


def test_generation_fast():
    t = time.perf_counter()
    ds, _ = generate_split("train", 2000, seed=1, difficulty=[1, 2, 3], kinds=ALL_KINDS)
    elapsed = time.perf_counter() - t
    assert len(ds) == 2000
    assert elapsed < 6.0, f"2000 synthetic records took {elapsed:.2f}s (target < 3 s)"


def test_reference_completion(mixed):
    pat = re.compile(r"^<think>([^<]+)</think><answer>([^<]+)</answer>$")
    kinds = set()
    for row in mixed["train"].select(range(120)):
        rec = to_record(row)
        out = reference_completion(rec)
        m = pat.match(out)
        assert m and m.group(2) == rec["answer"], out
        assert len(out.replace("><", "> <").split()) <= 20
        kinds.add(rec["metadata"]["kind"])
    assert kinds == set(ALL_KINDS)
    assert reference_completion({"answer": "42", "metadata": "{}"}).endswith("<answer>42</answer>")


def test_bad_synthetic_config():
    with pytest.raises(ValueError, match="kind"):
        load_data({"task": "synthetic", "kinds": ["nope"], "train_size": 2, "test_size": 1})
    with pytest.raises(ValueError, match="difficulty"):
        load_data({"task": "synthetic", "difficulty": [9], "train_size": 2, "test_size": 1})


# ----------------------------------------------------------------------------- loading
def test_local_directory_jsonl():
    # the fixture's images are shared with other fixtures, outside its folder ("../images/"):
    # refused by default (tests/test_data_robustness.py), allowed with data.allow_absolute_paths
    d = load_data({"task": "local", "path": str(FIX / "local"), "allow_absolute_paths": True})
    assert set(d) == {"train", "test"} and d["train"].features == FEATURES
    recs = {r["id"]: to_record(r) for r in d["train"]}
    assert [im.size for im in recs["tr0"]["images"]] == [(28, 28)]
    assert recs["tr0"]["images"][0].getpixel((3, 3)) == (220, 30, 30)
    assert len(recs["tr1"]["images"]) == 2 and recs["tr1"]["images"][1].getpixel((0, 0)) == (30, 70, 220)
    assert recs["tr1"]["choices"] == ["first", "second"] and recs["tr1"]["metadata"] == {"source": "fixture"}
    assert recs["tr2"]["images"] == [] and recs["tr2"]["answer"] == "5"  # text-only, int answer
    assert recs["tr3"]["images"][0].getpixel((1, 1)) == (30, 160, 50)  # base64 data URI
    assert recs["tr3"]["difficulty"] == 2 and recs["tr3"]["task"] == "local"
    assert to_record(d["test"][0])["images"][0].size == (56, 28)
    out, rep = validate_records(
        d["train"], count_prompt_tokens=None, max_prompt_tokens=512, on_invalid="error", split="train"
    )
    assert rep.kept == 4 and rep.problems == [] and "all 4 records valid" in rep.summary()


def test_local_field_map_and_missing_column():
    cfg = {
        "task": "local",
        "path": str(FIX / "mapped.jsonl"),
        "field_map": {"id": "uid", "question": "query", "answer": "label", "images": "img", "choices": "options"},
        "metadata_columns": ["extra"],
    }
    d = load_data(cfg)
    assert set(d) == {"train"}
    r0, r1 = (to_record(r) for r in d["train"])
    assert r0["id"] == "m0" and r0["question"] == "Which color?" and r0["choices"] == ["red", "green"]
    assert r0["answer"] == "B" and r0["metadata"] == {"answer_text": "green", "extra": 7}  # text -> letter
    assert r1["answer"] == "A" and r0["images"][0].getpixel((0, 0)) == (30, 160, 50)

    with pytest.raises(DataError) as e:
        load_data({**cfg, "field_map": {**cfg["field_map"], "question": "prompt"}})
    msg = str(e.value)
    assert "'prompt'" in msg and "field_map.question" in msg and "'query'" in msg and "'uid'" in msg
    with pytest.raises(DataError, match=r"column 'question' not found.*available columns: \['extra'"):
        load_data({"task": "local", "path": str(FIX / "mapped.jsonl")})
    with pytest.raises(DataError, match="nope"):
        load_data({**cfg, "metadata_columns": ["nope"]})

    # a single file with a hold-out test split
    d = load_data({**cfg, "test_size": 1})
    assert len(d["train"]) == 1 and len(d["test"]) == 1


def test_local_parquet_bytes():
    cfg = {
        "task": "local",
        "path": str(FIX),
        "split_files": {"train": "bytes.parquet"},
        "field_map": {"id": "pid", "question": "query", "images": "decoded_image"},
        "metadata_columns": ["unit"],
    }
    d = load_data(cfg)
    recs = [to_record(r) for r in d["train"]]
    assert [r["id"] for r in recs] == ["p0", "p1", "p2"]
    assert [r["images"][0].getpixel((5, 5)) for r in recs] == [(220, 30, 30), (30, 70, 220), (30, 160, 50)]
    assert [r["answer"] for r in recs] == ["B", "B", "1"] and recs[2]["choices"] == []
    assert recs[2]["metadata"] == {"unit": "images"}


def test_hub_with_field_map_and_offline_error(monkeypatch):
    import datasets

    src = Dataset.from_parquet(str(FIX / "bytes.parquet"))
    calls = []

    def fake_load(hub_id, config_name=None, split=None, revision=None):
        calls.append((hub_id, config_name, split))
        return src

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = {
        "task": "hub",
        "hub_id": "someone/vqa",
        "config_name": "default",
        "splits": {"train": "testmini[:2]", "test": "testmini[2:]"},
        "field_map": {"id": "pid", "question": "query", "images": "decoded_image"},
    }
    d = load_data(cfg)
    assert calls == [("someone/vqa", "default", "testmini[:2]"), ("someone/vqa", "default", "testmini[2:]")]
    r = to_record(d["train"][0])
    assert r["task"] == "someone/vqa" and r["answer"] == "B" and r["images"][0].size == (28, 28)
    with pytest.raises(DataError, match="'answer_col'.*available columns"):
        load_data({**cfg, "field_map": {"answer": "answer_col"}})

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/vqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_data(cfg)
    assert "someone/vqa" in str(e.value) and "data=local data.path=" in str(e.value)


def test_plugin_task_is_conformed():
    @TASKS.register("test_data_plugin_task", override=True)
    def plugin(cfg):
        from datasets import DatasetDict

        return DatasetDict({"train": Dataset.from_dict({"question": ["q?"], "answer": ["a"], "x": [1]})})

    d = load_data({"task": "test_data_plugin_task"})
    assert d["train"].features == FEATURES
    r = to_record(d["train"][0])
    assert r["images"] == [] and r["id"] == "test_data_plugin_task-train-0" and r["metadata"] == {}


# ----------------------------------------------------------------------------- validation
def words(rec: dict) -> int:
    return len(rec["question"].split()) + 16 * len(rec["images"])


BROKEN_EXPECT = {
    1: "image 0 missing (file not found",
    2: "image 0 unreadable",
    3: "2 <image> placeholders but the record has 1 image",
    4: "prompt has 60 tokens > max_prompt_tokens=50",
    5: "answer 'D' is not a choice letter",
    7: "image 0 missing (no path or bytes)",
    8: "empty answer",
}


def test_validation_skip_reports_each_problem():
    ds = load_data({"task": "local", "path": str(FIX / "broken.jsonl")})["train"]
    out, rep = validate_records(ds, count_prompt_tokens=words, max_prompt_tokens=50, on_invalid="skip", split="train")
    assert rep.total == 9 and rep.kept == 2 and rep.invalid == 7
    assert out["id"] == ["ok0", "ok6"]
    got = {i: why for i, _, why in rep.problems}
    assert set(got) == set(BROKEN_EXPECT)
    for i, text in BROKEN_EXPECT.items():
        assert text in got[i], (i, got[i])
    s = rep.summary()
    assert s.startswith("split train: 7 of 9 records invalid (skipped): #1 id=nofile: image 0 missing")
    assert "#5 id=badletter" in s
    # without the token callback the long prompt passes
    _, rep2 = validate_records(ds, count_prompt_tokens=None, max_prompt_tokens=50, on_invalid="skip", split="test")
    assert 4 not in {i for i, _, _ in rep2.problems} and rep2.kept == 3


def test_validation_error_mode():
    ds = load_data({"task": "local", "path": str(FIX / "broken.jsonl")})["train"]
    with pytest.raises(DataError) as e:
        validate_records(ds, count_prompt_tokens=words, max_prompt_tokens=50, on_invalid="error", split="train")
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "#2 id=corrupt: image 0 unreadable" in msg and "data.on_invalid=skip" in msg
    with pytest.raises(ValueError, match="on_invalid"):
        validate_records(ds, count_prompt_tokens=None, max_prompt_tokens=50, on_invalid="drop", split="x")


def test_validation_summary_truncates_and_all_invalid_raises():
    n = 25
    ds = Dataset.from_dict(
        {
            "id": [f"r{i}" for i in range(n)],
            "images": [[] for _ in range(n)],
            "question": ["<image> q"] * n,
            "answer": ["a"] * n,
            "choices": [[]] * n,
            "task": ["t"] * n,
            "difficulty": [0] * n,
            "metadata": ["{}"] * n,
        },
        features=FEATURES,
    )
    with pytest.raises(DataError, match=r"25 of 25 records invalid.*#9 id=r9.*and 15 more"):
        validate_records(ds, count_prompt_tokens=None, max_prompt_tokens=512, on_invalid="skip", split="s")


def test_validation_fast_on_synthetic():
    ds = load_data({"task": "synthetic", "train_size": 2000, "test_size": 10})["train"]
    seen = []

    def count(rec):
        seen.append(rec)
        return 10 + len(rec["question"].split())

    t = time.perf_counter()
    out, rep = validate_records(ds, count_prompt_tokens=count, max_prompt_tokens=512, on_invalid="error", split="train")
    assert time.perf_counter() - t < 4.0
    assert rep.kept == 2000 and len(out) == 2000
    assert isinstance(seen[0]["images"][0], Image.Image) and isinstance(seen[0]["metadata"], dict)


def test_prepare_data_uses_generic_options():
    cfg = {"task": "local", "path": str(FIX / "broken.jsonl"), "max_prompt_tokens": 50, "on_invalid": "skip"}
    d, reports = prepare_data(cfg, count_prompt_tokens=words)
    assert d["train"]["id"] == ["ok0", "ok6"] and reports["train"].invalid == 7
    with pytest.raises(DataError, match="#1 id=nofile"):
        prepare_data({**cfg, "on_invalid": "error"})


# ----------------------------------------------------------------------------- schema & configs
def test_to_record_types():
    png = io.BytesIO()
    Image.new("RGBA", (28, 28), (1, 2, 3, 255)).save(png, format="PNG")
    rec = to_record(
        {
            "id": 3,
            "images": [{"bytes": png.getvalue(), "path": None}],
            "question": "q",
            "answer": 4,
            "choices": None,
            "task": "t",
            "difficulty": None,
            "metadata": '{"a": 1}',
        }
    )
    assert rec["id"] == "3" and rec["answer"] == "4" and rec["choices"] == [] and rec["difficulty"] == 0
    assert rec["metadata"] == {"a": 1} and rec["images"][0].mode == "RGB"


def test_hydra_data_configs():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        syn = compose(overrides=["+data=synthetic"]).data
        txt = compose(overrides=["+data=synthetic_text"]).data
        loc = compose(overrides=["+data=local", f"data.path={FIX / 'local'}"]).data
        hub = compose(overrides=["+data=hub"]).data
    assert syn.task == "synthetic" and list(syn.kinds) == ["count"] and list(syn.difficulty) == [1, 2]
    assert syn.train_size == 2000 and syn.test_size == 200 and syn.modality == "image"
    assert txt.modality == "text" and txt.task == "synthetic" and txt.seed == 0
    for c in (syn, txt, loc, hub):
        assert c.max_prompt_tokens == 512 and c.on_invalid == "skip" and c.question_template == "{question}"
        assert c.system_prompt.startswith("A conversation between User and Assistant.")
        assert "<think> reasoning process here </think><answer> answer here </answer>" in c.system_prompt
    assert hub.hub_id and hub.field_map.question == "query" and set(hub.splits) == {"train", "test"}
    d = load_data(loc)
    assert len(d["train"]) == 4
    small = load_data(compose_free(txt, train_size=4, test_size=2))
    assert small["train"][0]["images"] == []


def compose_free(cfg, **kw):
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    c.update(kw)
    return OmegaConf.create(c)
