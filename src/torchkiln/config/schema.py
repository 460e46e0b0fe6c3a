"""The config schema (pydantic 2): everything is checked before anything heavy runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Component(_Strict):
    """A pluggable piece: a registered name or an import path, and keyword arguments."""

    type: str = Field(description="registered name or 'package.module:Name'")
    args: dict[str, Any] = Field(default_factory=dict)


class WeightedComponent(Component):
    weight: float = 1.0


class DataConfig(_Strict):
    dataset: Component = Field(default_factory=lambda: Component(type="Digits"))
    val_dataset: Component | None = None
    test_dataset: Component | None = None
    val_split: float = Field(0.2, ge=0.0, lt=1.0)
    test_split: float = Field(0.0, ge=0.0, lt=1.0)
    stratify: bool = True
    split_seed: int | None = Field(None, description="defaults to the run's seed")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    shuffle: bool = True
    drop_last: bool = False
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _splits_fit(self) -> DataConfig:
        if self.val_split + self.test_split >= 1.0:
            raise ValueError("val_split + test_split must be below 1")
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


class TrainerConfig(_Strict):
    epochs: int = Field(10, ge=1)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    precision: Literal["32", "bf16", "fp16"] = "32"
    grad_clip: float | None = Field(None, gt=0.0)
    grad_clip_mode: Literal["norm", "value"] = "norm"
    accumulate: int = Field(1, ge=1)
    monitor: str = "val/loss"
    mode: Literal["min", "max"] | None = Field(None, description="default: min for losses, max otherwise")
    early_stop: int | None = Field(None, ge=1, description="patience: epochs without improvement")
    min_delta: float = Field(0.0, ge=0.0)
    save_period: int | None = Field(None, ge=1, description="also keep epoch-NNN.ckpt every N epochs")
    checkpoint_every_steps: int | None = Field(None, ge=1)
    keep_last: int | None = Field(None, ge=1, description="numbered checkpoints kept (best, last always)")
    on_nonfinite: Literal["stop", "skip_batch"] = "stop"
    compile: bool = False
    compile_options: dict[str, Any] = Field(default_factory=dict)
    channels_last: bool = False
    deterministic: bool = False
    strategy: Literal["auto", "ddp", "dp"] = Field(
        "auto", description="ddp: one process per device (kiln train --devices N or torchrun); dp:"
        " nn.DataParallel in one process; auto: ddp when started as several processes")
    sync_batchnorm: bool = Field(False, description="DDP: BatchNorm statistics over the global batch")
    dist_timeout: float = Field(1800.0, gt=0.0, description="seconds a rank waits for the others before"
                                " the run stops with an error (a dead or hung process)")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v


class LoggingConfig(_Strict):
    every_n_steps: int = Field(10, ge=1)
    tensorboard: bool = True
    csv: bool = True
    plots: bool = True
    progress: bool = True


class Config(_Strict):
    """A whole run. `kiln config schema` prints this as JSON Schema."""

    name: str = "run"
    seed: int = 42
    task: str = "classification"
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: Component = Field(default_factory=lambda: Component(type="SmallCNN"))
    loss: Component | list[WeightedComponent] | None = None
    metrics: list[str | Component] = Field(default_factory=lambda: ["accuracy"])
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig | None = None
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v in {".", ".."}:
            raise ValueError("name must be a plain folder name (no slashes)")
        return v
