"""What every experiment's ``inference.py`` does, given how the experiment builds its model.

An experiment folder's ``inference.py`` keeps only what is its own (``build_model`` and
``feature_settings``, imported from its ``model.py`` and ``dataset.py``) and calls
:func:`load_run_predictor` and :func:`batch_main` with them.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch

from codes.common.distributed import resolve_device
from codes.common.features import FeatureSettings, feature_layout
from codes.common.machine import apply_num_threads, autocast_dtype
from codes.common.protocol import PROTOCOL_FILE, read_protocol
from codes.common.runs import REPO_ROOT, setup_logging
from codes.inference.batch import SUBMISSION_FILE, resolve_test_dir, run_batch
from codes.inference.predictor import EnsemblePredictor, FoldMember, check_batch_size, quantize_for_cpu
from codes.inference.run_folder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ConfigView,
    RunFolderError,
    check_config_against_record,
    fold_seed_folders,
    load_fold_weights,
    load_normalizer,
    load_run_config,
    select_folds,
    weights_mismatch,
)
from codes.inference.subject_assignment import AssignmentClasses, SubjectAssignment

if TYPE_CHECKING:
    from omegaconf import DictConfig

logger = logging.getLogger(__name__)

BuildModel = Callable[[ConfigView, int], torch.nn.Module]


def run_precision(cfg: ConfigView) -> str:
    """The precision a run trained with: ``machine.precision`` (``trainer.precision`` in run
    folders written before the machine section existed)."""
    if "machine" in cfg:
        return cfg.machine.precision
    return cfg.trainer.get("precision", "auto")


SUBJECT_AWARE_BY_DEFAULT = False  # load_predictor's default; the Kaggle script's is "pairs"
# subject_aware="pairs": on only where it pays (docs/results.md): the run folder's protocol counts
# gesture x orientation pairs and the model gives the heads of the joint; plain answers otherwise
ONLY_WITH_PAIRS = "pairs"


def subject_assignment_of(
    run_dir: Path,
    subject_aware: bool | str | None,
    overflow_penalty: float,
    joint: str = "auto",
    plain_until: int = 0,
) -> SubjectAssignment | None:
    """The run's :class:`SubjectAssignment`, or None (off, or a run folder without protocol.json).

    Pair level (``joint``: auto or one of ``subject_assignment.JOINTS``) where the run folder's
    protocol counts pairs, with a fall-back to gesture level for a model without the heads the
    joint needs; gesture level (said once, here) for a version-1 protocol.json or ``joint="gesture"``.
    ``subject_aware="pairs"``: pair level only, never gesture level (no pair counts, or a model
    without the heads: plain answers, said once).
    """
    if subject_aware == ONLY_WITH_PAIRS:
        return pair_level_only(run_dir, overflow_penalty, joint, plain_until)
    if isinstance(subject_aware, str):
        raise ValueError(
            f"subject_aware must be true, false, None or {ONLY_WITH_PAIRS!r}, got {subject_aware!r}"
        )
    wanted = SUBJECT_AWARE_BY_DEFAULT if subject_aware is None else bool(subject_aware)
    if not wanted:
        return None
    protocol = read_protocol(run_dir)
    if protocol is None:
        if subject_aware:
            raise RunFolderError(
                f"subject_aware=True but {run_dir} has no {PROTOCOL_FILE} (written by training since "
                "subject-aware inference exists): retrain, or pass subject_aware=False"
            )
        logger.info("%s has no %s: each sequence is answered alone", run_dir, PROTOCOL_FILE)
        return None
    if joint != "gesture" and not protocol.has_pairs:
        logger.warning(
            "%s is protocol version %d (gesture counts only): subject-aware answers at gesture "
            "level; a run trained by the current code counts gesture x orientation pairs",
            run_dir / PROTOCOL_FILE,
            protocol.version,
        )
    classes = AssignmentClasses.from_protocol(protocol, joint)
    fallback = AssignmentClasses.gesture_level(protocol.gestures) if classes.level == "pair" else None
    return SubjectAssignment(classes, overflow_penalty, plain_until=plain_until, fallback=fallback)


def pair_level_only(
    run_dir: Path, overflow_penalty: float, joint: str, plain_until: int
) -> SubjectAssignment | None:
    """``subject_aware="pairs"``: the pair-level assignment, or None (plain answers) where the run
    folder's protocol.json does not count pairs; a model without the joint's heads answers plain."""
    protocol = read_protocol(run_dir)
    if protocol is None or not protocol.has_pairs or joint == "gesture":
        logger.info(
            "%s: no pair counts (%s): each sequence is answered alone",
            run_dir / PROTOCOL_FILE,
            "no file" if protocol is None else f"protocol version {protocol.version}",
        )
        return None
    plain = AssignmentClasses.gesture_level(np.zeros_like(protocol.gestures))  # no capacity: the argmax
    return SubjectAssignment(
        AssignmentClasses.from_protocol(protocol, joint),
        overflow_penalty,
        plain_until=plain_until,
        fallback=plain,
    )


def mismatch_advice(run_dir: Path, cfg: ConfigView, exp_name: str) -> str:
    """What to do when a checkpoint does not fit the model ``exp_name`` builds from the run's config."""
    trained_by = cfg.get("exp_name")
    if trained_by != exp_name:
        return f"the run was trained by {trained_by}: load it with codes/exp/{trained_by}/inference.py"
    return (
        f"{run_dir / CONFIG_FILE} no longer describes the trained model (an edited model.* or data.* "
        "setting?): restore it from the original run folder"
    )


