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
        model = self.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        inputs = {k: v.to(dev) for k, v in expand_inputs(prompts.inputs, n, prompts.images_per_sample).items()}
        b = self.bundle
        kw = dict(
            do_sample=sampling.temperature > 0, max_new_tokens=sampling.max_new_tokens,
            eos_token_id=b.eos_token_ids, pad_token_id=b.pad_token_id,
            return_dict_in_generate=True, output_logits=sampling.return_logprobs,
            use_cache=True,
        )
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
            logits = torch.stack(out.logits, dim=1).float().cpu()     # raw logits [N, T, V]
            if sampling.temperature > 0 and sampling.temperature != 1.0:
                logits = logits / sampling.temperature
            logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, :logits.shape[1]].unsqueeze(-1)).squeeze(-1)
            logprobs = logprobs * mask
        return Generation(completion_ids=ids, completion_mask=mask, truncated=truncated, logprobs=logprobs)
