"""The config schema (pydantic 2): everything is checked before anything heavy runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Component(_Strict):
    """A pluggable piece: a registered name or an import path, and keyword arguments."""

    type: str = Field(description="registered name or 'package.module:Name'")
    args: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(Component):
    """The model, and how to start it: local pretrained weights, a fresh head, frozen parts."""

    pretrained: str | bool | None = Field(
        None, description="weights file: .safetensors, a .pth/.pt state_dict, or a torchkiln checkpoint"
    )
    strict: bool = Field(True, description="refuse missing keys and shape mismatches outside the head")
    head: str | None = Field(None, description="the classifier's module name; found automatically when not given")
    reset_head: bool = Field(False, description="keep the new head even where the file's head has the same shape")
    freeze: Literal["backbone"] | list[str] | None = Field(
        None, description="'backbone' (all but the head) or glob patterns over parameter names"
    )
    unfreeze_at_epoch: int | None = Field(None, ge=1, description="make frozen parameters trainable from this epoch")

    @model_validator(mode="after")
    def _unfreeze_needs_freeze(self) -> ModelConfig:
        if self.unfreeze_at_epoch is not None and self.freeze is None:
            raise ValueError("unfreeze_at_epoch needs model.freeze")
        return self


class WeightedComponent(Component):
    weight: float = 1.0


class TransformsConfig(_Strict):
    """torchvision.transforms.v2 steps by name; `train` for the training split, `eval` for the rest."""

    train: list[Component] = Field(default_factory=list)
    eval: list[Component] = Field(default_factory=list)


class NormalizeConfig(_Strict):
    """Standardization fitted on the training split only, stored in the run, used by `kiln test`."""

    features: bool = Field(True, description="each input feature to mean 0, std 1")
    targets: bool = Field(True, description="regression: targets for the loss; outputs mapped back")


class SamplerArgs(_Strict):
    head: str | None = Field(None, description="multihead: balance this head's classes (default: the combined class)")


class SamplerConfig(_Strict):
    """`{type: balanced, args: {head: mask}}`: class-balanced draws on one head of a multihead task."""

    type: Literal["default", "balanced"]
    args: SamplerArgs = Field(default_factory=SamplerArgs)


# A name, or {type, args}: each form reports its own mistakes (the tags are dropped from error paths).
SamplerSpec = Annotated[
    Annotated[Literal["default", "balanced"], Tag("Name")] | Annotated[SamplerConfig, Tag("Spec")],
    Discriminator(lambda v: "Spec" if isinstance(v, (dict, SamplerConfig)) else "Name"),
]


class MixupConfig(_Strict):
    """Mixup / CutMix on training batches (torchvision v2); soft targets go to the loss."""

    mixup_alpha: float = Field(0.2, ge=0.0, description="Beta(alpha, alpha) of MixUp's mixing weight (0: off)")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="Beta(alpha, alpha) of CutMix's box area (0: off)")
    prob: float = Field(1.0, ge=0.0, le=1.0, description="share of training batches mixed")


class EMAConfig(_Strict):
    """An exponential moving average of the weights; validation, best.ckpt and inference use it."""

    decay: float = Field(0.999, gt=0.0, lt=1.0)
    warmup: bool = Field(True, description="decay min(decay, (1 + n) / (10 + n)) at the n-th update")
    every_n_steps: int = Field(1, ge=1, description="update after every N-th optimizer step")


class SWAConfig(_Strict):
    """Stochastic weight averaging (torch.optim.swa_utils); BatchNorm recomputed at the end."""

    start_epoch: int = Field(ge=1, description="first epoch (1-based) averaged; SWALR sets the LR from then")
    lr: float = Field(gt=0.0, description="the SWA learning rate SWALR anneals to")
    anneal_epochs: int = Field(1, ge=0, description="epochs of cosine annealing to lr")


class BoxesConfig(_Strict):
    """Detection data: what the annotation audit does with faulty boxes when a run starts."""

    on_invalid: Literal["fix", "drop", "error"] = Field(
        "fix", description="fix: order inverted corners, clip boxes partly outside, drop the rest;"
        " drop: drop every faulty box; error: refuse the data")
    min_size: float = Field(1.0, ge=0.0, description="boxes with a side below this many pixels are dropped")


# A number of samples, or auto (the batch-size finder); each form reports its own mistakes.
BatchSize = Annotated[
    Annotated[int, Field(ge=1), Tag("Size")] | Annotated[Literal["auto"], Tag("Auto")],
    Discriminator(lambda v: "Auto" if isinstance(v, str) else "Size"),
]


class DataConfig(_Strict):
    dataset: Component = Field(default_factory=lambda: Component(type="Digits"))
    val_dataset: Component | None = None
    test_dataset: Component | None = None
    val_split: float = Field(0.2, ge=0.0, lt=1.0)
    test_split: float = Field(0.0, ge=0.0, lt=1.0)
    stratify: bool = True
    split_seed: int | None = Field(None, description="defaults to the run's seed")
    batch_size: BatchSize = Field(
        64, description="per process; auto: the largest that fits, found at the start of kiln train"
        " (kiln find-batch-size), less a 10% margin")
    eval_batch_size: int | None = Field(None, ge=1)
    shuffle: bool = True
    drop_last: bool = False
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = Field(None, ge=1)
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    folds: int | None = Field(None, ge=2, description="k-fold cross-validation: the number of folds")
    fold: int = Field(0, ge=0, description="which fold is the validation split (0..folds-1)")
    sampler: SamplerSpec = Field(
        "default", description="balanced: draw training samples with weights 1/class count (a multihead task:"
        " of the combined class, or of one head with {type: balanced, args: {head: NAME}})"
    )
    collate: Component | None = Field(None, description="a named collate function, e.g. pad_sequences")
    fast_path: Literal["auto"] | bool = Field(
        "auto", description="in-memory tensor datasets: batches by index slicing on the device (true, false, auto)"
    )
    on_error: Literal["raise", "skip"] = Field("raise", description="broken or missing files, unknown labels")
    max_skipped: float = Field(0.01, ge=0.0, le=1.0, description="on_error: skip fails above this fraction")
    query_batches: Literal["auto"] | bool = Field(
        "auto", description="whole queries per batch, shuffled by query (batch_size: about that many items);"
        " auto: on for the ranking task when the data set has query ids (`groups`)"
    )
    boxes: BoxesConfig = Field(default_factory=BoxesConfig, description="detection: the annotation audit")
    normalize: NormalizeConfig | None = Field(
        None, description="standardize features (and regression targets) with the training split's mean/std;"
        " true for both"
    )
    mixup: MixupConfig | None = Field(None, description="mixup / cutmix of training batches (soft targets);"
                                      " train metrics use each sample's dominant label")

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_flag(cls, v: Any) -> Any:
        return ({} if v else None) if isinstance(v, bool) else v

    @field_validator("collate", mode="before")
    @classmethod
    def _collate_name(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _splits_fit(self) -> DataConfig:
        if self.val_split + self.test_split >= 1.0:
            raise ValueError("val_split + test_split must be below 1")
        if self.folds is not None:
            if self.fold >= self.folds:
                raise ValueError(f"fold must be in 0..{self.folds - 1} (folds: {self.folds})")
            if self.val_dataset is not None:
                raise ValueError("folds and val_dataset exclude each other: the fold is the validation split")
        return self


class ParamGroup(_Strict):
    params: str = Field(description="glob pattern over parameter names, e.g. 'head.*'")
    lr_mult: float = 1.0
    weight_decay: float | None = None


class OptimizerConfig(Component):
    type: str = "AdamW"
    no_decay: list[str] = Field(default_factory=list, description="name parts without weight decay, e.g. [bias, norm]")
    groups: list[ParamGroup] = Field(default_factory=list)


class WarmupConfig(_Strict):
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    start_factor: float = Field(0.01, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_of(self) -> WarmupConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of warmup.steps or warmup.epochs")
        return self


class SchedulerConfig(Component):
    interval: Literal["step", "epoch"] | None = Field(
        None, description="when to step; chosen from the type when not given"
    )
    unit: Literal["epoch", "step"] = Field(
        "epoch",
        description="CosineAnnealingWarmRestarts: T_0 counted in epochs (fractional stepping) or steps",
    )
    warmup: WarmupConfig | None = None


class FSDPConfig(_Strict):
    wrap: list[str] = Field(default_factory=list, description="module class names sharded as blocks"
                            " (fully_shard per block, then the root); empty: the root only")
    reshard_after_forward: bool = Field(True, description="free a block's gathered parameters after its"
                                        " forward (less memory, one more all-gather in backward)")
    cpu_offload: bool = Field(False, description="keep the shards and the optimizer step on the CPU")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in backward")


class TrainerConfig(_Strict):
    epochs: int = Field(10, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|model|(cuda|xpu)(:\d+)?)$",
                        description="auto, cpu, cuda, cuda:N; model: the model places itself (not moved)")
    precision: Literal["32", "bf16", "fp16"] = "32"
    grad_clip: float | None = Field(None, gt=0.0)
    grad_clip_mode: Literal["norm", "value"] = "norm"
    accumulate: int = Field(1, ge=1)
    monitor: str | None = Field(None, description="default: the first metric listed (val/<name>), else val/loss")
    mode: Literal["min", "max"] | None = Field(None, description="default: min for losses, max otherwise")
    early_stop: int | None = Field(None, ge=1, description="patience: epochs without improvement")
    min_delta: float = Field(0.0, ge=0.0)
    save_period: int | None = Field(None, ge=1, description="also keep epoch-NNN.ckpt every N epochs")
    checkpoint_every_steps: int | None = Field(None, ge=1)
    keep_last: int | None = Field(None, ge=1, description="numbered checkpoints kept (best, last always)")
    async_checkpoints: bool = Field(
        True, description="write checkpoint files from a background thread (serialized at once; whole"
        " files only ever appear under their names; waited for before the run ends or stops);"
        " false: written on the training thread"
    )
    on_nonfinite: Literal["stop", "skip_batch"] = "stop"
    compile: bool = False
    compile_options: dict[str, Any] = Field(default_factory=dict, description="passed to torch.compile")
    cache_size_limit: int | None = Field(
        None, ge=1, description="torch._dynamo.config.cache_size_limit (512 for models with many shapes)"
    )
    channels_last: bool = False
    deterministic: bool = False
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch's operators (torch.set_num_threads); default:"
        " torch's own (one per core). On shared or busy cores a small model runs much faster with 1-2")
    strategy: Literal["auto", "ddp", "dp", "fsdp"] = Field(
        "auto", description="ddp: one process per device (kiln train --devices N or torchrun); fsdp:"
        " FSDP2, each process holds a shard of the parameters, gradients and optimizer state; dp:"
        " nn.DataParallel in one process; auto: ddp when started as several processes")
    fsdp: FSDPConfig = Field(default_factory=lambda: FSDPConfig(), description="strategy fsdp's options")
    sync_batchnorm: bool = Field(False, description="DDP: BatchNorm statistics over the global batch")
    dist_timeout: float = Field(1800.0, gt=0.0, description="seconds a rank waits for the others before"
                                " the run stops with an error (a dead or hung process)")
    checks: Literal["warn", "strict", "off"] = Field(
        "warn", description="first-epoch checks (finite, moving loss; every parameter gets a gradient; finite"
        " gradients): warn logs them and puts them in summary.json, strict makes them errors")
    ema: EMAConfig | None = Field(None, description="EMA of the weights (validation and best.ckpt use it)")
    swa: SWAConfig | None = Field(None, description="stochastic weight averaging from start_epoch")
    # memory (issue 20)
    on_oom: Literal["stop", "split"] = Field(
        "stop", description="a step that runs out of memory: stop (write last.ckpt from the state before it, say"
        " what to try) or split (retry its samples as 2, 4, ... micro-batches: the same gradient)")
    activation_checkpointing: list[str] | None = Field(
        None, description="submodule names (layer3, blocks.0) whose activations are recomputed in backward"
        " (torch.utils.checkpoint) instead of kept")
    leak_watch: int | None = Field(10, ge=1, description="sample allocated memory (GPU) or RSS (CPU) every N"
                                   " optimizer steps; warn when it rises steadily across an epoch (null: off)")
    memory_snapshot: int | None = Field(None, ge=1, description="record the first N steps with torch's CUDA memory"
                                        " history into memory_snapshot.pickle (kiln train --memory-snapshot N)")

    @model_validator(mode="after")
    def _one_average(self) -> TrainerConfig:
        if self.ema is not None and self.swa is not None:
            raise ValueError("ema and swa exclude each other (each gives the weights validated and exported)")
        return self

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v


class WandbConfig(_Strict):
    project: str = "torchkiln"
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="default: $WANDB_MODE, else online"
    )
    entity: str | None = None
    name: str | None = Field(None, description="default: <run name>/<timestamp>")
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(_Strict):
    every_n_steps: int = Field(10, ge=1, description="per-step scalars leave the device this often")
    tensorboard: bool = True
    csv: bool = True
    plots: bool = True
    progress: bool = True
    histograms: int | None = Field(None, ge=1, description="TensorBoard weight/gradient histograms every N epochs")
    images: int = Field(16, ge=0, description="misclassified validation images drawn per epoch (0: none)")
    images_every: int | str = Field(
        "auto",
        description="epochs between the validation pictures sent to TensorBoard/W&B (misclassified grid,"
        " confusion matrix); auto: as often as keeps them under 1% of the run's time (first and last epoch always)",
    )
    wandb: WandbConfig | None = Field(None, description="log to Weights & Biases (extra: torchkiln[wandb])")

    @field_validator("images_every")
    @classmethod
    def _epochs_or_auto(cls, v: int | str) -> int | str:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("expected auto or a number of epochs >= 1")


# -- tune: `kiln tune`'s search (torchkiln/tune/) ----------------------------------------------
class TuneScheduler(_Strict):
    """ASHA stops weak trials early: at epochs grace_period * reduction_factor**k, a trial below
    the top 1/reduction_factor of those that reached that epoch ends."""

    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1, description="default: trainer.epochs")


class TuneResources(_Strict):
    cpu: float = Field(1.0, ge=0.0)
    gpu: float = Field(0.0, ge=0.0)


class TuneSettings(_Strict):
    """`kiln tune`: which config keys to search, how, and for which number."""

    metric: str | None = Field(None, description="default: trainer.monitor (and its mode)")
    mode: Literal["min", "max"] | None = Field(None, description="default: the monitor's mode")
    num_samples: int = Field(8, ge=1, description="trials (with grid: each grid point this many times)")
    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="dotted config key -> {loguniform|uniform: [lo, hi]},"
        " {randint: [lo, hi]} (hi excluded), {choice: [...]} or {grid: [...]}")
    scheduler: TuneScheduler | None = Field(default_factory=TuneScheduler, description="asha, or none")
    searcher: Literal["optuna", "random"] = Field("optuna", description="random: also the one for grid")
    max_concurrent: int | None = Field(None, ge=1, description="default: as many as the resources allow")
    resources_per_trial: TuneResources = Field(default_factory=TuneResources)

    @field_validator("space")
    @classmethod
    def _known_forms(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from torchkiln.tune.distributions import parse_space

        parse_space(v)
        return v

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_name(cls, v: Any) -> Any:
        if v is None or v == "none":
            return None
        return {"type": v} if isinstance(v, str) else v


class Config(_Strict):
    """A whole run. `kiln config schema` prints this as JSON Schema."""

    name: str = "run"
    seed: int = 42
    task: str | Component = Field("classification", description="a name, or {type, args} for task options")
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(type="SmallCNN"))
    loss: Component | list[WeightedComponent] | None = None
    metrics: list[str | Component] = Field(default_factory=list, description="default: the task's metrics")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig | None = None
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    callbacks: list[Component] = Field(
        default_factory=list, description="added to the loop, in order: a registered name (EarlyStopping)"
        " or an import path 'package.module:Name' to a torchkiln.Callback")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    tune: TuneSettings | None = Field(None, description="`kiln tune`: the hyperparameter search (extra: torchkiln[tune])")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v in {".", ".."}:
            raise ValueError("name must be a plain folder name (no slashes)")
        return v


def to_plain(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (what checkpoints and config.yaml hold)."""
    return cfg.model_dump(mode="json")