def fold_model(
    build_model: BuildModel,
    cfg: ConfigView,
    n_features: int,
    weights: dict[str, torch.Tensor],
    checkpoint: Path,
    advice: str,
) -> torch.nn.Module:
    """``build_model(cfg, n_features)`` holding ``weights`` (of ``checkpoint``); a
    :class:`RunFolderError` naming the checkpoint, the tensors that do not fit and ``advice``."""
    try:
        model = build_model(cfg, n_features)
        mismatch = weights_mismatch(model.state_dict(), weights)
        if not mismatch:
            model.load_state_dict(weights)
    except (AttributeError, KeyError, RuntimeError, ValueError) as error:
        first_line = (str(error).splitlines() or [""])[0][:300]
        raise RunFolderError(
            f"{checkpoint}: the checkpoint does not fit the model built from the run's config "
            f"({type(error).__name__}: {first_line}); {advice}"
        ) from None
    if mismatch:
        raise RunFolderError(
            f"{checkpoint}: the checkpoint's tensors do not fit the model built from the run's config "
            f"({'; '.join(mismatch)}); {advice}"
        )
    return model


def load_run_predictor(
    run_dir: str | Path,
    exp_name: str,
    build_model: BuildModel,
    feature_settings: Callable[[ConfigView], FeatureSettings],
    folds: Iterable[int] | None = None,
    device: str | torch.device = "auto",
    strict: bool = False,
    quantize: bool = False,
    fold_threads: int = 1,
    precision: str | None = None,
    num_threads: int | None = None,
    subject_aware: bool | str | None = None,
    overflow_penalty: float = math.inf,
    joint: str = "auto",
    plain_until: int = 0,
) -> EnsemblePredictor:
    """Every trained fold of ``run_dir`` (or only ``folds``) as one :class:`EnsemblePredictor`.

    ``build_model(cfg, n_features)`` builds the model exactly as training did for a fold.
    ``quantize=True`` (CPU only) turns the Linear layers into dynamic int8 ones: faster, with
    probabilities that differ slightly from training's (see ``quantize_for_cpu``).
    ``fold_threads=2`` runs two fold models at once (on a CPU, with ``torch.set_num_threads(1)``).
    ``precision``: None = training's rule for the run (bf16 autocast on CUDA, fp32 on CPU unless
    the run trained in bf16); ``"bf16"`` forces bf16 autocast (on a CPU with AVX-512 BF16 the
    matrix products run about twice as fast), ``"fp32"`` none.
    ``subject_aware``: answer each sequence jointly with its subject's earlier ones under the
    training data's per-subject gesture counts (``codes/inference/subject_assignment.py``; the
    run folder's ``protocol.json``); None = :data:`SUBJECT_AWARE_BY_DEFAULT` when the run folder
    has the counts. ``overflow_penalty``: nats per sequence beyond a class's count (inf = hard).
    ``joint``: how the pair-level assignment gets p(gesture, orientation) from the heads (auto,
    product, pair, pair_product; gesture = gesture level); ``plain_until``: a subject's first
    ``plain_until - 1`` sequences are answered plain (docs/inference.md).
    ``num_threads``: ``torch.set_num_threads`` for the process (None: torch's default, one per
    core); 1 on a shared or busy CPU and with ``fold_threads`` > 1 (docs/inference.md, Speed).
    """
    if num_threads is not None:
        if isinstance(num_threads, bool) or int(num_threads) != num_threads or num_threads < 1:
            raise ValueError(f"num_threads must be a positive whole number or None, got {num_threads!r}")
        apply_num_threads(int(num_threads))
    started = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    check_config_against_record(run_dir, cfg)
    trained_by = cfg.get("exp_name")
    if trained_by != exp_name:
        logger.warning("%s was trained by %s; loading it with %s's model code", run_dir, trained_by, exp_name)
    settings = feature_settings(cfg.data)
    n_features = len(feature_layout(settings)[0])
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if quantize and device.type != "cpu":
        raise ValueError(f"quantize=true is a CPU setting; the device is {device}")
    members, kinds = [], set()
    advice = mismatch_advice(run_dir, cfg, exp_name)
    for fold in select_folds(run_dir, folds):
        normalizer = load_normalizer(run_dir, fold)
        # the fold's model, and those of further seeds (trainer.seeds): averaged like folds
        for seed_folder in [None, *fold_seed_folders(run_dir, fold)]:
            weights, kind = load_fold_weights(run_dir, fold, seed_folder)
            checkpoint = run_dir / f"fold{fold}" / (seed_folder or "") / CHECKPOINT_FILE
            model = fold_model(build_model, cfg, n_features, weights, checkpoint, advice)
            model = quantize_for_cpu(model) if quantize else model
            members.append(FoldMember(fold, model, normalizer))
            kinds.add(kind)
    predictor = EnsemblePredictor(
        members,
        settings,
        cfg.data.max_len,
        device=device,
        autocast_dtype=autocast_dtype(precision or run_precision(cfg), device),
        strict=strict,
        fold_threads=fold_threads,
        subject_assignment=subject_assignment_of(
            run_dir, subject_aware, overflow_penalty, joint, plain_until
        ),
        pad_to_batch=bool(cfg.data.get("pad_to_batch", False)),  # as the run validated
    )
    logger.info(
        "loaded %s folds %s (%s weights%s) on %s in %.2f s",
        run_dir,
        predictor.folds,
        "/".join(sorted(kinds)),
        ", int8 Linear layers" if quantize else "",
        device,
        time.perf_counter() - started,
    )
    return predictor


