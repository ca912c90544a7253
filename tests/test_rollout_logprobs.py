"""The pitfalls that silently corrupt RL (shared/specs/environment.md), each tested on the
tiny real Qwen2.5-VL in fp32: generation and training log-probs agree, a sample's log-probs
do not depend on its batch, pixel rows follow their image when expanding, and vision tokens
are never sampled."""

import torch
from conftest import make_image

from framework.logprobs import completion_logprobs
from framework.models.loading import load_model
from framework.rollout.base import SamplingParams
from framework.rollout.hf import HFGenerateEngine
from framework.rollout.inputs import encode_prompts, expand_inputs, select_inputs, training_inputs


def _records():
    return [
        {"question": "How many shapes are in the image?", "images": [make_image(56, 0)], "answer": "1"},
        {
            "question": "What color is the shape in the top-left cell? Answer with a longer question text here.",
            "images": [make_image(84, 1)],
            "answer": "2",
        },
        {
            "question": "<image> and <image>: how many?",
            "images": [make_image(56, 2), make_image(112, 3)],
            "answer": "3",
        },
    ]


def _logp(model, pin, ids, mask):
    kw = training_inputs(pin, ids, mask, model)
    with torch.no_grad():
        return completion_logprobs(model, kw, ids.shape[1], chunk_size=7)[0]


def test_generation_logprobs_match_training_forward(tiny_vl_path, vl_bundle):
    torch.manual_seed(0)
    model = load_model(tiny_vl_path, "float32")
    eng = HFGenerateEngine(None, vl_bundle, model)
    prompts = encode_prompts(vl_bundle, _records(), "You are a test.")
    gen = eng.generate(prompts, 3, SamplingParams(max_new_tokens=12, return_logprobs=True))
    assert gen.completion_ids.shape[0] == 9
    pin = expand_inputs(prompts.inputs, 3, prompts.images_per_sample)
    lp = _logp(model, pin, gen.completion_ids, gen.completion_mask) * gen.completion_mask
    assert (lp - gen.logprobs).abs().max() < 1e-5

    # without the 3D positions (mm_token_type_ids / explicit position ids) the forward silently disagrees
    kw = training_inputs(pin, gen.completion_ids, gen.completion_mask, model)
    kw.pop("position_ids")
    kw.pop("mm_token_type_ids")
    with torch.no_grad():
        bad = completion_logprobs(model, kw, gen.completion_ids.shape[1])[0] * gen.completion_mask
    assert (bad - gen.logprobs).abs().max() > 1e-4


def test_logprobs_do_not_depend_on_batch_companions(tiny_vl_path, vl_bundle):
    torch.manual_seed(1)
    model = load_model(tiny_vl_path, "float32")
    eng = HFGenerateEngine(None, vl_bundle, model)
    prompts = encode_prompts(vl_bundle, _records())
    gen = eng.generate(prompts, 2, SamplingParams(max_new_tokens=10))
    ips = [c for c in prompts.images_per_sample for _ in range(2)]
    pin = expand_inputs(prompts.inputs, 2, prompts.images_per_sample)
    full = _logp(model, pin, gen.completion_ids, gen.completion_mask)
    for i in range(6):
        alone_prompt = encode_prompts(vl_bundle, [_records()[i // 2]])  # no left padding at all
        m = gen.completion_mask[i : i + 1]
        T = int(m.sum())
        alone = _logp(model, alone_prompt.inputs, gen.completion_ids[i : i + 1, :T], m[:, :T])
        assert (alone[0] - full[i, :T]).abs().max() < 1e-5, i
        sub = select_inputs(pin, [i], ips)
        assert torch.equal(sub["pixel_values"], alone_prompt.inputs["pixel_values"])


def test_expand_repeats_each_images_pixel_rows(vl_bundle):
    prompts = encode_prompts(vl_bundle, _records())
    rows = prompts.inputs["image_grid_thw"].prod(-1).tolist()  # per image: 16, 36, 16, 64
    chunks = torch.split(prompts.inputs["pixel_values"], rows)
    out = expand_inputs(prompts.inputs, 3, prompts.images_per_sample)
    want = [chunks[0]] * 3 + [chunks[1]] * 3 + [chunks[2], chunks[3]] * 3
    assert torch.equal(out["pixel_values"], torch.cat(want))
    assert out["image_grid_thw"].shape[0] == 12
    assert out["input_ids"].shape[0] == 9
    assert torch.equal(out["input_ids"][3], prompts.inputs["input_ids"][1])


def test_vision_tokens_are_never_sampled(tiny_vl_path, vl_bundle):
    model = load_model(tiny_vl_path, "float32")
    with torch.no_grad():  # make <|image_pad|> and friends by far the most likely next tokens
        emb = model.get_output_embeddings().weight
        for t in vl_bundle.vision_token_ids:
            emb[t] *= 50
    eng = HFGenerateEngine(None, vl_bundle, model)
    prompts = encode_prompts(vl_bundle, _records()[:2])
    gen = eng.generate(prompts, 4, SamplingParams(max_new_tokens=8))
    assert not torch.isin(gen.completion_ids, torch.tensor(vl_bundle.vision_token_ids)).any()
    pin = expand_inputs(prompts.inputs, 4, prompts.images_per_sample)
    _logp(model, pin, gen.completion_ids, gen.completion_mask)  # would raise on a sampled image token


def test_chunked_logprobs_equal_full_logits_and_gradients(tiny_vl_path, vl_bundle):
    model = load_model(tiny_vl_path, "float32")
    prompts = encode_prompts(vl_bundle, _records()[:2])
    ids = torch.randint(20, 200, (2, 9))
    mask = torch.ones(2, 9)
    kw = training_inputs(prompts.inputs, ids, mask, model)
    lp, ent = completion_logprobs(model, kw, 9, chunk_size=4)
    lp.sum().backward()
    g1 = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    logits = model(**kw).logits[:, -10:-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref.sum().backward()
    g2 = model.get_output_embeddings().weight.grad
    assert (lp - ref).abs().max() < 1e-5
    assert (g1 - g2).abs().max() < 1e-5
    p = torch.softmax(logits, -1)
    assert (ent - (-(p * torch.log(p)).sum(-1))).abs().max() < 1e-4
