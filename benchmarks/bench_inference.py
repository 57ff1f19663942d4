"""Inference latency of a run folder: load time and the wall time of each predict() call.

    python benchmarks/bench_inference.py --run-dir outputs/exp018/<run> [--data data/synthetic]
    python benchmarks/bench_inference.py --random-run outputs/bench/exp018-default --exp exp018
        [--folds 5] [--threads 1] [--fold-threads 2] [--quantize] [--n-sequences 200] [--warmup 10] [model.key=value ...]
    python benchmarks/bench_inference.py --random-run DIR --exp exp019 --batch-mode [--rounds 3] data.max_len=200

The sequences are the test.csv sequences of ``--data`` (default: the synthetic data), served by
the local gateway stand-in (``codes.inference.gateway.LocalGateway``) in shuffled order, one
``predict(sequence, demographics)`` call each, exactly as on Kaggle.

``--random-run DIR`` first writes a run folder in the training format without training: the
experiment's config composed as ``train.py`` composes it (its config.py defaults, i.e. the
default dims, on ``machine=gpu``; trailing ``model.key=value`` / ``data.key=value`` arguments override), ``--folds``
randomly initialised ``fold{k}/best.pt`` and a ``normalizer.json`` fitted on the test
sequences. Latency does not depend on the weights' values, so this measures a trained
ensemble of the same dims.

``--batch-mode`` times batch mode instead (the whole test set at once): every batch padded to
``max_len`` against each batch cut to its longest sequence (``data.pad_to_batch``), in turns.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from codes.common.checkpoint import save_atomically  # noqa: E402
from codes.common.data_files import TEST_DEMOGRAPHICS_FILE, read_demographics, read_test  # noqa: E402
from codes.common.data_source import resolve_data_dir  # noqa: E402
from codes.common.features import feature_layout  # noqa: E402
from codes.common.runs import setup_logging, write_json_atomically  # noqa: E402
from codes.common.sequences import FeatureNormalizer, build_sequence_table  # noqa: E402
from codes.inference.gateway import LocalGateway, latency_summary  # noqa: E402
from codes.inference.run_folder import load_fold_weights, load_run_config  # noqa: E402


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def write_random_run(exp: str, run_dir: Path, data_dir: Path, n_folds: int, overrides: list[str]) -> Path:
    """A run folder of ``exp`` at its default dims with random weights (see the module docstring)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    importlib.import_module(f"codes.exp.{exp}.config").register_configs()
    dataset = importlib.import_module(f"codes.exp.{exp}.dataset")
    model_module = importlib.import_module(f"codes.exp.{exp}.model")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base=None):
        cfg = compose(
            config_name="experiment",
            overrides=["machine=gpu", f"run_name={run_dir.name}", f"data.n_folds={n_folds}", *overrides],
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "git_commit.txt").write_text("random weights written by benchmarks/bench_inference.py\n")
    settings = dataset.feature_settings(cfg.data)
    table = build_sequence_table(
        read_test(data_dir), read_demographics(data_dir / TEST_DEMOGRAPHICS_FILE), settings
    )
    normalizer = FeatureNormalizer().fit(table)
    n_features = len(feature_layout(settings)[0])
    for fold in range(n_folds):
        torch.manual_seed(fold)
        model = model_module.GestureClassifier(n_features, cfg.model, cfg.data.max_len)
        fold_dir = run_dir / f"fold{fold}"
        write_json_atomically(normalizer.state_dict(), fold_dir / "normalizer.json")
        save_atomically(
            {"model": model.state_dict(), "ema": None, "epoch": -1, "score": 0.0}, fold_dir / "best.pt"
        )
    return run_dir


