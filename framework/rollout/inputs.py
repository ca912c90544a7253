"""One processing path from records to model inputs, shared by every rollout engine and
the trainer: chat prompt -> processor -> (expand to G samples) -> + completion tokens.

Pitfalls handled here (see shared/specs/environment.md):
* Qwen2.5-VL needs ``mm_token_type_ids`` (or explicit 3D positions) in the training
  forward; we always compute explicit position ids, the same way generation does.
* ``pixel_values`` are concatenated patch rows of all images: expanding a prompt to G
  samples repeats each image's own chunk (split by ``image_grid_thw.prod(-1)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from framework.data.schema import IMAGE_PLACEHOLDER


@dataclass
class PromptBatch:
    records: list[dict]
    texts: list[str]  # chat-formatted prompt text (one per record)
    images: list[list[Any]]  # PIL images per record
    inputs: dict[
        str, torch.Tensor
    ]  # input_ids/attention_mask (left padded), pixel_values, image_grid_thw, mm_token_type_ids
    images_per_sample: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


def build_messages(record: dict, system_prompt: str | None, question_template: str = "{question}") -> list[dict]:
    """Chat messages for a record. ``<image>`` placeholders in the question mark where the
    images go; without placeholders every image goes before the text."""
    question = question_template.format(question=record["question"])
    images = record.get("images") or []
    content: list[dict] = []
    if IMAGE_PLACEHOLDER in question:
        parts = question.split(IMAGE_PLACEHOLDER)
        for i, part in enumerate(parts):
            if i > 0:
                content.append({"type": "image"})
            if part:
                content.append({"type": "text", "text": part})
    else:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": content}]


def prompt_text(bundle, record: dict, system_prompt: str | None, question_template: str = "{question}") -> str:
    msgs = build_messages(record, system_prompt, question_template)
    if not bundle.is_vl:  # text-only model: flatten the content list to a string
        for m in msgs:
            if isinstance(m["content"], list):
                m["content"] = "".join(c.get("text", "") for c in m["content"])
    return bundle.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    bundle, records: list[dict], system_prompt: str | None = None, question_template: str = "{question}"
) -> PromptBatch:
    texts = [prompt_text(bundle, r, system_prompt, question_template) for r in records]
    images = [list(r.get("images") or []) for r in records] if bundle.is_vl else [[] for _ in records]
    flat = [im.convert("RGB") for ims in images for im in ims]
    if bundle.is_vl and flat:
        enc = bundle.processor(text=texts, images=flat, padding=True, return_tensors="pt")
    else:
        enc = bundle.tokenizer(texts, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if bundle.is_vl:
        image_id = bundle.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        inputs["mm_token_type_ids"] = (enc["input_ids"] == image_id).long()
        if flat:
            inputs["pixel_values"] = enc["pixel_values"]
            inputs["image_grid_thw"] = enc["image_grid_thw"]
            check_placeholders(inputs, [len(i) for i in images], image_id, bundle.processor)
    return PromptBatch(
        records=records, texts=texts, images=images, inputs=inputs, images_per_sample=[len(i) for i in images]
    )


@dataclass(frozen=True)
class PromptEncoder:
    """records -> :class:`PromptBatch` with the run's prompt settings (``data.system_prompt``,
    ``data.question_template``): the one processing path, as an object the collector and the
    data checks are given (neither reaches into the trainer for it)."""

    bundle: Any
    system_prompt: str | None = None
    question_template: str = "{question}"

    def __call__(self, records: list[dict]) -> PromptBatch:
        return encode_prompts(self.bundle, records, self.system_prompt, self.question_template)

    def count_tokens(self, record: dict) -> int:
        """Prompt tokens of one record (image placeholders included)."""
        return int(self([record]).inputs["input_ids"].shape[1])


def check_placeholders(inputs: dict, images_per_sample: list[int], image_token_id: int, processor) -> None:
    """Per sample: number of image placeholder tokens == sum of that sample's image tokens."""
    merge = getattr(processor.image_processor, "merge_size", 2)
    per_image = (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
    counts = (inputs["input_ids"] == image_token_id).sum(-1).tolist()
    k = 0
    for i, n in enumerate(images_per_sample):
        want = sum(per_image[k : k + n])
        k += n
        if counts[i] != want:
            raise ValueError(f"sample {i}: {counts[i]} image placeholder tokens but its {n} image(s) need {want}")


def expand_inputs(inputs: dict[str, torch.Tensor], n: int, images_per_sample: list[int] | None = None) -> dict:
    """Repeat every prompt ``n`` times (sample-major: p0,p0,..,p1,p1,..). Per-row tensors are
    repeat_interleaved; ``pixel_values`` rows are split per image by ``image_grid_thw`` and each
    prompt's chunk is repeated, together with its grid rows."""
    out = {}
    B = inputs["input_ids"].shape[0]
    for k, v in inputs.items():
        if k in ("pixel_values", "image_grid_thw"):
            continue
        out[k] = v.repeat_interleave(n, dim=0)
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        ips = images_per_sample if images_per_sample is not None else [grid.shape[0] // B] * B
        rows_per_image = grid.prod(-1).tolist()
        chunks = list(torch.split(inputs["pixel_values"], rows_per_image, dim=0))
        pv, gr, k = [], [], 0
        for cnt in ips:
            sample_pv = chunks[k : k + cnt]
            sample_grid = grid[k : k + cnt]
            k += cnt
            for _ in range(n):
                pv.extend(sample_pv)
                gr.append(sample_grid)
        out["pixel_values"] = torch.cat(pv, 0) if pv else inputs["pixel_values"][:0]
        out["image_grid_thw"] = torch.cat(gr, 0)
    return out


def select_inputs(inputs: dict[str, torch.Tensor], idx: list[int], images_per_sample: list[int]) -> dict:
    """Rows ``idx`` of an (expanded) input dict, keeping the pixel rows of exactly those samples."""
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    out = {k: v[idx_t] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        rows = grid.prod(-1).tolist()
        chunks = list(torch.split(inputs["pixel_values"], rows, dim=0))
        starts = [0]
        for c in images_per_sample:
            starts.append(starts[-1] + c)
        pv, gr = [], []
        for i in idx:
            for j in range(starts[i], starts[i + 1]):
                pv.append(chunks[j])
                gr.append(grid[j : j + 1])
        if gr:
            out["pixel_values"] = torch.cat(pv, 0)
            out["image_grid_thw"] = torch.cat(gr, 0)
    return out


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens that count (up to and including the first EOS) and the truncation flag
    (no EOS within the budget). ``completion_ids``: [N, T] -> mask [N, T] float, truncated [N] bool."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    has_eos = is_eos.any(-1)
    first = torch.where(
        has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long)
    )
    pos = torch.arange(completion_ids.shape[1]).unsqueeze(0)
    mask = (pos <= first.unsqueeze(1)) & (pos < completion_ids.shape[1])
    return mask.float(), ~has_eos


def training_inputs(prompt_inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor, model) -> dict:
    """Model kwargs for the forward over prompt + completion, with explicit position ids
    computed the way generation computes them (3D rope index for Qwen-VL with images)."""
    ids = torch.cat([prompt_inputs["input_ids"], completion_ids.to(prompt_inputs["input_ids"].device)], dim=1)
    att = torch.cat([prompt_inputs["attention_mask"], completion_mask.to(prompt_inputs["attention_mask"].dtype)], dim=1)
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": att}
    core = getattr(model, "model", model)
    if "mm_token_type_ids" in prompt_inputs:
        mm = torch.cat([prompt_inputs["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)
        kw["mm_token_type_ids"] = mm
        if "pixel_values" in prompt_inputs:
            kw["pixel_values"] = prompt_inputs["pixel_values"]
            kw["image_grid_thw"] = prompt_inputs["image_grid_thw"]
            pos, _ = core.get_rope_index(ids, mm, image_grid_thw=prompt_inputs["image_grid_thw"], attention_mask=att)
            kw["position_ids"] = pos
            return kw
    kw["position_ids"] = (att.long().cumsum(-1) - 1).clamp(min=0)
    return kw


def distinct_images(inputs: dict, window: int = 16) -> tuple[list[int], list[int]]:
    """The images of ``inputs`` without repeats: ``keep`` (indices of the distinct images) and
    ``index`` (for every image, the position in ``keep`` of the image it equals). The G samples
    of a prompt hold G copies of its images one block after the other, so each image is
    compared (bit for bit, no hashing) with the last ``window`` distinct images of its size."""
    grid = inputs["image_grid_thw"]
    sizes = [tuple(g) for g in grid.tolist()]
    chunks = torch.split(inputs["pixel_values"], grid.prod(-1).tolist(), dim=0)
    keep: list[int] = []
    index: list[int] = []
    for i, c in enumerate(chunks):
        found = None
        for pos in range(len(keep) - 1, max(len(keep) - window, 0) - 1, -1):
            j = keep[pos]
            if sizes[j] == sizes[i] and torch.equal(c, chunks[j]):
                found = pos
                break
        if found is None:
            keep.append(i)
            found = len(keep) - 1
        index.append(found)
    return keep, index


def share_image_features(model, kw: dict) -> dict:
    """``kw`` (model kwargs with ``pixel_values``) with the vision tower run once per distinct
    image and its features handed to the model for every copy (``mm_encoder_outputs``): the
    same features as the tower gives each copy, and under autograd the gradient of the copies
    flows back through the one computation. Unchanged where nothing repeats or the model does
    not take precomputed features."""
    core = getattr(model, "model", model)
    if "pixel_values" not in kw or not hasattr(core, "get_image_features"):
        return kw
    import inspect

    if "mm_encoder_outputs" not in inspect.signature(core.forward).parameters:
        return kw
    keep, index = distinct_images(kw)
    if len(keep) == len(index):
        return kw
    grid = kw["image_grid_thw"]
    chunks = torch.split(kw["pixel_values"], grid.prod(-1).tolist(), dim=0)
    feats = core.get_image_features(torch.cat([chunks[i] for i in keep]), grid[keep], return_dict=True)
    per_image = feats.pooler_output
    feats.pooler_output = tuple(per_image[j] for j in index)
    out = {k: v for k, v in kw.items() if k != "pixel_values"}
    out["mm_encoder_outputs"] = {"image": feats}
    return out
