"""The recipe schema: the only place defaults live.

A recipe is a YAML file of overrides on top of these pydantic models; `--set a.b=value` edits the same
tree (lmlab.recipe.loading). Sections used by one part of lmlab only (alerts, distributed, generation, judge,
pair, eval.json, data.filters) live in their own modules of this package; this one assembles the Recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, model_validator

from lmlab.recipe.alerts import AlertsConfig
from lmlab.recipe.defaults import DEFAULT_WORKSPACE
from lmlab.recipe.distributed import DistributedConfig
from lmlab.recipe.dpo import DpoConfig
from lmlab.recipe.evaluation import JsonEvalConfig
from lmlab.recipe.filters import FilterSpec
from lmlab.recipe.generation import GenerationSection
from lmlab.recipe.judge import JudgeConfig
from lmlab.recipe.pair import PairConfig
from lmlab.recipe.paths import resolve_data_path, resolve_model_path
from lmlab.recipe.section import Section
from lmlab.recipe.storage import credential_paths, url_problem
from lmlab.recipe.sweep import SweepConfig


# ----------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = Field("run", description="Human name of the run; runs are listed and filtered by it")
    task: Literal["lm", "sft", "pair_classify", "dpo"] = Field(
        "lm", description="lm: next-token prediction on raw text; sft: prompt→completion fine-tuning; "
        "pair_classify: prompt + response A + response B → A / B / tie; dpo: preference training on "
        "prompt + chosen + rejected (the dpo section)"
    )
    seed: int = Field(1337, description="Seeds data split, shuffling, init and dropout")
    output_dir: str = Field(
        DEFAULT_WORKSPACE, description="Workspace folder: runs, checkpoints and the sqlite ledger live here "
        "(relative to the current directory)"
    )
    notes: str = Field("", description="Free text stored with the run")
    storage: str | None = Field(
        None, description="Mirror the run's checkpoints and ledger record here while it trains, to resume it on "
        "another machine: an fsspec URL (s3://bucket/prefix for AWS S3, MinIO, R2; gs://, az://, file://). Also "
        "--storage or $LMLAB_STORAGE. Credentials come from the environment / profile chain, never from here"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Options of the storage's fsspec filesystem, e.g. s3fs endpoint_url, "
        "client_kwargs: {region_name: auto}, config_kwargs; no credentials (the recipe is recorded with the run)"
    )

    @model_validator(mode="after")
    def _no_credentials_in_storage(self) -> RunConfig:
        problem = url_problem(self.storage) if self.storage is not None else None
        if problem:
            raise ValueError(f"storage: {problem}")
        secrets = credential_paths(self.storage_options)
        if secrets:
            raise ValueError(f"storage_options: {', '.join(secrets)} would be recorded with the run; credentials come "
                             "from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                             "GOOGLE_APPLICATION_CREDENTIALS, ...): remove them")
        return self


# ---------------------------------------------------------------------------------------------- data
class SplitConfig(Section):
    train: float = Field(0.9, ge=0, le=1, description="Fraction of examples for training")
    val: float = Field(0.1, ge=0, le=1, description="Fraction for validation (eval, best checkpoint)")
    test: float = Field(0.0, ge=0, le=1, description="Fraction held out for final evaluation")
    seed: int | None = Field(None, description="Seed of the split's shuffle; defaults to run.seed")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train: train + val + test must sum to 1 (got {total:g}); adjust the fractions")
        return self


class DataConfig(Section):
    path: str | None = Field(
        None, description="Local file (.txt, .csv, .json, .jsonl), relative to the recipe's folder or to $LMLAB_DATA"
    )
    hf_dataset: str | None = Field(None, description="Hugging Face dataset id, used when `path` is not set")
    hf_config: str | None = Field(None, description="Configuration name of the Hugging Face dataset")
    hf_split: str = Field("train", description="Which split of the Hugging Face dataset to read")
    format: Literal["auto", "text", "csv", "json", "jsonl", "persona_chat"] = Field(
        "auto", description="File format; auto = from the file extension; persona_chat = Synthetic-Persona-Chat "
        "CSV (a file, or a folder of *.csv) read as chat records with the persona as system message"
    )
    text_column: str = Field("text", description="Column holding the text (task lm); for .txt files each line is ignored, the whole file is one document unless `one_document_per_line`")
    one_document_per_line: bool = Field(False, description="For .txt files: every non-empty line is a document")
    max_examples: int | None = Field(None, gt=0, description="Use only the first N examples (after loading, before splitting)")
    split: SplitConfig = Field(default_factory=SplitConfig)
    # --- sft: how examples become prompt/completion token sequences
    template: Literal["alpaca", "chat", "prompt_completion", "text"] | None = Field(
        None, description="sft: alpaca (instruction/input/output), chat (list of {role, content}), "
        "prompt_completion (with prompt_template), text (raw; loss on all tokens)"
    )
    prompt_template: str | None = Field(
        None, description="prompt_completion: a string with {column} placeholders, e.g. '### Question: \"{input}\"\\n ### Answer: '"
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns to the template's names, e.g. {instruction: question, output: answer}"
    )
    chat_template: str | None = Field(
        None, description="chat: 'chatml' or a Jinja template; default: the tokenizer's own, else chatml"
    )
    system_prompt: str | None = Field(None, description="chat: system message prepended to every conversation")
    train_on_prompt: bool = Field(False, description="sft: also put loss on prompt tokens")
    add_eos: bool = Field(True, description="sft: append EOS to every completion")
    max_length: int = Field(512, gt=0, description="sft/pair_classify: maximum tokens per example")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples longer than max_length (both are counted and reported)"
    )
    packing: bool = Field(False, description="sft: pack examples into max_length rows without cross-example attention")
    # --- curation and multi-part training
    filters: list[FilterSpec] = Field(default_factory=list, description="Audited filters applied in order")
    parts: int = Field(1, gt=0, description="Split the training data into N deterministic parts")
    part: int = Field(0, ge=0, description="Which part (0-based) this run trains on")

    allow_code: bool = Field(False, description="Let `predicate` filters import and run the Python function they "
                             "name (a recipe from elsewhere could run anything); also `lmlab run --allow-code`")

    @model_validator(mode="after")
    def _code_needs_consent(self) -> DataConfig:
        for i, spec in enumerate(self.filters):
            if getattr(spec, "kind", None) == "predicate" and not self.allow_code:
                raise ValueError(f"filters: [{i}] is a predicate filter: it imports and runs {spec.path} from the "
                                 "recipe; lmlab runs recipe code only when allowed: set data.allow_code: true (or "
                                 "pass --allow-code)")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.path is None and self.hf_dataset is None:
            raise ValueError("path: required; set `data.path` (a local file) or `data.hf_dataset` (a hub dataset id)")
        if self.path is not None and self.hf_dataset is not None:
            raise ValueError("path: set only one of `data.path` and `data.hf_dataset`")
        return self


# ----------------------------------------------------------------------------------------- tokenizer
class TokenizerConfig(Section):
    kind: Literal["bpe", "pretrained"] = Field(
        "bpe", description="bpe: train a byte-level BPE on the training split; pretrained: load one"
    )
    name_or_path: str | None = Field(
        None, description="Pretrained tokenizer (hub id or folder); defaults to model.pretrained"
    )
    vocab_size: int = Field(4096, gt=0, description="BPE vocabulary size, special tokens included")
    min_frequency: int = Field(2, ge=1, description="BPE: minimum pair frequency to merge")
    special_tokens: list[str] = Field(
        default_factory=lambda: ["<|endoftext|>"], description="BPE: special tokens; the first is EOS/BOS/pad"
    )

    @model_validator(mode="after")
    def _vocab_holds_specials(self) -> TokenizerConfig:
        # byte-level BPE needs its 256 byte symbols plus the special tokens before any merge
        if self.kind == "bpe":
            if not self.special_tokens:
                raise ValueError("special_tokens: needs at least one token (used as end-of-document)")
            need = 256 + len(self.special_tokens)
            if self.vocab_size < need:
                raise ValueError(
                    f"vocab_size: must be at least {need} (256 byte symbols + {len(self.special_tokens)} "
                    f"special tokens), got {self.vocab_size}"
                )
        return self


# --------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    arch: Literal["gpt2", "llama"] = Field(
        "gpt2", description="From-scratch architecture: gpt2 = learned positions, llama = RoPE + RMSNorm + SwiGLU"
    )
    pretrained: str | None = Field(None, description="Hub id or folder of a pretrained model; overrides the shape fields")
    gguf_file: str | None = Field(None, description="Load `pretrained` from this GGUF file inside it (dequantized)")
    n_layer: int = Field(4, gt=0, description="Transformer blocks")
    n_head: int = Field(4, gt=0, description="Attention heads")
    n_kv_head: int | None = Field(None, gt=0, description="llama: key/value heads (grouped-query attention); default n_head")
    d_model: int = Field(256, gt=0, description="Width of the residual stream")
    d_ff: int | None = Field(None, gt=0, description="MLP width; default 4·d_model (gpt2) or ≈8/3·d_model (llama)")
    block_size: int = Field(128, gt=0, description="Training sequence length in tokens")
    context_length: int | None = Field(None, gt=0, description="Model's maximum positions; default block_size")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on embeddings, attention and residual")
    tie_embeddings: bool = Field(True, description="Share input embedding and output projection weights")
    rope_theta: float = Field(10000.0, gt=0, description="llama: RoPE base")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory")
    init_from: str | None = Field(
        None, description="Start from another run ('run:<id>' = its best checkpoint, 'run:<id>:last') or a "
        "checkpoint folder; its tokenizer comes along. The ledger links parent → child"
    )
    init_optimizer: bool = Field(False, description="With init_from: also restore the parent's optimizer state")

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.pretrained is None:
            if self.d_model % self.n_head:
                raise ValueError(f"n_head: d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); change one")
            if self.n_kv_head is not None and self.n_head % self.n_kv_head:
                raise ValueError(f"n_kv_head: n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
            if self.context_length is not None and self.block_size > self.context_length:
                raise ValueError(
                    f"block_size: {self.block_size} is larger than the model's context_length "
                    f"({self.context_length}); lower block_size or raise context_length"
                )
        return self


class AdapterConfig(Section):
    kind: Literal["none", "lora", "qlora"] = Field(
        "none", description="none = full fine-tuning; lora = peft LoRA; qlora = LoRA on a 4-bit nf4 base (CUDA only)"
    )
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear'"
    )
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA)")
    train_modules: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter (e.g. [lm_head])"
    )


# --------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd (momentum, nesterov)")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of linear/cosine decay")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled (adamw) or L2 (sgd) weight decay")
    decay_norms_and_biases: bool = Field(
        False, description="Also decay norm weights, biases and embeddings (nanoGPT excludes them)"
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="adamw betas")
    eps: float = Field(1e-8, gt=0, description="adamw epsilon")
    fused: bool = Field(True, description="One fused optimizer kernel per step (torch fused=True, the HF Trainer's "
                        "default): much faster than the per-tensor loop on CPU; under DeepSpeed/FSDP the engine's own")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="LR shape after warmup")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup length in optimizer steps")
    warmup_fraction: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of all steps")
    batch_size: int = Field(16, gt=0, description="Micro-batch: sequences per forward pass per process")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step")
    epochs: float | None = Field(1.0, gt=0, description="Passes over the training split (ignored if max_steps)")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs")
    clip_grad: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null = off")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = autocast mixed precision")
    log_every: int = Field(10, gt=0, description="Log train metrics every N optimizer steps")
    compile: bool = Field(False, description="torch.compile the model (slow start, may be faster on GPU)")
    num_threads: int | None = Field(None, gt=0, description="CPU threads for torch; default all cores")

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError("warmup_steps: set only one of warmup_steps and warmup_fraction")
        if self.max_steps is not None and self.warmup_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps: {self.warmup_steps} must be < max_steps ({self.max_steps}); shorten warmup"
            )
        if self.schedule != "constant" and self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr:g} must be <= lr ({self.lr:g}); lower min_lr")
        return self


class EvalConfig(Section):
    # merged with Section's config: `json` is the YAML key of json_check (a BaseModel method name)
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    every_steps: int | None = Field(200, gt=0, description="Evaluate every N optimizer steps (and always at the end)")
    max_batches: int | None = Field(None, gt=0, description="Cap on validation batches per eval; null = whole split")
    batch_size: int | None = Field(None, gt=0, description="Eval micro-batch; default train.batch_size")
    best_metric: str = Field("val/loss", description="Metric that picks the best checkpoint")
    best_mode: Literal["min", "max"] = Field("min", description="Whether lower or higher best_metric is better")
    json_check: JsonEvalConfig | None = Field(None, alias="json", description="JSON tasks: the settings `lmlab "
                                              "eval-json RUN` uses (split, json_schema, fields, max_new_tokens)")


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, gt=0, description="Save every N steps; default = at each eval")
    keep_last: int = Field(2, ge=1, description="Keep this many most recent checkpoints")
    keep_best: bool = Field(True, description="Also keep the best checkpoint by eval.best_metric")
    save_optimizer: bool = Field(True, description="Save optimizer/scheduler state (needed for exact resume)")


class LedgerConfig(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default $LMLAB_TRACKING_URI, else sqlite in run.output_dir"
    )
    experiment: str = Field("lmlab", description="MLflow experiment name")
    enabled: bool = Field(True, description="false = record nothing (quick experiments)")


class Recipe(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    generation: GenerationSection = Field(default_factory=GenerationSection,
                                          description="Named sampling presets for lmlab generate / eval")
    pair: PairConfig = Field(default_factory=PairConfig, description="task pair_classify: columns, encoding, model")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="task dpo: loss, beta, reference model, columns")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="LLM judge for `lmlab eval --judge`: "
                               "endpoint, model, prompt version, split")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    # what `lmlab sweep` searches; not part of what a run learns, so a trial's recorded recipe leaves it out
    sweep: SweepConfig | None = Field(None, exclude=True, description="lmlab sweep: the search space, sampler, "
                                      "pruner and metric (lmlab.recipe.sweep)")

    # Where the recipe came from: data paths resolve relative to it. Not part of the recipe's content.
    source_path: str | None = Field(None, exclude=True, description="(set by load_recipe)")

    @model_validator(mode="after")
    def _cross_section(self) -> Recipe:
        if self.run.task == "lm" and self.model.pretrained is None and self.tokenizer.kind == "pretrained" \
                and self.tokenizer.name_or_path is None:
            raise ValueError("tokenizer: name_or_path is needed for a pretrained tokenizer when model.pretrained is not set")
        return self

    @model_validator(mode="after")
    def _scratch_models_sample(self) -> Recipe:
        # greedy decoding sends a small model trained from scratch into loops ("the the the ..."): unless the recipe
        # names one, such a run's default preset samples with a repetition penalty (recorded with the run)
        if self.model.pretrained is None and "default_preset" not in self.generation.model_fields_set:
            self.generation.default_preset = "varied"
        return self

    @model_validator(mode="after")
    def _adapter_needs_pretrained(self) -> Recipe:
        if self.adapter.kind != "none" and self.model.pretrained is None and self.model.init_from is None:
            raise ValueError("adapter: LoRA/QLoRA adapt a pretrained model; set model.pretrained "
                             "(or model.init_from), or use adapter.kind: none")
        if self.run.task == "sft" and self.data.template is None:
            raise ValueError("data: task sft needs data.template (alpaca, chat, prompt_completion or text)")
        if self.run.task == "dpo" and self.data.template in (None, "text"):
            raise ValueError("data: task dpo renders prompts with data.template; set it to alpaca, chat or "
                             "prompt_completion (text has no prompt)")
        if self.dpo.reference == "adapter_disabled" and self.adapter.kind == "none":
            raise ValueError("dpo: reference adapter_disabled needs a LoRA adapter (adapter.kind lora or qlora); "
                             "use frozen_copy or precomputed for full fine-tuning")
        return self

    def resolved(self) -> dict[str, Any]:
        """The full recipe, defaults included: what the ledger records and `lmlab diff` compares."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False)

    def resolve_model_path(self, name: str) -> str:
        """A model/tokenizer folder relative to this recipe or $LMLAB_MODELS, a `pkg:` package's model, or a hub id."""
        return resolve_model_path(name, self.source_path)

    def resolve_data_path(self, path: str | None = None) -> Path:
        """Find a data file: absolute, relative to the recipe's folder, or under $LMLAB_DATA."""
        path = path or self.data.path
        assert path is not None
        return resolve_data_path(path, self.source_path, folder_ok=self.data.format == "persona_chat")


# ------------------------------------------------------------------------------------------- loading


