"""Hyper-parameters of this experiment, as dataclasses registered with Hydra's ConfigStore.

Every value is overridable from the command line, e.g.
``python codes/exp/<exp>/train.py preset=quick trainer.epochs=3 model.num_blocks=2``.
Shared groups (paths, data source, hardware presets) live in ``configs/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

EXP_NAME = Path(__file__).resolve().parent.name  # the folder name: a copied folder is a new experiment


@dataclass
class PathsConfig:
    data_dir: str = "data"
    synthetic_dir: str = "data/synthetic"
    output_dir: str = "outputs"


@dataclass
class DataConfig:
    source: str = "auto"  # auto | competition | synthetic
    synthetic_subjects: int = 20
    synthetic_seed: int = 0
    max_len: int = 128  # longer sequences keep their LAST max_len steps
    use_thm: bool = True
    tof_mode: str = "summary"  # none | summary | raw
    mirror_left_handed: bool = True
    sampling_rate_hz: float = 10.0
    n_folds: int = 5
    folds: list[int] | None = None  # a subset of folds to train, e.g. [0, 1]; None = all
    fold_seed: int = 42
    # probability of dropping a training sequence's thermopile and ToF inputs (the hidden test
    # set is half IMU-only)
    sensor_drop_prob: float = 0.5


@dataclass
class BertHeadConfig:
    """The ``transformers.BertModel`` run over [CLS] + the Squeezeformer's output steps."""

    hidden_size: int | None = None  # None = model.d_model (no projection)
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int | None = None  # None = 4 x hidden_size
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    attn_implementation: str = "sdpa"  # sdpa | eager (eager is needed for output_attentions)
    gradient_checkpointing: bool = False
    max_position_embeddings: int | None = None  # None = data.max_len + 1 (the CLS position)


@dataclass
class ModelConfig:
    d_model: int = 256
    num_blocks: int = 8
    num_heads: int = 8
    ff_dim: int = 1024
    conv_kernel: int = 31
    conv_expansion: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    time_reduction: bool = True  # the Squeezeformer's temporal U-Net
    positional_encoding: str = "sinusoidal"  # sinusoidal | learned | none
    # per-step layers run on the real steps only (attention and convolutions see the padded batch)
    pack_padded_steps: bool = True
    demographics_dim: int = 32
    use_demographics: bool = True
    head_dropout: float = 0.2
    bert: BertHeadConfig = field(default_factory=BertHeadConfig)
    # initialise the Squeezeformer + BERT stack from a checkpoint (e.g. NoiseBERT pretraining);
    # tensors are matched by name and shape, and the log lists what was loaded and what is new
    init_from: str | None = None


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda
    epochs: int = 60
    batch_size: int = 64
    num_workers: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_ratio: float = 0.05  # share of the optimizer steps spent warming up
    label_smoothing: float = 0.0
    bce_weight: float = 0.5  # weight of the target-vs-non-target BCE next to the 18-way CE
    bce_pos_weight: float = 1.0
    grad_clip: float = 1.0
    # EMA weights (decay warmed up as min(decay, (1 + n) / (10 + n))) are evaluated and saved; 0 = off
    ema_decay: float = 0.999
    early_stopping_patience: int = 10
    compile: bool = False
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    seed: int = 42  # fold k uses seed + k
    resume: bool = False
    # stop this process after N epochs as if interrupted (Kaggle session limits, tests); resume later
    interrupt_after_epochs: int | None = None
    wandb: bool = False  # log to Weights & Biases when installed


@dataclass
class Config:
    exp_name: str = EXP_NAME
    run_name: str = ""  # default: a timestamp; give it to resume a run
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    """Store the schema under the name ``configs/experiment.yaml`` starts from."""
    ConfigStore.instance().store(name="experiment_schema", node=Config)
