"""The training runs of ``benchmarks/gpu_check.sh``: train in this process, then report their speed.

    python benchmarks/gpu_check_run.py --exp exp019 --settings bf16,compile --results r.jsonl -- <overrides>
    python benchmarks/gpu_check_run.py --table r.jsonl

For each setting (:data:`SETTINGS`: its overrides added to the common ones), composes the
experiment's config as its ``train.py`` does (``configs/experiment.yaml`` with the Hydra
overrides), runs ``run_training`` in this process, and appends one JSON line to ``--results``:
the setting, every epoch's wall time from ``train.log`` (training + the two validation passes, as
the log states it), training sequences per second of each epoch, the training set's size, and the
peak GPU memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the run; on a
CPU the peak resident memory of the process instead). ``--table`` prints the collected lines as a
markdown table. The first epoch includes ``torch.compile``'s compilation (and CUDA-graph
recording): the table gives it apart from the median of the later epochs.

``GPU_CHECK_COMPILE_BACKEND=eager`` (the script's dry run) makes ``torch.compile`` use that
backend instead of inductor; the mode asked for is still checked and recorded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# the settings compared: name -> the overrides added to the common ones
SETTINGS: dict[str, list[str]] = {
    "bf16": [],
    "compile": ["machine.compile=true"],
    # exp019 drops the last ragged batch, so every step replays the same CUDA graph
    "reduce-overhead": [
        "machine.compile=true",
        "machine.compile_mode=reduce-overhead",
        "trainer.drop_last=true",
    ],
    # length-aware batches (codes/common/batching.py): each batch cut to its longest sequence
    # (eager) or to 32-step buckets (compiled: a bounded number of graphs), grouped by length
    "bf16-cut": ["data.pad_to_batch=true", "data.group_by_length=true"],
    "compile-bucketed": ["machine.compile=true", "data.pad_to_batch=true", "data.group_by_length=true"],
    "reduce-overhead-bucketed": [
        "machine.compile=true",
        "machine.compile_mode=reduce-overhead",
        "trainer.drop_last=true",
        "data.pad_to_batch=true",
        "data.group_by_length=true",
    ],
}
EPOCH_LINE = re.compile(r"fold (\d+) epoch (\d+): .*\(([\d.]+) s\)$")


def compose(exp: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    importlib.import_module(f"codes.exp.{exp}.config").register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base=None):
        return hydra_compose(config_name="experiment", overrides=overrides)


def train_size(cfg, exp: str, n_valid: int) -> int:
    """Sequences in the training part of the run's folds (the table is the run's cached one)."""
    from codes.common.data_source import resolve_data_dir
    from codes.common.runs import repo_path
    from codes.common.sequences import load_sequence_table

    dataset = importlib.import_module(f"codes.exp.{exp}.dataset")
    data_dir = resolve_data_dir(
        source=cfg.data.source, competition_dir=repo_path(cfg.paths.data_dir),
        synthetic_dir=repo_path(cfg.paths.synthetic_dir), synthetic_subjects=cfg.data.synthetic_subjects,
        synthetic_seed=cfg.data.synthetic_seed,
    )  # fmt: skip
    table = load_sequence_table(data_dir, "train", dataset.feature_settings(cfg.data))
    n_folds_trained = len(cfg.data.folds) if cfg.data.folds is not None else cfg.data.n_folds
    return n_folds_trained * len(table.labels) - n_valid


def use_compile_backend(backend: str, modes: list) -> None:
    """``torch.compile`` with ``backend`` instead of inductor (the dry run): the mode asked for is
    still checked (an unknown one fails) and recorded."""
    import torch
    from torch._inductor import list_mode_options

    original = torch.compile

    def compile_with_backend(model, *args, mode=None, **kwargs):
        list_mode_options(mode)
        modes.append(mode)
        return original(model, backend=backend)

    torch.compile = compile_with_backend


def run(exp: str, setting: str, overrides: list[str], results: Path) -> dict:
    import torch

    compile_modes: list = []
    backend = os.environ.get("GPU_CHECK_COMPILE_BACKEND")
    original_compile = torch.compile
    if backend:
        use_compile_backend(backend, compile_modes)
    cfg = compose(exp, overrides)
    train_module = importlib.import_module(f"codes.exp.{exp}.train")
    cuda = torch.cuda.is_available() and cfg.machine.device in ("cuda", "auto")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        metrics = train_module.run_training(cfg, overrides)
    finally:
        torch.compile = original_compile
    wall = time.perf_counter() - started
    from codes.common.runs import repo_path

    run_dir = repo_path(cfg.paths.output_dir) / cfg.exp_name / cfg.run_name
    epochs = [
        float(match.group(3))
        for line in (run_dir / "train.log").read_text().splitlines()
        if (match := EPOCH_LINE.search(line))
    ]
    n_train = train_size(cfg, exp, metrics["overall"]["n_sequences"])
    n_folds_trained = len(cfg.data.folds) if cfg.data.folds is not None else cfg.data.n_folds
    per_fold_train = n_train / n_folds_trained
    record = {
        "setting": setting,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "epoch_seconds": epochs,
        "sequences_per_second": [per_fold_train / s for s in epochs],
        "train_sequences_per_epoch": per_fold_train,
        "wall_seconds": wall,
        "cv_score": metrics["overall"]["score"],
        "compile": (f"mode {cfg.machine.get('compile_mode', 'default')}" if cfg.machine.compile else "off")
        + (
            f" (backend {backend}, modes asked for: {compile_modes})"
            if backend and cfg.machine.compile
            else ""
        ),
        "overrides": overrides,
    }
    if cuda:
        record["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # of the process
    with open(results, "a") as stream:
        stream.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return record


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [
        "| setting | device | compile | first epoch (s) | later epochs, median (s) | sequences/s (later epochs) | peak memory |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        epochs = row["epoch_seconds"]
        later = epochs[1:] or epochs
        median = statistics.median(later)
        memory = (
            f"{row['peak_gpu_allocated_gib']:.2f} GiB allocated, {row['peak_gpu_reserved_gib']:.2f} GiB reserved"
            if "peak_gpu_allocated_gib" in row
            else f"{row['peak_rss_gib']:.2f} GiB RSS (CPU)"
        )
        lines.append(
            f"| {row['setting']} | {row['device']} | {row['compile']} | {epochs[0]:.1f} | {median:.1f} | "
            f"{row['train_sequences_per_epoch'] / median:.1f} | {memory} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp", default="exp019")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}"
    )
    parser.add_argument("--run-name", default="gpu_check", help="runs are named <this>-<setting>")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--table", type=Path, help="print the results file as a markdown table and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every run")
    args = parser.parse_args()
    if args.table is not None:
        print(table(args.table))
        return
    if args.results is None:
        parser.error("--results is needed to run")
    settings = [name for name in args.settings.split(",") if name]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; known: {list(SETTINGS)}")
    for index, name in enumerate(settings):
        if index:  # several settings in one process (the dry run): on a GPU, from a clean slate
            import torch

            if torch.cuda.is_available():
                torch._dynamo.reset()
                torch.cuda.empty_cache()
        overrides = [*args.overrides, f"run_name={args.run_name}-{name}", *SETTINGS[name]]
        run(args.exp, name, overrides, args.results)


if __name__ == "__main__":
    main()
