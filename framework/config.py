"""Config schemas for the run's sections, checked at start-up before any model loads.

Each section is merged onto its dataclass with OmegaConf, so an unknown key or a value of
the wrong type fails with the key's full name; ``validate`` methods check ranges and
allowed values. The algorithm section is validated by the algorithm's own ``Config``
(see ``algorithms/base.py``) so that plugins bring their own options.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from framework.errors import ConfigError  # noqa: F401  (raised here, importable from here)


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {sorted(allowed)}")


def _positive(key: str, value, *, zero_ok: bool = False) -> None:
    if value is None or (value < 0 if zero_ok else value <= 0):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if zero_ok else '> 0'}")


def _check_attn_implementation(key: str, value) -> None:
    """transformers' attention implementations (``eager``, ``sdpa``, ``flash_attention_2``, ...;
    a Hub kernel ``org/repo`` is passed through), checked before any model loads."""
    if value is None or value in ("eager", "sdpa") or (isinstance(value, str) and "/" in value):
        return
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        allowed = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    except Exception:  # pragma: no cover - an old or broken transformers: it decides when the model loads
        return
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not an attention implementation; choose one of {', '.join(allowed)}")


def _check_strategy(key: str, value) -> None:
    """``fsdp`` (ours, framework/distributed.py) or a strategy name Lightning registers."""
    if value in ("auto", "ddp", "fsdp"):
        return
    try:
        from lightning.pytorch.strategies import StrategyRegistry

        allowed = sorted({"auto", "fsdp", *StrategyRegistry.available_strategies()})
    except Exception:  # pragma: no cover - Lightning decides when the trainer starts
        return
    if value not in allowed:
        raise ConfigError(
            f"{key}={value!r} is not a strategy; use auto (one device), ddp or fsdp (trainer=ddp, trainer=fsdp), "
            "or another name Lightning registers (ddp_spawn, ddp_find_unused_parameters_true, deepspeed, ...)"
        )


# peft's initialisations that leave the base weights as they are (the others, pissa, olora, corda,
# loftq, eva, mica, rewrite them, so disabled adapters would no longer be the reference model)
LORA_INITS = (True, False, "gaussian", "orthogonal")


@dataclass(frozen=True)  # validated once at start, then read only
class LoraOptions:
    """``model.lora``: train peft LoRA adapters instead of the full weights (framework/models/lora.py).
    The names are peft's (``LoraConfig``): r, lora_alpha (``alpha``), lora_dropout (``dropout``),
    target_modules, init_lora_weights. The frozen reference is the policy with its adapters disabled."""

    enabled: bool = False
    r: int = 16  # rank of the adapters
    alpha: float = 32.0  # peft's lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # peft's lora_dropout (0: the rollout policy and the trained one are the same function)
    # all-linear (every linear layer of the language model, not the LM head), a list of module
    # names (matched as name suffixes, e.g. [q_proj, v_proj]) or a regular expression (full match)
    target_modules: Any = "all-linear"
    vision: bool = False  # adapters on the vision tower's linear layers too (false: it stays frozen as it is)
    init_lora_weights: Any = True  # true (B = 0: the adapted model starts as the base) | false | gaussian | orthogonal
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # a peft adapter folder (adapter_config.json) to continue from: its r/alpha/targets win, and the
    # KL reference stays the base model (the adapters disabled), not the adapter it starts from
    path: Optional[str] = None
    export_merged: bool = False  # checkpoints also hold merged/: the base with the adapters merged (from_pretrained)

    def validate(self, p: str) -> None:
        if not self.enabled:
            default = LoraOptions()
            changed = [
                f.name
                for f in fields(self)
                if f.name != "enabled" and getattr(self, f.name) != getattr(default, f.name)
            ]
            if changed:
                raise ConfigError(
                    f"{p}.{changed[0]}={getattr(self, changed[0])!r} is set but {p}.enabled=false, so it would do "
                    f"nothing: add {p}.enabled=true to train LoRA adapters (or drop {p}.{changed[0]})"
                )
            return
        if self.path:  # the adapter folder's own adapter_config.json decides these: setting one would be ignored
            default = LoraOptions()
            from_folder = ("r", "alpha", "dropout", "target_modules", "vision", "init_lora_weights", "use_rslora")
            changed = [k for k in from_folder if getattr(self, k) != getattr(default, k)]
            if changed:
                raise ConfigError(
                    f"{p}.{changed[0]}={getattr(self, changed[0])!r} is set but {p}.path={self.path} brings its own "
                    f"(its adapter_config.json), so it would be ignored: drop {p}.{changed[0]}, or drop {p}.path "
                    "to train new adapters"
                )
        if not _is_int(self.r) or self.r <= 0:
            raise ConfigError(f"{p}.r={self.r!r} must be an integer > 0 (the adapters' rank, e.g. 16 or 64)")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"{p}.alpha={self.alpha!r} must be > 0 (peft's lora_alpha; the scale is alpha / r)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{p}.dropout={self.dropout!r} must be in [0, 1)")
        _str_or_str_list(f"{p}.target_modules", self.target_modules, none_ok=False)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:  # peft matches a string as a regular expression (re.fullmatch on every module name)
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(
                    f"{p}.target_modules={self.target_modules!r} is not a valid regular expression ({e}); give a "
                    "regular expression, a list of module names ([q_proj,v_proj]) or all-linear"
                ) from None
        if self.init_lora_weights not in LORA_INITS:
            raise ConfigError(
                f"{p}.init_lora_weights={self.init_lora_weights!r} is not allowed; choose true, false, gaussian or "
                "orthogonal (pissa, olora, corda, loftq, eva and mica rewrite the base weights, so the reference "
                "could no longer be the base model with the adapters disabled)"
            )


@dataclass(frozen=True)  # validated once at start, then read only
class ModelConfig:
    name_or_path: str = "tiny:qwen2_5_vl-sft"
    dtype: str = "float32"  # compute dtype of the forward/backward passes (and the reference model)
    # dtype of the trained weights and the optimizer state. float32 with dtype=bfloat16 is bf16
    # mixed precision with fp32 master weights; master_dtype=bfloat16 is pure bf16 training (a
    # memory trade: small updates are lost to bf16 rounding at the papers' learning rates)
    master_dtype: str = "float32"
    export_dtype: Optional[str] = None  # dtype of the policy/ export in checkpoints (null: model.dtype)
    gradient_checkpointing: bool = False
    freeze_vision_tower: bool = False
    attn_implementation: Optional[str] = "sdpa"
    # recommended learning rate for this model (optim.lr defaults to it); the default is the tiny
    # model's: a 0.6M-parameter model needs a far larger lr than a 3B one (1e-3 collapses it)
    lr: float = 3e-4
    lora: LoraOptions = field(default_factory=LoraOptions)  # LoRA adapters instead of the full weights

    def validate(self, p: str) -> None:
        self.lora.validate(f"{p}.lora")
        if self.lora.enabled and self.lora.vision and self.freeze_vision_tower:
            raise ConfigError(
                f"{p}.lora.vision=true trains adapters on the vision tower but {p}.freeze_vision_tower=true "
                f"freezes it: drop one of them ({p}.lora.vision=false keeps the vision tower as it is)"
            )
        _check_attn_implementation(f"{p}.attn_implementation", self.attn_implementation)
        dtypes = {"float32", "fp32", "bfloat16", "bf16", "float16", "fp16"}
        _choice(f"{p}.dtype", self.dtype, dtypes)
        _choice(f"{p}.master_dtype", self.master_dtype, dtypes)
        if self.export_dtype is not None:
            _choice(f"{p}.export_dtype", self.export_dtype, dtypes)
        _positive(f"{p}.lr", self.lr)


@dataclass(frozen=True)  # validated once at start, then read only
class RolloutConfig:
    engine: str = "hf"
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0  # < 1 or top_k > 0: the sampler's log-probs are those of the truncated distribution
    top_k: int = 0  # 0: off
    max_new_tokens: int = 24  # the tiny default's budget; real-size models set their own (configs/model/)
    stop: Optional[list[str]] = None
    eval_temperature: float = 0.0  # greedy evaluation
    seed_per_prompt: bool = False  # sample each prompt from its own seed (batch/rank independent)
    # vLLM options (ignored by the hf engine)
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    enforce_eager: bool = False
    sleep: bool = False
    dtype: Optional[str] = None  # null: model.dtype (the compute dtype)
    logp_diff_warn: float = 0.5  # warn when the sampler/trainer log-prob gap exceeds this
    tis_cap: Optional[float] = None  # truncated importance-sampling correction cap (off: null)

    def validate(self, p: str) -> None:
        if self.group_size < 2:
            raise ConfigError(
                f"{p}.group_size={self.group_size} must be >= 2 (group-relative advantages need at least 2 samples per prompt)"
            )
        _positive(f"{p}.temperature", self.temperature, zero_ok=True)
        _positive(f"{p}.eval_temperature", self.eval_temperature, zero_ok=True)  # 0: greedy
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{p}.top_p={self.top_p} must be in (0, 1]")
        _positive(f"{p}.top_k", self.top_k, zero_ok=True)
        _positive(f"{p}.max_new_tokens", self.max_new_tokens)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{p}.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        _positive(f"{p}.tensor_parallel_size", self.tensor_parallel_size)
        _positive(f"{p}.max_model_len", self.max_model_len)
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ConfigError(f"{p}.tis_cap={self.tis_cap} must be >= 1 (a cap on pi_trainer/pi_sampler; null: off)")


@dataclass(frozen=True)  # validated once at start, then read only
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant"  # constant | cosine | linear
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # cosine/linear decay to lr * min_lr_ratio
    grad_clip: Optional[float] = 1.0

    def validate(self, p: str) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{p}.lr={self.lr} must be a finite number > 0")
        _choice(f"{p}.scheduler", self.scheduler, {"constant", "cosine", "linear"})
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{p}.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:  # a negative ratio would be a negative lr: gradient ascent
            raise ConfigError(
                f"{p}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1] (the final lr is lr x min_lr_ratio)"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{p}.betas={self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"{p}.eps={self.eps} must be a finite number > 0 (e.g. 1e-8)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"{p}.weight_decay={self.weight_decay} must be >= 0")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            # a negative max norm would flip the gradients: silent gradient ascent
            raise ConfigError(f"{p}.grad_clip={self.grad_clip} must be > 0, or null for no clipping")


@dataclass(frozen=True)  # validated once at start, then read only
class FSDPConfig:
    """``trainer.fsdp``: how ``trainer.strategy=fsdp`` shards (see framework/distributed.py)."""

    mixed_precision: Optional[str] = (
        "bf16"  # bf16 | fp16 | null (compute in model.dtype); master weights: model.master_dtype
    )
    activation_checkpointing: bool = True  # recompute each block in the backward
    cpu_offload: bool = False  # parameters, gradients and optimizer state live on the CPU
    reshard_after_forward: bool = True  # FULL_SHARD (false: SHARD_GRAD_OP, faster, more memory)
    sharded_checkpoint: bool = True  # one shard per rank (resumes on any device count); false: full on rank 0
    wrap: Optional[list[str]] = None  # block classes to shard (null: the model's _no_split_modules)

    def validate(self, p: str) -> None:
        if self.mixed_precision is not None:
            _choice(f"{p}.mixed_precision", self.mixed_precision, {"bf16", "fp16"})


@dataclass(frozen=True)  # validated once at start, then read only
class TrainerConfig:
    max_steps: int = 80  # RL steps (rollout batches)
    prompts_per_step: int = 16  # prompts per rollout batch (global, over all ranks); x group_size completions
    micro_batch_size: int = 64  # completions per forward/backward (gradient accumulation inside a step)
    num_mini_batches: int = 1  # optimizer steps per rollout batch and ppo epoch (> 1: clipped off-policy steps)
    accelerator: str = "auto"  # auto (a GPU when there is one) | cpu | gpu
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Optional[str] = None  # null: derived from model.dtype / model.master_dtype (see resolve_precision)
    eval_every: int = 10  # RL steps between evaluations (0: only start and end)
    eval_size: int = 200  # test records used for evaluation
    eval_batch_size: int = 100
    eval_pass_k: int = 1  # k of eval/pass@k (sampled at the rollout temperature)
    eval_samples: Optional[int] = None  # n samples per prompt for pass@k / accuracy_sampled (null: = k)
    save_every: int = 10  # RL steps between checkpoints (0: only at the end, which is always written)
    keep_last: int = 2  # checkpoints kept: the newest keep_last (the final one always; 0: all)
    log_every: int = 1
    log_completions_every: int = 10  # sample table to W&B every N steps (0: off)
    on_nonfinite: str = "error"  # error | skip
    logprob_chunk_size: int = 1024
    num_workers: int = 0
    progress_bar: bool = True
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def validate(self, p: str) -> None:
        self.fsdp.validate(f"{p}.fsdp")
        _check_strategy(f"{p}.strategy", self.strategy)
        if self.strategy == "fsdp" and self.precision is not None and str(self.precision) not in ("32-true", "32"):
            raise ConfigError(
                f"{p}.precision={self.precision!r} with trainer.strategy=fsdp: keep 32-true and set the "
                f"compute dtype with {p}.fsdp.mixed_precision=bf16 (the weights' dtype is model.master_dtype)"
            )
        if self.strategy == "fsdp" and not (isinstance(self.devices, int) and self.devices > 0):
            raise ConfigError(
                f"{p}.devices={self.devices!r}: trainer.strategy=fsdp needs the number of devices per "
                "node as a positive integer (e.g. trainer.devices=8)"
            )
        for k in (
            "max_steps",
            "prompts_per_step",
            "micro_batch_size",
            "num_mini_batches",
            "eval_size",
            "eval_batch_size",
            "eval_pass_k",
            "log_every",
            "logprob_chunk_size",
            "num_nodes",
        ):
            _positive(f"{p}.{k}", getattr(self, k))
        for k in ("eval_every", "save_every", "keep_last", "log_completions_every", "num_workers"):
            _positive(f"{p}.{k}", getattr(self, k), zero_ok=True)
        _choice(f"{p}.on_nonfinite", self.on_nonfinite, {"error", "skip"})
        if self.eval_samples is not None and self.eval_samples < self.eval_pass_k:
            raise ConfigError(
                f"{p}.eval_samples={self.eval_samples} must be >= {p}.eval_pass_k={self.eval_pass_k} "
                "(pass@k needs at least k samples per prompt; null uses k)"
            )
        ranks = self.devices * self.num_nodes if isinstance(self.devices, int) and self.devices > 0 else 1
        if self.prompts_per_step % ranks == 0 and (self.prompts_per_step // ranks) % self.num_mini_batches:
            raise ConfigError(
                f"{p}.prompts_per_step={self.prompts_per_step} over {ranks} rank(s) gives "
                f"{self.prompts_per_step // ranks} prompt groups per rank, which do not split into "
                f"{p}.num_mini_batches={self.num_mini_batches} equal mini-batches: make prompts_per_step a "
                f"multiple of {ranks * self.num_mini_batches} (ranks x num_mini_batches)"
            )
        if self.prompts_per_step % self.num_mini_batches:
            raise ConfigError(
                f"{p}.prompts_per_step={self.prompts_per_step} must be divisible by "
                f"{p}.num_mini_batches={self.num_mini_batches} (groups are not split)"
            )


@dataclass(frozen=True)  # validated once at start, then read only
class LoggerConfig:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "apo-rl"
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    csv: bool = True

    def validate(self, p: str) -> None:
        _choice(f"{p}.wandb_mode", self.wandb_mode, {"offline", "online", "disabled"})


DEFAULT_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The assistant first thinks about the reasoning process "
    "and then provides the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> "
    "answer here </answer>."
)
_DATA_SCHEMA_FIELDS = ("id", "images", "question", "answer", "choices", "task", "difficulty", "metadata")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_or_str_list(key: str, value, *, none_ok: bool = True) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(x, str) for x in value)):
        return
    raise ConfigError(f"{key}={value!r} must be a string or a list of strings{' (or null)' if none_ok else ''}")


@dataclass(frozen=True)  # validated once at start, then read only
class DataConfig:
    """``data``: the generic options (all sources) and those of the built-in tasks
    (framework/data/: ``synthetic``, ``local``, ``hub`` and the benchmark adapters). A plugin
    task with options of its own declares them as a dataclass ``Config`` attribute of its
    function (``@TASKS.register("mine") def build(cfg): ...; build.Config = MyOptions``)."""

    task: Optional[str] = None  # a name in framework.registry.TASKS
    # ---- generic options (read by the trainer and benchmarks.evaluate)
    max_prompt_tokens: int = 512  # longer prompts are invalid records
    on_invalid: str = "skip"  # skip (drop and count them, every one in data_report.jsonl) | error (stop)
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT
    question_template: str = "{question}"
    max_image_bytes: int = 64 * 2**20  # image files above this size are refused unread
    max_record_bytes: int = 2**20  # longer records (a JSONL line, inline images included) are refused unread
    max_image_pixels: int = 36_000_000  # larger images (width x height, read from the header) are refused undecoded
    allow_absolute_paths: bool = False  # true: image paths may be absolute or lead out of the data folder
    control_tokens: str = "error"  # chat control tokens (<|im_end|>, ...) in record text: error | escape
    # ---- synthetic (framework/data/synthetic.py)
    seed: int = 0  # synthetic: the generator's seed; local: the seed of the test_size hold-out split
    train_size: int = 2000
    test_size: Any = None  # synthetic: test records (null: 200); local: hold out this many (or this fraction)
    difficulty: Any = field(default_factory=lambda: [1])  # a level or a list of levels (1, 2, 3)
    kinds: Any = None  # a kind or a list (null: all)
    modality: str = "image"  # image | text
    # counting kinds: every count equally frequent over the levels (configs/data/synthetic.yaml: true)
    balanced_answers: bool = False
    # ---- local files (task: local)
    path: Optional[str] = None
    split_files: dict[str, Any] = field(default_factory=dict)
    # ---- hub datasets (task: hub and the benchmark adapters)
    hub_id: Optional[str] = None
    config_name: Any = None  # a config name or a list of them (concatenated)
    revision: Optional[str] = None
    splits: dict[str, Optional[str]] = field(default_factory=dict)  # empty: {train: train, test: test}
    # ---- local and hub
    field_map: dict[str, Optional[str]] = field(default_factory=dict)
    metadata_columns: list[str] = field(default_factory=list)
    task_name: Optional[str] = None

    def validate(self, p: str) -> None:
        if not _is_int(self.max_prompt_tokens) or self.max_prompt_tokens <= 0:
            raise ConfigError(f"{p}.max_prompt_tokens={self.max_prompt_tokens!r} must be > 0")
        if not _is_int(self.max_image_bytes) or self.max_image_bytes <= 0:
            raise ConfigError(f"{p}.max_image_bytes={self.max_image_bytes!r} must be > 0 (bytes)")
        for k in ("max_record_bytes", "max_image_pixels"):
            if not _is_int(getattr(self, k)) or getattr(self, k) <= 0:
                raise ConfigError(f"{p}.{k}={getattr(self, k)!r} must be an integer > 0")
        _choice(f"{p}.on_invalid", self.on_invalid, {"skip", "error"})
        _choice(f"{p}.control_tokens", self.control_tokens, {"error", "escape"})
        _choice(f"{p}.modality", self.modality, {"image", "text"})
        try:
            self.question_template.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"{p}.question_template={self.question_template!r} is not a valid template ({type(e).__name__}: {e}); "
                "it may use only {question} (write literal braces as {{ }})"
            ) from None
        if "{question}" not in self.question_template:
            raise ConfigError(f"{p}.question_template={self.question_template!r} must contain {{question}}")
        _positive(f"{p}.seed", self.seed, zero_ok=True)
        _positive(f"{p}.train_size", self.train_size, zero_ok=True)
        if self.test_size is not None and (
            isinstance(self.test_size, bool) or not isinstance(self.test_size, (int, float)) or self.test_size < 0
        ):
            raise ConfigError(f"{p}.test_size={self.test_size!r} must be a number >= 0 (a count or a fraction) or null")
        if self.task == "synthetic":
            self._validate_synthetic(p)
        if self.task == "local" and not self.path:
            raise ConfigError(f"{p}.path is not set: {p}.task=local reads a data file or a folder ({p}.path=/data/dir)")
        if self.task == "hub" and not self.hub_id:
            raise ConfigError(f"{p}.hub_id must be set for {p}.task=hub (e.g. data.hub_id=lmms-lab/MathVista)")
        for k, v in self.split_files.items():
            _str_or_str_list(f"{p}.split_files.{k}", v, none_ok=False)
        _str_or_str_list(f"{p}.config_name", self.config_name)
        bad = [k for k in self.field_map if k not in _DATA_SCHEMA_FIELDS]
        if bad:
            raise ConfigError(
                f"{p}.field_map.{bad[0]} is not a schema field; schema fields: {', '.join(_DATA_SCHEMA_FIELDS)}"
            )

    def _validate_synthetic(self, p: str) -> None:
        from framework.data.synthetic import GRID_SIZE, KINDS

        levels = self.difficulty if isinstance(self.difficulty, list) else [self.difficulty]
        if not levels or any(not _is_int(d) or d not in GRID_SIZE for d in levels):
            raise ConfigError(f"{p}.difficulty={self.difficulty!r}: choose levels from {sorted(GRID_SIZE)}")
        if self.kinds is not None:
            kinds = self.kinds if isinstance(self.kinds, list) else [self.kinds]
            if not kinds or any(k not in KINDS for k in kinds):
                raise ConfigError(f"{p}.kinds={self.kinds!r}: choose kinds from {list(KINDS)}")
        if self.test_size is not None and not _is_int(self.test_size):
            raise ConfigError(f"{p}.test_size={self.test_size!r} must be an integer count for {p}.task=synthetic")

    def options(self, composed: Optional[dict] = None) -> dict[str, Any]:
        """The section as the plain dict the data loaders take (``framework.data``): the validated
        values, and a plugin task's own options (the keys of ``composed`` that are not fields)."""
        own = asdict(self)
        return {**{k: v for k, v in (composed or {}).items() if k not in own}, **own}

    @classmethod
    def check_config(cls, cfg: dict, prefix: str = "data") -> DataConfig:
        """The typed ``data`` section: :func:`check_section`, with a plugin task's own options
        (its ``Config``) checked by that dataclass, and an unset ``???`` value named."""
        cfg = dict(cfg or {})
        for k, v in cfg.items():
            if isinstance(v, str) and v == "???":
                raise ConfigError(f"{prefix}.{k} is not set; give it on the command line ({prefix}.{k}=...)")
        extra = _task_options(cfg.get("task"))
        if extra is not None:
            own = {f.name for f in fields(cls)}
            mine = {k: v for k, v in cfg.items() if k not in own}
            check_section(mine, extra, prefix)
            cfg = {k: v for k, v in cfg.items() if k in own}
        return check_section(cfg, cls, prefix)