@dataclass
class InferenceConfig:
    """Batch mode's command-line settings (``key=value``, as in training)."""

    run_dir: str = field(default="", metadata={"help": "the run folder train.py wrote (required)"})
    data: str = field(
        default="auto",
        metadata={
            "help": "auto | competition | synthetic | a folder with test.csv and test_demographics.csv"
        },
    )
    output: str = field(
        default="", metadata={"help": "the submission file to write (default: <run_dir>/submission.csv)"}
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:<k>"})
    batch_size: int = field(
        default=64, metadata={"help": "sequences predicted at once (a whole number >= 1)"}
    )
    folds: list[int] | None = field(
        default=None, metadata={"help": "the folds to serve, e.g. [0,1] (default: every trained fold)"}
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (default: torch's own choice)"}
    )
    subject_aware: bool | None = field(
        default=None,
        metadata={"help": "answer with the subject's earlier sequences (default: off; needs protocol.json)"},
    )
    overflow_penalty: float = field(
        default=math.inf,
        metadata={"help": "subject-aware: nats per sequence beyond a class's per-subject count"},
    )
    joint: str = field(
        default="auto",
        metadata={
            "help": "subject-aware: p(gesture, orientation) from auto|product|pair|pair_product; gesture = gesture level"
        },
    )
    plain_until: int = field(
        default=0,
        metadata={"help": "subject-aware: a subject's first plain_until - 1 sequences answered plain"},
    )
    order_seed: int = field(
        default=0, metadata={"help": "the shuffled order the sequences are served in (as the gateway does)"}
    )
    quantize: bool = field(
        default=False, metadata={"help": "CPU: int8 Linear layers (faster, slightly different probabilities)"}
    )
    fold_threads: int = field(
        default=1,
        metadata={"help": "fold models run at once for a single sequence (predict(); not batch mode)"},
    )
    precision: str | None = field(
        default=None, metadata={"help": "training's rule when unset; bf16 | fp32 to force autocast on or off"}
    )


def batch_usage(exp_name: str) -> str:
    """The ``--help`` text of batch mode: every setting with its default, and an example."""
    settings = [(f.name, _cli_value(f.default), f.metadata["help"]) for f in fields(InferenceConfig)]
    width = max(len(f"{name}={default}") for name, default, _ in settings)
    lines = [
        f"usage: python codes/exp/{exp_name}/inference.py run_dir=outputs/{exp_name}/<run> [key=value ...]",
        "",
        "settings (key=default):",
        *(f"  {f'{name}={default}':<{width}}  {text}" for name, default, text in settings),
        "",
        "example:",
        f"  python codes/exp/{exp_name}/inference.py run_dir=outputs/{exp_name}/<run> data=synthetic "
        "device=cpu folds=[0,1] output=submission.csv",
    ]
    return "\n".join(lines)


def _cli_value(value: Any) -> str:
    """A default as it is typed on the command line (null, true/false)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_batch_arguments(args: Sequence[str], exp_name: str) -> DictConfig:
    """The :class:`InferenceConfig` of ``key=value`` arguments (:func:`parse_key_values`)."""
    return parse_key_values(
        args,
        InferenceConfig,
        [f.name for f in fields(InferenceConfig)],
        batch_usage(exp_name),
        "inference.py",
    )


def parse_key_values(
    args: Sequence[str], schema: type, valid: Sequence[str], usage: str, program: str
) -> DictConfig:
    """``key=value`` arguments over the dataclass ``schema``'s defaults (OmegaConf). ``-h`` /
    ``--help`` prints ``usage`` and exits 0; an argument that is no ``key=value`` of a key in
    ``valid``, or a value of the wrong type, is a one-line error naming it (with the valid keys),
    ``<program>: error: ...`` on stderr, and exit code 2."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if {"-h", "--help"} & set(args):
        print(usage)
        raise SystemExit(0)
    for argument in args:
        key = argument.split("=", 1)[0]
        if "=" not in argument or key not in valid:
            what = f"unknown setting {key!r}" if "=" in argument else f"{argument!r} is not key=value"
            usage_error(program, f"{what}; the settings are {', '.join(valid)} (--help lists their defaults)")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_cli(list(args)))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        where = f"{key}: " if key else ""
        usage_error(
            program, f"{where}{str(error).splitlines()[0]} (--help lists the settings and their defaults)"
        )


def usage_error(program: str, message: str) -> NoReturn:
    print(f"{program}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def batch_main(
    load_predictor: Callable[..., EnsemblePredictor], exp_name: str, argv: Sequence[str] | None = None
) -> dict | None:
    """Batch mode of an experiment's ``inference.py``: test.csv -> submission.csv (+ the score)."""
    cfg = parse_batch_arguments(list(sys.argv[1:] if argv is None else argv), exp_name)
    setup_logging(None)
    if not cfg.run_dir:
        raise SystemExit(f"run_dir=outputs/{exp_name}/<run> is required (a folder train.py wrote)")
    check_batch_size(cfg.batch_size)  # before the folds load
    run_dir = Path(cfg.run_dir)
    predictor = load_predictor(
        run_dir,
        cfg.folds,
        cfg.device,
        quantize=cfg.quantize,
        precision=cfg.precision,
        num_threads=cfg.num_threads,  # torch.set_num_threads before the folds load
        subject_aware=cfg.subject_aware,
        overflow_penalty=cfg.overflow_penalty,
        joint=cfg.joint,
        plain_until=cfg.plain_until,
    )
    data_dir = resolve_test_dir(cfg.data, load_run_config(run_dir), REPO_ROOT)
    output = Path(cfg.output) if cfg.output else run_dir / SUBMISSION_FILE
    scores = run_batch(
        predictor, data_dir, output, batch_size=cfg.batch_size, order_seed=cfg.order_seed, run_dir=run_dir
    )
    print(f"submission: {output}")
    return scores