def time_batch_mode(
    predictor, test: pl.DataFrame, demographics: pl.DataFrame, args: argparse.Namespace
) -> None:
    """Batch mode's model time on the whole test set (the table built once, not timed), with every
    batch padded to ``max_len`` and with each batch cut to its longest sequence in length order
    (``data.pad_to_batch``), in turns; prints both medians, the speed-up and how far the
    probabilities and answers of the two differ."""
    import statistics

    table = predictor.frame_table(test, demographics)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    probabilities = {}
    for _ in range(args.rounds):
        for cut in (False, True):
            predictor.pad_to_batch = cut
            began = time.perf_counter()
            probabilities[cut] = predictor.table_probabilities(table, batch_size=args.batch_size)
            seconds[cut].append(time.perf_counter() - began)
    lengths = np.minimum(table.lengths, predictor.max_len)
    padded, cut = statistics.median(seconds[False]), statistics.median(seconds[True])
    same = np.array_equal(probabilities[False].argmax(1), probabilities[True].argmax(1))
    print(
        f"batch mode, {table.n_sequences} sequences (kept lengths median {np.median(lengths):.0f}, max "
        f"{lengths.max()}), max_len {predictor.max_len}, {len(predictor.folds)} folds, batch {args.batch_size}, "
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)"
    )
    print(f"padded to max_len: {', '.join(f'{s:.2f}' for s in seconds[False])} s, median {padded:.2f} s")
    print(f"cut per batch:     {', '.join(f'{s:.2f}' for s in seconds[True])} s, median {cut:.2f} s")
    print(
        f"speed-up {padded / cut:.2f}x; max |probability difference| "
        f"{np.abs(probabilities[False] - probabilities[True]).max():.2e}; identical answers: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="a run folder train.py wrote")
    source.add_argument("--random-run", type=Path, help="write a random-weight run folder here, then time it")
    parser.add_argument(
        "--exp", default=None, help="the experiment (default: the run's exp_name; exp018 for --random-run)"
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="folder with test.csv (default: the synthetic data)"
    )
    parser.add_argument("--folds", type=int, default=5, help="folds of a --random-run")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantize", action="store_true", help="int8 Linear layers (CPU)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (load_predictor precision='bf16')")
    parser.add_argument("--fold-threads", type=int, default=1, help="fold models run at once per call")
    parser.add_argument("--n-sequences", type=int, default=None, help="default: every test sequence")
    parser.add_argument("--warmup", type=int, default=10, help="predict() calls before timing")
    parser.add_argument("--seed", type=int, default=0, help="serving order")
    parser.add_argument(
        "--batch-mode", action="store_true",
        help="time batch mode instead: the whole test set's probabilities, padded to max_len and cut per "
        "batch (data.pad_to_batch), in turns, --rounds times",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --batch-mode")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of --batch-mode")
    parser.add_argument("overrides", nargs="*", help="model.key=value / data.key=value for --random-run")
    args = parser.parse_args()
    setup_logging(None)
    import logging

    logging.getLogger("codes.inference.predictor").setLevel(
        logging.ERROR
    )  # odd-row warnings: not timed noise
    if args.threads:
        torch.set_num_threads(args.threads)
    imported = time.perf_counter() - STARTED
    data_dir = args.data or resolve_data_dir("synthetic", synthetic_dir=REPO_ROOT / "data" / "synthetic")

    if args.random_run is not None:
        exp = args.exp or "exp018"
        run_dir = write_random_run(exp, args.random_run, data_dir, args.folds, list(args.overrides))
    else:
        run_dir = args.run_dir
        exp = args.exp or load_run_config(run_dir).exp_name
    inference = importlib.import_module(f"codes.exp.{exp}.inference")

    started = time.perf_counter()
    predictor = inference.load_predictor(
        run_dir,
        device=args.device,
        quantize=args.quantize,
        fold_threads=args.fold_threads,
        precision="bf16" if args.bf16 else None,
    )
    load_seconds = time.perf_counter() - started

    test = pl.read_csv(data_dir / "test.csv")
    demographics = pl.read_csv(data_dir / TEST_DEMOGRAPHICS_FILE)
    if args.batch_mode:
        time_batch_mode(predictor, test, demographics, args)
        return
    gateway = LocalGateway(test, demographics, seed=args.seed)
    order = gateway.sequence_ids()
    if args.n_sequences:
        chosen = set(order[: args.n_sequences])
        gateway = LocalGateway(test.filter(pl.col("sequence_id").is_in(chosen)), demographics, seed=args.seed)
    warmup = list(gateway.batches())[: args.warmup]
    for _, sequence, subject in warmup:
        predictor.predict(sequence, subject)
    result = gateway.serve(predictor.predict)
    latency = latency_summary(result.seconds)

    # where a call's time goes: preprocessing alone (features, normalisation) on the same sequences
    preprocess = []
    for _, sequence, subject in list(gateway.batches())[:50]:
        began = time.perf_counter()
        predictor.sequence_table(sequence, subject)
        preprocess.append(time.perf_counter() - began)
    lengths = test.group_by("sequence_id").len()["len"].to_numpy()
    weights, _ = load_fold_weights(run_dir, predictor.folds[0])  # counted before any quantisation
    n_parameters = sum(t.numel() for t in weights.values() if t.is_floating_point())
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), {args.fold_threads} fold thread(s), device {predictor.device}"
        + (", int8 Linear layers" if args.quantize else ", bf16 autocast" if args.bf16 else ", fp32")
    )
    print(
        f"run: {shown(run_dir)} ({exp}, folds {predictor.folds}, {n_parameters / 1e6:.2f} M weights per fold, "
        f"max_len {predictor.max_len})"
    )
    print(
        f"sequences: {int(latency['n'])} from {shown(data_dir / 'test.csv')} (length median {np.median(lengths):.0f}, "
        f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}), {args.warmup} warm-up calls"
    )
    print(f"imports {imported:.2f} s, load_predictor {load_seconds:.2f} s")
    print(
        "predict() ms: "
        + ", ".join(f"{k} {latency[k]:.1f}" for k in ("p50", "p90", "p99", "mean", "max"))
        + f"; preprocessing alone: median {np.median(preprocess) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
