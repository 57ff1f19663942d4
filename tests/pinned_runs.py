"""Tiny runs of the experiments whose metrics and OOF probabilities are pinned.

Moving shared plumbing must not change what an experiment computes. The references in
``tests/data/pinned_runs/`` were written by this module; ``test_pinned_runs.py`` repeats the
runs (same data, seed and thread count) and compares them with :func:`compare_with_reference`:

- **bit for bit** where the numerical environment is the one the references were written in
  (:func:`numerics_environment`: CPU model and flags, torch build and CPU kernels, oneDNN, MKL,
  numpy and its SIMD dispatch, threads, the variables that steer kernel dispatch);
- **at a stated tolerance** everywhere else (:data:`PROBABILITY_RTOL`, :data:`PROBABILITY_ATOL`,
  :data:`METRIC_RTOL`): other CPU kernels sum in another order, so the last float32 bits differ.
  ``CMI_PINNED_COMPARISON=tolerance`` forces this branch (CI runs both).

Each comparison says which branch ran (:data:`COMPARISONS`, printed at the end of the test run).

    python -m tests.pinned_runs --write      # rewrite the references (only when a change is meant)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import platform
import re
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch

from codes.common.schema import GESTURES
from tests.helpers import write_toy_data

PINNED_EXPERIMENTS = ("exp013", "exp018")
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "pinned_runs"
ENVIRONMENT_FILE = "machine.json"
PINNED_THREADS = (
    1  # the runs use one torch thread: the summation order does not depend on the machine's cores
)

# The tolerance branch. Measured on a 2-core AMD EPYC (AVX512), the pinned runs with other CPU kernels
# (ATEN_CPU_CAPABILITY=avx2 / default, ONEDNN_MAX_CPU_ISA=AVX2 with numpy's AVX512 dispatch off) and the
# references written on another x86-64 AVX512 machine differ by at most 4.1e-7 relative and 2.3e-8 absolute in
# the OOF probabilities (a few float32 ulps): the tolerances leave a factor of 25 over that. A run with
# the learning rate changed by 1% differs far beyond them (tested). The smallest top-2 margin of the
# reference probabilities (2.4e-4) is far above them, so the same predictions give the same scores.
PROBABILITY_RTOL = 1e-5
PROBABILITY_ATOL = 5e-7
METRIC_RTOL = 1e-5  # losses, scores and learning rates of metrics.json
COMPARISON_MODES = ("auto", "tolerance")
COMPARISONS: list[str] = []  # which comparison each test ran; printed by tests/conftest.py
TINY_MODEL = {
    "d_model": 32,
    "num_blocks": 4,
    "num_heads": 4,
    "ff_dim": 64,
    "conv_kernel": 7,
    "demographics_dim": 8,
}
TINY_BERT = {"num_layers": 2, "num_heads": 4}


def pinned_overrides(exp: str, data_dir: Path, output_dir: Path) -> list[str]:
    """The quick variant on the CPU, 2 folds x 3 epochs (batch 8) of a tiny model on the toy data."""
    overrides = [
        "variant=quick",
        "machine=cpu",
        "data=competition",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={output_dir}",
        "run_name=pinned",
        "data.n_folds=2",
        "data.max_len=64",
        "trainer.batch_size=8",
        "trainer.epochs=3",
        *[f"model.{k}={v}" for k, v in TINY_MODEL.items()],
    ]
    if exp in ("exp018", "exp019"):
        overrides += [f"model.bert.{k}={v}" for k, v in TINY_BERT.items()]
    return overrides


# exp019 with every part of its recipe switched off, and exp018's quick schedule: exp018's computation
EXP019_AS_EXP018 = [
    "data.max_len=64",
    "model.dropout=0.1",
    "model.attention_dropout=0.1",
    "model.head_dropout=0.2",
    "model.head_pooling=cls",
    "model.head_norm=false",
    "model.cls_init_std=0.0",
    "model.orientation_head=false",
    "model.bert.position_embeddings=learned",
    "model.bert.hidden_dropout=0.1",
    "model.bert.attention_dropout=0.1",
    "trainer.lr=0.002",
    "trainer.warmup_ratio=0.05",
    "trainer.bert_lr_scale=1.0",
    "trainer.orientation_weight=0.0",
    "trainer.label_smoothing=0.0",
    "trainer.ema_decay=0.999",
    "trainer.early_stopping_patience=5",
    "trainer.drop_last=false",
    "trainer.seeds=null",
    "augment.stretch_prob=0.0",
    "augment.shift_max_steps=0",
    "augment.rotation_prob=0.0",
    "augment.flip_prob=0.0",
    "augment.mixup_prob=0.0",
]


def run_pinned(
    exp: str, data_dir: Path, output_dir: Path, extra: list[str] | None = None
) -> tuple[dict, np.ndarray]:
    """(metrics.json's content, the OOF probabilities (N, 18) in oof.parquet's row order).

    ``extra`` overrides come last (exp019 run as exp018: ``EXP019_AS_EXP018``, with exp018's
    BERT overrides)."""
    from hydra import compose, initialize_config_dir

    importlib.import_module(f"codes.exp.{exp}.config").register_configs()
    train_module = importlib.import_module(f"codes.exp.{exp}.train")
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(
            config_name="experiment", overrides=[*pinned_overrides(exp, data_dir, output_dir), *(extra or [])]
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(PINNED_THREADS)
    try:
        train_module.run_training(cfg)
    finally:
        torch.set_num_threads(threads)
    run_dir = output_dir / exp / "pinned"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    oof = pl.read_parquet(run_dir / "oof.parquet")
    return metrics, oof.select([f"prob_{g}" for g in GESTURES]).to_numpy()


def comparable_metrics(metrics: dict) -> dict:
    """metrics.json without what depends on the clock."""
    overall = {k: v for k, v in metrics["overall"].items() if k != "wall_seconds"}
    folds = {k: {m: v for m, v in f.items() if m != "train_seconds"} for k, f in metrics["folds"].items()}
    return {"overall": overall, "folds": folds, "history": metrics["history"]}


def _cpu_description() -> dict[str, str]:
    """The CPU's model and a digest of its feature flags (Linux /proc/cpuinfo; elsewhere what
    ``platform`` tells)."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in (
                "vendor_id",
                "cpu family",
                "model",
                "model name",
                "stepping",
                "flags",
                "CPU implementer",
                "CPU architecture",
                "CPU variant",
                "CPU part",
                "Features",
            ):
                fields.setdefault(key, value.strip())
            if not line.strip() and fields:
                break  # the first processor's block
    flags = " ".join(sorted(fields.pop("flags", fields.pop("Features", "")).split()))
    description = {k: v for k, v in sorted(fields.items())}
    description["processor"] = platform.processor()
    description["flags_sha256"] = hashlib.sha256(flags.encode()).hexdigest()[:16]
    return description


