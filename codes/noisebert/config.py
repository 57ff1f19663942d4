"""NoiseBERT pretraining settings, as dataclasses registered with Hydra's ConfigStore.

``configs/noisebert.yaml`` starts from this schema and adds the shared groups (paths, data
source, machine). The ``model`` section has exp018's names and defaults, and the ``quick``
variant exp018's quick sizes, so ``variant=quick`` here gives weights of the shapes exp018
builds with ``variant=quick`` (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from codes.common.machine import MachineConfig, PathsConfig
from codes.noisebert.dataset import MaskingConfig
from codes.noisebert.noise import VibrationNoiseConfig

__all__ = ["VARIANTS", "NoiseBERTRunConfig", "register_configs"]


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
    include_test: bool = True  # the test sequences are unlabelled pretraining data too
    # length-aware batches (codes/common/batching.py): true cuts every batch to its longest real
    # sequence; false pads every batch to max_len (every pretraining run before the switch)
    pad_to_batch: bool = False
    length_bucket: int = 32  # with machine.compile: cut lengths rounded up to a multiple of this
    valid_fraction: float = 0.1  # share of the train subjects held out for validation
    split_seed: int = 0
    # where the vibration goes: raw (the raw acceleration and rotation, before the features) |
    # features (added to the normalised IMU features, as runs before 2026-12-04)
    noise_domain: str = "raw"
    # strict pretraining for fine-tuning fold k: every sequence of fold k's subjects (train and
    # test file) is left out; the folds are the experiments' (folds.csv, else n_folds/fold_seed)
    exclude_fold: int | None = None
    n_folds: int = 5
    fold_seed: int = 42


@dataclass
class BertHeadConfig:
    hidden_size: int | None = None  # None = model.d_model
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int | None = None  # None = 4 x hidden_size
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    attn_implementation: str = "sdpa"  # sdpa | eager
    gradient_checkpointing: bool = False
    max_position_embeddings: int | None = None  # None = data.max_len + 1


@dataclass
class ModelConfig:
    """The Squeezeformer + BERT stack, with exp018's field names and defaults."""

    d_model: int = 256
    num_blocks: int = 8
    num_heads: int = 8
    ff_dim: int = 1024
    conv_kernel: int = 31
    conv_expansion: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    time_reduction: bool = True
    positional_encoding: str = "sinusoidal"
    # per-step layers run on the real steps only (attention and convolutions see the padded batch)
    pack_padded_steps: bool = True
    bert: BertHeadConfig = field(default_factory=BertHeadConfig)


@dataclass
class RegularizerConfig:
    """lambda x penalty on the CLS attention mass over the noise region."""

    weight: float = 0.1  # lambda (measured in docs/results.md); 0 = masked reconstruction only
    form: str = "mass"  # mass | log (-log(1 - mass))
    layers: str = "last"  # last | all BERT layers (heads are averaged)
    region: str = "intervals"  # intervals (steps of the noisy intervals) | steps (noisy steps)
    log_floor: float = 1e-4  # 1 - mass is clamped to at least this for the log form


@dataclass
class ClsObjectiveConfig:
    """The CLS output predicts a summary of the clean sequence (per-channel mean and standard
    deviation over its real steps), so the CLS token must collect information from the steps and
    the penalty has something to trade against (docs/noisebert.md)."""

    weight: float = 1.0  # 0 = no CLS objective (the CLS output is then unused in pretraining)


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    early_stopping_patience: int = 10  # epochs without a better validation masked MSE
    seed: int = 42
    resume: bool = False
    interrupt_after_epochs: int | None = None  # stop as if interrupted (tests, session limits)


@dataclass
class NoiseBERTRunConfig:
    exp_name: str = "noisebert"
    run_name: str = ""  # default: a timestamp; give it to resume a run
    paths: PathsConfig = field(default_factory=PathsConfig)
    machine: MachineConfig = field(default_factory=MachineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: VibrationNoiseConfig = field(default_factory=VibrationNoiseConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    cls_objective: ClsObjectiveConfig = field(default_factory=ClsObjectiveConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# Named variants: `python -m codes.noisebert.pretrain variant=NAME` sets these values over the defaults.
VARIANTS: dict[str, dict] = {
    # CPU-sized; the model section matches exp018's quick variant (fine-tune with variant=quick)
    "quick": {
        "data": {"max_len": 64},
        "model": {"d_model": 64, "num_blocks": 4, "num_heads": 4, "ff_dim": 128, "conv_kernel": 15},
        "trainer": {"epochs": 9, "lr": 2.0e-3, "early_stopping_patience": 5},
    },
}


def register_configs() -> None:
    """Store the schema and the variants under the names ``configs/noisebert.yaml`` uses."""
    store = ConfigStore.instance()
    store.repo.pop("variant", None)
    store.store(name="noisebert_schema", node=NoiseBERTRunConfig)
    for name, values in VARIANTS.items():
        store.store(group="variant", name=name, node=values, package="_global_")
