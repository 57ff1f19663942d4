"""Hyper-parameters of this experiment, as dataclasses registered with Hydra's ConfigStore.

This file is the truth about what a run of this experiment does: nothing in ``configs/``
overrides a value defined here (``configs/`` holds only the machine: paths, data source,
device, precision, compile, threads; see ``codes/common/machine.py``). Every value is
overridable from the command line, e.g.
``python codes/exp/<exp>/train.py trainer.epochs=3 model.num_blocks=2``, and the named variants
below change the values they list: ``python codes/exp/<exp>/train.py variant=quick``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from codes.common.machine import MachineConfig, PathsConfig

EXP_NAME = Path(__file__).resolve().parent.name  # the folder name: a copied folder is a new experiment


@dataclass
class DataConfig:
    source: str = "auto"  # auto | competition | synthetic (set by configs/data/, the machine's choice)
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
    # length-aware batches (codes/common/batching.py, docs/batching.md): true cuts every batch to
    # its longest real sequence (training, validation, the OOF pass, batch inference); false pads
    # every batch to max_len, as every run of this experiment before the switch existed
    pad_to_batch: bool = False
    length_bucket: int = 32  # with machine.compile: cut lengths rounded up to a multiple of this
    # batches of similar lengths (Hugging Face's group_by_length: shuffled mega-batches of
    # group_mega_batches batches, sorted by length inside); false = a plain shuffle
    group_by_length: bool = False
    group_mega_batches: int | None = None  # None: min(50, training sequences / (4 x batch_size))


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
    epochs: int = 60
    batch_size: int = 64
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
    machine: MachineConfig = field(default_factory=MachineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# Named variants: `train.py variant=NAME` sets the values listed here over the defaults above.
VARIANTS: dict[str, dict] = {
    # a whole 5-fold run on the 20-subject synthetic data in minutes on 2 CPU cores
    "quick": {
        "data": {"max_len": 64},
        "model": {"d_model": 64, "num_blocks": 4, "num_heads": 4, "ff_dim": 128, "conv_kernel": 15},
        "trainer": {"epochs": 9, "lr": 2.0e-3, "early_stopping_patience": 5},
    },
    # seconds on a CPU: checks that the code runs end to end (the contract tests use it), not that it learns
    "smoke": {
        "data": {"max_len": 64, "n_folds": 2},
        "model": {
            "d_model": 32,
            "num_blocks": 4,
            "num_heads": 4,
            "ff_dim": 64,
            "conv_kernel": 7,
            "demographics_dim": 8,
            "bert": {"num_layers": 2, "num_heads": 4},
        },
        "trainer": {"epochs": 2, "batch_size": 16, "lr": 2.0e-3},
    },
}


def register_configs() -> None:
    """Store the schema and the variants under the names ``configs/experiment.yaml`` uses.

    Every experiment stores under the same names; the last one stored is composed (tests that
    compose two experiments call this before each). Variants of another experiment are dropped.
    """
    store = ConfigStore.instance()
    store.repo.pop("variant", None)
    store.store(name="experiment_schema", node=Config)
    for name, values in VARIANTS.items():
        store.store(group="variant", name=name, node=values, package="_global_")
