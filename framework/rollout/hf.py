"""The embedded default engine: transformers ``generate`` on the policy module itself, so
its weights are always the current ones (``sync_weights`` has nothing to do)."""

from __future__ import annotations

import torch

from framework.registry import ROLLOUT_ENGINES
from framework.rollout.base import Generation, RolloutEngine, SamplingParams
from framework.rollout.inputs import completion_mask, expand_inputs


@ROLLOUT_ENGINES.register("hf")
class HFGenerateEngine(RolloutEngine):
    name = "hf"

    @torch.no_grad()
    def generate(self, prompts, n: int, sampling: SamplingParams) -> Generation:
        if sampling.seeds is not None:
            return self._generate_seeded(prompts, n, sampling)
        model = self.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        inputs = {k: v.to(dev) for k, v in expand_inputs(prompts.inputs, n, prompts.images_per_sample).items()}
        b = self.bundle
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
            kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        if b.vision_token_ids:  # a sampled vision token would crash the training forward
            kw["suppress_tokens"] = b.vision_token_ids
        if sampling.stop:
            kw["stop_strings"] = sampling.stop
            kw["tokenizer"] = b.tokenizer
        try:
            out = model.generate(**inputs, **kw)
        finally:
            model.train(was_training)
        P = inputs["input_ids"].shape[1]
        ids = out.sequences[:, P:].cpu()
        if ids.shape[1] == 0:
            ids = torch.full((ids.shape[0], 1), b.pad_token_id, dtype=torch.long)
        mask, truncated = completion_mask(ids, b.eos_token_ids)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, b.pad_token_id))
        logprobs = None
        if sampling.return_logprobs:
            logits = torch.stack(out.logits, dim=1).float().cpu()  # raw logits [N, T, V]
            if sampling.temperature > 0 and sampling.temperature != 1.0:
                logits = logits / sampling.temperature
            logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, : logits.shape[1]].unsqueeze(-1)).squeeze(-1)
            logprobs = logprobs * mask
        return Generation(completion_ids=ids, completion_mask=mask, truncated=truncated, logprobs=logprobs)

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