def data_section(name: str) -> DataConfig:
    """The typed ``data`` section that ``apo-rl data=<name>`` runs with (configs/data/<name>.yaml
    over ``data/base``), checked: for the tools that load a task without a whole run config."""
    from framework.resources import compose_config

    return DataConfig.check_config(OmegaConf.to_container(compose_config([f"data={name}"]).data, resolve=True))


def _task_options(task) -> Optional[type]:
    """The options dataclass (``Config``) a registered plugin task declares, if any."""
    if not isinstance(task, str) or not task:
        return None
    from framework.registry import TASKS

    try:
        if task not in TASKS:
            return None
        schema = getattr(TASKS.get(task), "Config", None)
    except Exception:  # an unknown or broken task is reported by the task lookup itself
        return None
    return schema if is_dataclass(schema) else None


SECTIONS = {
    "model": ModelConfig,
    "rollout": RolloutConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "data": DataConfig,
}


def _writable(node: DictConfig) -> DictConfig:
    """A frozen section's schema (read-only in OmegaConf, nested sections too) made writable so
    that the user's values can be merged onto it; the typed object it becomes stays frozen."""
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)
    return node


def check_section(cfg: DictConfig | dict, schema: type, prefix: str):
    """Merge ``cfg`` onto ``schema`` and return the typed object; errors name the key."""
    try:
        merged = OmegaConf.merge(_writable(OmegaConf.structured(schema)), cfg)
        obj = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or str(e).split("'")[1]
        parent, where = schema, prefix
        for part in str(key).split(".")[:-1]:  # a nested section (trainer.fsdp): list its keys
            ft = {f.name: f.type for f in fields(parent)}.get(part)
            ft = globals().get(ft, ft) if isinstance(ft, str) else ft
            if not is_dataclass(ft):
                break
            parent, where = ft, f"{where}.{part}"
        from framework.overrides import unknown_key_error

        raise unknown_key_error(f"{prefix}.{key}", [f.name for f in fields(parent)], where) from None
    except (ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", "?")
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for '{prefix}.{key}': {msg}") from None
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def validate_run_config(cfg: DictConfig) -> dict[str, Any]:
    """Check every section; returns typed section objects keyed by name."""
    out = {}
    for name, schema in SECTIONS.items():
        if name not in cfg:
            raise ConfigError(f"config section '{name}' is missing")
        try:
            section = OmegaConf.to_container(cfg[name], resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad value in '{name}': {str(e).splitlines()[0]}") from None
        checker = getattr(schema, "check_config", None)
        out[name] = checker(section, name) if checker is not None else check_section(section, schema, name)
    # the derived values, set once here: Lightning's precision and the engine's dtype (an engine
    # with its own weights, vLLM, runs in the compute dtype unless rollout.dtype says otherwise)
    out["trainer"] = dataclasses.replace(out["trainer"], precision=resolve_precision(out["model"], out["trainer"]))
    if out["rollout"].dtype is None:
        out["rollout"] = dataclasses.replace(out["rollout"], dtype=canonical_dtype(out["model"].dtype))
    check_top_level(cfg)
    check_combinations(out)
    return out


TOP_LEVEL = ("algorithm", "reward", "seed", "plugins", "resume", "output_dir", *SECTIONS)


def check_top_level(cfg: DictConfig) -> None:
    """Unknown top-level keys (``+foo=1``, a typo of a section name) and the seed."""
    unknown = sorted(set(cfg.keys()) - set(TOP_LEVEL) - {"hydra"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {', '.join(TOP_LEVEL)}")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a non-negative integer")


def check_combinations(s: dict[str, Any]) -> None:
    """Options that do nothing together fail at start rather than train nothing."""
    r, t = s["rollout"], s["trainer"]
    if r.temperature == 0:
        raise ConfigError(
            "rollout.temperature=0 samples greedily: every group's G completions are the same, so every "
            "advantage is 0 and nothing trains; use a temperature > 0 (1.0 in the papers), and "
            "rollout.eval_temperature=0 for greedy evaluation"
        )
    if r.engine == "hf":
        for key, value, why in (
            ("tis_cap", r.tis_cap, "the transformers engine samples with the trained weights (no sampler/trainer gap)"),
            ("sleep", r.sleep, "sleep mode frees a vLLM engine's memory; the transformers engine has none of its own"),
        ):
            if value:
                raise ConfigError(
                    f"rollout.{key}={value} does nothing with rollout.engine=hf: {why}; drop it or use rollout=vllm"
                )
    if t.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"):
        raise ConfigError(f"trainer.accelerator={t.accelerator!r}: choose auto, cpu or gpu")
    if isinstance(t.devices, int) and t.devices == 0 or t.devices in ("0", []):
        raise ConfigError(f"trainer.devices={t.devices!r}: give a number of devices >= 1 (or auto)")


def check_machine(t: TrainerConfig) -> None:
    """The accelerator and device count against this machine, before any model loads."""
    import torch

    if t.accelerator in ("gpu", "cuda"):
        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError(
                f"trainer.accelerator={t.accelerator} but this machine has no CUDA GPU: use trainer.accelerator=auto or cpu"
            )
        if isinstance(t.devices, int) and t.devices > n:
            raise ConfigError(f"trainer.devices={t.devices} but this machine has {n} GPU(s)")


CANONICAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}


def canonical_dtype(name: str) -> str:
    """``bf16`` -> ``bfloat16`` etc.; canonical names unchanged."""
    return CANONICAL_DTYPES.get(name, name)


def resolve_precision(m: ModelConfig, t: TrainerConfig) -> str:
    """Lightning's precision for compute dtype ``model.dtype`` and weight dtype
    ``model.master_dtype`` (the one source of truth; ``trainer.precision`` may only restate it):

    - dtype == master_dtype: ``32-true`` (nothing to do: the weights are in the compute dtype;
      pure bf16 when both are bfloat16)
    - bf16 / fp16 compute with fp32 masters: ``bf16-mixed`` / ``16-mixed`` (autocast around the
      step; weights, gradients and AdamW state stay fp32)
    - ``trainer=fsdp``: ``32-true``; FSDP2's MixedPrecisionPolicy casts the gathered parameters
      to the compute dtype (framework/distributed.py)."""
    c, w = canonical_dtype(m.dtype), canonical_dtype(m.master_dtype)
    if _WIDTH[w] < _WIDTH[c]:
        raise ConfigError(
            f"model.master_dtype={m.master_dtype} is narrower than the compute dtype model.dtype={m.dtype}: "
            f"set model.master_dtype=float32 (fp32 master weights) or model.master_dtype={m.dtype}"
        )
    if t.strategy == "fsdp" or c == w:
        derived = "32-true"
    else:
        derived = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}[c]
    if t.precision is not None and str(t.precision) != derived and t.strategy != "fsdp":
        raise ConfigError(
            f"trainer.precision={t.precision!r} disagrees with model.dtype={m.dtype} (compute) and "
            f"model.master_dtype={m.master_dtype} (weights), which give {derived!r}: set the dtypes instead "
            "(e.g. model.dtype=bfloat16 model.master_dtype=float32 for bf16 compute with fp32 master weights) "
            "and leave trainer.precision=null"
        )
    return derived


def base_options() -> dict[str, dict]:
    """The ``base`` option of each typed Hydra group, as plain dicts: the dataclass defaults of
    :data:`SECTIONS` (``model``, ``rollout``, ``optim``, ``trainer``, ``logger``, ``data``) and,
    for ``algorithm``, GRPO's ``Config`` (``algorithms.base.AlgorithmConfig``, the GRPO family's
    common options; an algorithm YAML adds its own keys on top of it)."""
    from algorithms.base import base_config
    from rewards.config import RewardConfig  # the reward section's schema lives with the rewards

    out = {group: OmegaConf.to_container(OmegaConf.structured(schema)) for group, schema in SECTIONS.items()}
    out["algorithm"] = base_config()
    out["reward"] = OmegaConf.to_container(OmegaConf.structured(RewardConfig))
    return out


def register_schemas() -> None:
    """Each typed section's dataclass defaults become the ``base`` option of its Hydra group
    (``model/base``, ``rollout/base``, ``optim/base``, ``trainer/base``, ``logger/base``,
    ``data/base``, ``algorithm/base``: :func:`base_options`); the YAML files of a group start
    from it (``defaults: [base, _self_]``) and state only what they change, so every default
    lives in one place: the dataclasses. Stored as plain dicts: the types and ranges are checked
    by :func:`validate_run_config` with one-line errors."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, node in base_options().items():
        cs.store(group=group, name="base", node=node)


register_schemas()  # on import: framework.run, benchmarks and the tests compose after importing this
