"""The embedded default engine: the policy module itself samples, so its weights are always
the current ones (``sync_weights`` has nothing to do).

For the Qwen2 / Qwen2-VL / Qwen2.5-VL models the framework trains, a lean decode loop
(:meth:`HFGenerateEngine._decode`) does the work of transformers ``generate`` without its
per-call and per-token overhead, and does each prompt's work once for its ``n`` samples: the
prompt (and the vision tower over its images) is run at batch = number of prompts, its KV
cache and next-token logits are repeated ``n`` times, and the ``n`` samples decode from there.
It samples with transformers' own logits warpers (temperature, top-k, top-p) after the
suppression of vision tokens, in ``generate``'s order, and ``torch.multinomial`` on the same
RNG stream, so with a fixed seed it draws the same completions as ``generate``
(tests/test_shared_prefill.py).
Stop strings, FSDP-synced generation and other model types use ``generate``, with its
generation config built once.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from framework.registry import ROLLOUT_ENGINES
from framework.rollout.base import Generation, RolloutEngine, SamplingParams
from framework.rollout.inputs import completion_mask, expand_inputs

# model types whose forward takes explicit (3D for the VL models) position ids and a KV cache
# the way the decode loop drives it
LEAN_MODEL_TYPES = ("qwen2", "qwen2_vl", "qwen2_5_vl")


@ROLLOUT_ENGINES.register("hf")
class HFGenerateEngine(RolloutEngine):
    name = "hf"
    lean = True  # the decode loop where it applies (False: always transformers generate; for comparisons)

    @torch.no_grad()
    def generate(self, prompts, n: int, sampling: SamplingParams) -> Generation:
        if sampling.seeds is not None:
            return self._generate_seeded(prompts, n, sampling)
        model = self.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        b = self.bundle
        try:
            if self._lean(sampling):
                ids, step_logits = self._decode(prompts.inputs, n, sampling, dev)
            else:
                ids, step_logits = self._generate_hf(prompts, n, sampling, dev)
        finally:
            model.train(was_training)
        if ids.shape[1] == 0:
            ids = torch.full((ids.shape[0], 1), b.pad_token_id, dtype=torch.long)
        mask, truncated = completion_mask(ids, b.eos_token_ids)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, b.pad_token_id))
        logprobs = None
        if sampling.return_logprobs:
            logits = torch.stack(step_logits, dim=1).float().cpu()  # raw logits [N, T, V]
            if sampling.temperature > 0 and sampling.temperature != 1.0:
                logits = logits / sampling.temperature
            logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, : logits.shape[1]].unsqueeze(-1)).squeeze(-1)
            logprobs = logprobs * mask
        return Generation(completion_ids=ids, completion_mask=mask, truncated=truncated, logprobs=logprobs)

    def _lean(self, sampling: SamplingParams) -> bool:
        """Whether the decode loop serves this call (else transformers ``generate``)."""
        mt = getattr(getattr(self.model, "config", None), "model_type", None)
        return mt in LEAN_MODEL_TYPES and not sampling.stop and not self._synced() and self.lean

    def _processors(self, sampling: SamplingParams, vocab: int, dev) -> list:
        """transformers' logits processors, in ``generate``'s order, for these sampling settings,
        as a list of ``scores -> scores`` (called directly: ``LogitsProcessorList`` inspects
        every processor's signature on every call). The vision-token suppression is
        ``SuppressTokensLogitsProcessor``'s ``where(mask, -inf, scores)`` with its mask built once."""
        key = (sampling.temperature, sampling.top_p, sampling.top_k, vocab, str(dev))
        cached = getattr(self, "_procs", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        procs = []
        if self.bundle.vision_token_ids:  # a sampled vision token would crash the training forward
            mask = torch.isin(torch.arange(vocab, device=dev), torch.tensor(self.bundle.vision_token_ids, device=dev))
            procs.append(lambda scores: torch.where(mask, -float("inf"), scores))
        warpers = LogitsProcessorList()
        if sampling.temperature > 0:
            if sampling.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        procs += [lambda scores, w=w: w(None, scores) for w in warpers]
        self._procs = (key, procs)
        return procs

    def _decode(self, prompt_inputs: dict, n: int, sampling: SamplingParams, dev):
        """Prefill each prompt once, repeat its KV cache and next-token logits ``n`` times, then
        sample token by token. Returns the completion ids [B n, T] (CPU) and, for
        ``return_logprobs``, the raw logits of every step."""
        model, b = self.model, self.bundle
        inputs = {k: v.to(dev) for k, v in prompt_inputs.items()}
        ids, att = inputs["input_ids"], inputs["attention_mask"]
        kw = {"input_ids": ids, "attention_mask": att, "use_cache": True}
        if "pixel_values" in inputs and "mm_token_type_ids" in inputs:  # 3D rope positions, as the trainer's
            pos, _ = model.model.get_rope_index(
                ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=att
            )
            kw.update(
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
            )
            last = pos.amax(dim=(0, 2))  # [B] the prompt's last (largest) position
        else:
            pos = (att.long().cumsum(-1) - 1).clamp(min=0)
            last = pos.amax(dim=1)
        kw["position_ids"] = pos
        P, T = ids.shape[1], sampling.max_new_tokens
        out = model(**kw, logits_to_keep=1)
        cache = out.past_key_values
        # the prompt's KV cache shared by its n samples (a static cache measured slower here: its
        # attention runs over all P + T slots at every step)
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].repeat_interleave(n, dim=0)
        att = att.repeat_interleave(n, dim=0)
        full_att = torch.cat([att, att.new_ones(att.shape[0], T)], dim=1)  # sliced per step, not grown
        next_pos = last.repeat_interleave(n) + 1
        N = logits.shape[0]
        procs = self._processors(sampling, logits.shape[-1], dev)
        sample = sampling.temperature > 0
        eos = torch.tensor(b.eos_token_ids, device=dev)
        pad = torch.tensor(b.pad_token_id, device=dev)
        unfinished = torch.ones(N, dtype=torch.bool, device=dev)
        tokens, step_logits = [], []
        for t in range(sampling.max_new_tokens):
            scores = logits.to(dtype=torch.float32, copy=True)
            if sampling.return_logprobs:
                step_logits.append(scores)
            for proc in procs:
                scores = proc(scores)
            if sample:
                tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tok = torch.argmax(scores, dim=-1)
            tok = torch.where(unfinished, tok, pad)  # finished samples are padded, as generate pads
            tokens.append(tok)
            unfinished &= ~torch.isin(tok, eos)
            if t + 1 == sampling.max_new_tokens or not bool(unfinished.any()):
                break
            p = (next_pos + t).view(N, 1)
            if pos.dim() == 3:
                p = p.unsqueeze(0).expand(3, N, 1)
            logits = model(
                input_ids=tok.unsqueeze(1),
                attention_mask=full_att[:, : P + t + 1],
                position_ids=p,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
        ids = torch.stack(tokens, dim=1).cpu() if tokens else torch.zeros(N, 0, dtype=torch.long)
        return ids, step_logits

    def _generate_hf(self, prompts, n: int, sampling: SamplingParams, dev):
        """transformers ``generate`` over the prompts repeated n times."""
        model, b = self.model, self.bundle
        inputs = {k: v.to(dev) for k, v in expand_inputs(prompts.inputs, n, prompts.images_per_sample).items()}
        kw = dict(
            do_sample=sampling.temperature > 0,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=b.eos_token_ids,
            pad_token_id=b.pad_token_id,
            return_dict_in_generate=True,
            output_logits=sampling.return_logprobs,
            use_cache=True,
        )
        if self._synced():  # FSDP: every forward is a collective; ranks that finish early keep stepping
            kw["synced_gpus"] = True
        if sampling.temperature > 0:
            # top_k=0 (not None): None would let generate fall back to its default top-k of 50
            kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if b.vision_token_ids:  # a sampled vision token would crash the training forward
            kw["suppress_tokens"] = b.vision_token_ids
        if sampling.stop:
            kw["stop_strings"] = sampling.stop
            kw["tokenizer"] = b.tokenizer
        gen_kw = {k: kw.pop(k) for k in list(kw) if k not in ("synced_gpus", "tokenizer")}
        key = repr(sorted(gen_kw.items()))
        cached = getattr(self, "_gen_config", None)
        if cached is None or cached[0] != key:  # built once, not on every call
            cached = self._gen_config = (key, GenerationConfig(**gen_kw))
        out = model.generate(**inputs, generation_config=cached[1], **kw)
        P = inputs["input_ids"].shape[1]
        return out.sequences[:, P:].cpu(), list(out.logits) if sampling.return_logprobs else []

    def _synced(self) -> bool:
        if not hasattr(self, "_synced_flag"):
            from framework.distributed import is_sharded, world

            self._synced_flag = world()[1] > 1 and is_sharded(self.model)
        return self._synced_flag

    def _generate_seeded(self, prompts, n: int, sampling: SamplingParams) -> Generation:
        """Each prompt's n completions drawn alone from its own seed: the samples do not depend
        on which prompts share the batch, the batch size or the number of ranks (slower)."""
        from dataclasses import replace

        from framework.rollout.inputs import select_inputs

        outs = []
        for i, seed in enumerate(sampling.seeds):
            sub = replace(
                prompts,
                records=prompts.records[i : i + 1],
                texts=prompts.texts[i : i + 1],
                images=prompts.images[i : i + 1],
                images_per_sample=prompts.images_per_sample[i : i + 1],
                inputs=_strip_left_pad(select_inputs(prompts.inputs, [i], prompts.images_per_sample)),
            )
            rng = torch.get_rng_state()
            torch.manual_seed(seed)
            try:
                outs.append(self.generate(sub, n, replace(sampling, seeds=None)))
            finally:
                torch.set_rng_state(rng)
        T = max(o.completion_ids.shape[1] for o in outs)
        pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
        return Generation(
            completion_ids=torch.cat([pad(o.completion_ids, self.bundle.pad_token_id) for o in outs]),
            completion_mask=torch.cat([pad(o.completion_mask, 0.0) for o in outs]),
            truncated=torch.cat([o.truncated for o in outs]),
            logprobs=torch.cat([pad(o.logprobs, 0.0) for o in outs]) if outs[0].logprobs is not None else None,
        )


def _strip_left_pad(inputs: dict) -> dict:
    """One prompt's inputs without its left padding (as if it had been encoded alone)."""
    keep = inputs["attention_mask"][0].bool()
    start = int(keep.float().argmax())
    return {
        k: (v[:, start:] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v) for k, v in inputs.items()
    }