def _library_versions() -> dict[str, str]:
    """torch's build and the math libraries it was built with (oneDNN, MKL / OpenBLAS lines)."""
    shown = torch.__config__.show()
    libraries = [
        line.strip(" -")
        for line in shown.splitlines()
        if re.search(r"Math Kernel Library|MKL-DNN|oneDNN|OpenBLAS|LAPACK|Accelerate|NNPACK|OpenMP", line)
        and "Build settings" not in line
    ]
    build = re.search(r"COMMIT_SHA=([0-9a-f]+)", shown)
    return {
        "torch": torch.__version__,
        "torch_commit": build.group(1) if build else "",
        "math_libraries": "; ".join(libraries),
        "numpy": np.__version__,
    }


def _numpy_dispatch() -> str:
    """The SIMD features numpy dispatches to on this machine."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return " ".join(name for name, on in __cpu_features__.items() if on)


# variables that change which kernels run (and so the rounding) without changing the machine
DISPATCH_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    "NPY_DISABLE_CPU_FEATURES",
    "NPY_ENABLE_CPU_FEATURES",
)


def numerics_environment() -> dict[str, str]:
    """Everything that decides the bits of the pinned runs' floats, as strings.

    Two machines with equal environments compute the same bits; any difference (another CPU
    model or flag, another torch build, oneDNN or MKL, another numpy dispatch, another thread
    count, a dispatch variable) allows other rounding."""
    return {
        "machine": platform.machine(),
        **{f"cpu.{k}": v for k, v in _cpu_description().items()},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **_library_versions(),
        "numpy_dispatch": _numpy_dispatch(),
        "torch_threads": str(PINNED_THREADS),
        **{f"env.{name}": os.environ.get(name, "") for name in DISPATCH_VARIABLES},
    }


def environment_differences(reference: dict[str, str], current: dict[str, str]) -> list[str]:
    """``key: reference -> current`` for every entry that differs (absent entries differ too)."""
    return [
        f"{key}: {reference.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r}"
        for key in sorted(set(reference) | set(current))
        if reference.get(key) != current.get(key)
    ]


def comparison_mode() -> str:
    """``CMI_PINNED_COMPARISON``: ``auto`` (default: bits where the environment is the
    reference's) or ``tolerance`` (always the tolerance branch)."""
    mode = os.environ.get("CMI_PINNED_COMPARISON", "auto").strip().lower() or "auto"
    if mode not in COMPARISON_MODES:
        raise ValueError(f"CMI_PINNED_COMPARISON={mode!r}: use one of {COMPARISON_MODES}")
    return mode


def _numbers_close(reference: object, current: object, where: str, failures: list[str]) -> None:
    """Collect into ``failures`` every number of ``current`` farther than METRIC_RTOL from ``reference``."""
    if isinstance(reference, dict) and isinstance(current, dict):
        for key in sorted(set(reference) | set(current)):
            if key not in reference or key not in current:
                failures.append(f"{where}.{key}: present in only one of them")
            else:
                _numbers_close(reference[key], current[key], f"{where}.{key}", failures)
    elif isinstance(reference, list) and isinstance(current, list):
        if len(reference) != len(current):
            failures.append(f"{where}: {len(reference)} entries -> {len(current)}")
        for i, (a, b) in enumerate(zip(reference, current, strict=False)):
            _numbers_close(a, b, f"{where}[{i}]", failures)
    elif isinstance(reference, float) or isinstance(current, float):
        if not math.isclose(reference, current, rel_tol=METRIC_RTOL, abs_tol=1e-12):
            failures.append(f"{where}: {reference!r} -> {current!r}")
    elif reference != current:
        failures.append(f"{where}: {reference!r} -> {current!r}")


def compare_with_reference(
    name: str, probabilities: np.ndarray, metrics: dict | None, reference_name: str | None = None
) -> str:
    """Assert that a pinned run computed its reference's numbers; return which comparison ran.

    ``reference_name`` is the reference's experiment (default ``name``); ``metrics`` None
    compares the probabilities only. Bit for bit where :func:`numerics_environment` equals the
    one recorded with the references and ``CMI_PINNED_COMPARISON`` is not ``tolerance``; else at
    :data:`PROBABILITY_RTOL` / :data:`PROBABILITY_ATOL` (probabilities) and :data:`METRIC_RTOL`
    (every float of metrics.json, integers exactly)."""
    reference_name = reference_name or name
    reference = np.load(REFERENCE_DIR / f"{reference_name}_oof_probabilities.npy")
    recorded = json.loads((REFERENCE_DIR / ENVIRONMENT_FILE).read_text())
    differences = environment_differences(recorded, numerics_environment())
    mode = comparison_mode()
    assert probabilities.shape == reference.shape, f"{name}: shape {probabilities.shape} != {reference.shape}"
    changed = int((probabilities != reference).sum())
    deviation = np.abs(probabilities.astype(np.float64) - reference)
    measured = f"{changed} of {reference.size} values differ, max abs {deviation.max():.2e}"
    if mode == "auto" and not differences:
        description = f"{name}: bit for bit (same numerical environment as the references; {measured})"
        COMPARISONS.append(description)
        assert changed == 0, f"{name}: OOF probabilities differ from the pinned run ({measured})"
        if metrics is not None:
            expected = json.loads((REFERENCE_DIR / f"{reference_name}_metrics.json").read_text())
            assert json.loads(json.dumps(comparable_metrics(metrics))) == expected
        return description
    why = (
        "forced by CMI_PINNED_COMPARISON=tolerance"
        if mode == "tolerance"
        else (
            "the numerical environment differs from the references': "
            + "; ".join(differences[:4])
            + (f"; ... ({len(differences)} in all)" if len(differences) > 4 else "")
        )
    )
    description = (
        f"{name}: at tolerance rtol={PROBABILITY_RTOL:g} atol={PROBABILITY_ATOL:g}, metrics rtol={METRIC_RTOL:g} "
        f"({why}; {measured})"
    )
    COMPARISONS.append(description)
    np.testing.assert_allclose(
        probabilities,
        reference,
        rtol=PROBABILITY_RTOL,
        atol=PROBABILITY_ATOL,
        err_msg=f"{name}: OOF probabilities differ from the pinned run beyond the tolerance",
    )
    if metrics is not None:
        expected = json.loads((REFERENCE_DIR / f"{reference_name}_metrics.json").read_text())
        failures: list[str] = []
        _numbers_close(expected, json.loads(json.dumps(comparable_metrics(metrics))), "metrics", failures)
        assert not failures, f"{name}: metrics differ beyond rtol {METRIC_RTOL:g}: " + "; ".join(failures[:5])
    return description


def write_references() -> None:
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        data_dir = write_toy_data(Path(temporary) / "toy_data")
        for exp in PINNED_EXPERIMENTS:
            metrics, probabilities = run_pinned(exp, data_dir, Path(temporary) / "outputs")
            np.save(REFERENCE_DIR / f"{exp}_oof_probabilities.npy", probabilities)
            (REFERENCE_DIR / f"{exp}_metrics.json").write_text(
                json.dumps(comparable_metrics(metrics), indent=1)
            )
    (REFERENCE_DIR / ENVIRONMENT_FILE).write_text(json.dumps(numerics_environment(), indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="rewrite the references")
    if parser.parse_args().write:
        write_references()
