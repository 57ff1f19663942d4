"""Robustness to vibration: the same fine-tuned models scored on clean and on shaken validation data.

    python benchmarks/noise_robustness.py \
        --arm scratch outputs/exp019/ab-scratch-s42 outputs/exp019/ab-scratch-s7 \
        --arm lambda0 outputs/exp019/ab-l0-s42 ... --arm lambda0.1 ... --out noise_robustness.json

Every trained fold of each run folder predicts its own validation sequences (the run's folds,
checked against its ``oof.parquet``) three times: clean (this reproduces the run's CV exactly,
a check the script makes) and with vibration bursts shaking the raw acceleration and rotation
before the features are computed (``codes.noisebert.noise.add_raw_vibration``, the pretraining
noise model) at each strength ``m`` of ``--strengths``: 1 to 3 bursts per sequence (anywhere in
the whole sequence, as a vibration would fall), amplitudes drawn in ``[0.5 m, 2 m]`` acc stds /
``rotation_deg_per_unit`` degrees. The noise of sequence ``i`` of the train file comes from
``default_rng([--seed, i, round(1000 m)])``: every run and arm sees the very same shaken
sequences. Scores are the competition score of the pooled out-of-fold predictions, all
sensors and IMU-only (thermopiles and ToF removed); the score loss is clean minus shaken.

The table gives each arm's mean over its runs (seeds) with the min-max spread, and how much less
score each arm loses than the others (``1 - loss_arm / loss_other``; the issue's target is 30%).

``--cls-mass`` also reports, per shaken condition, the share of the classifier's CLS attention
(last BERT layer, heads averaged, among the step keys) that falls on the shaken steps, averaged
over the validation sequences with a shaken step (the pretraining penalty's quantity, read from
the fine-tuned models with ``codes/models/cls_attention.py``), next to the shaken steps' share of
the real steps (what attention blind to the noise would give).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from codes.common.augment import batch_step_features  # noqa: E402
from codes.common.data_source import resolve_data_dir  # noqa: E402
from codes.common.folds import data_folds  # noqa: E402
from codes.common.machine import apply_num_threads  # noqa: E402
from codes.common.metric import competition_score  # noqa: E402
from codes.common.runs import repo_path  # noqa: E402
from codes.common.schema import GESTURES  # noqa: E402
from codes.common.sequences import SequenceTable, load_sequence_table, pad_step_flags  # noqa: E402
from codes.common.training import predict_probabilities  # noqa: E402
from codes.inference.run_folder import load_run_config  # noqa: E402
from codes.models.cls_attention import ClsAttentionRecorder  # noqa: E402
from codes.noisebert.loss import noisy_attention_mass  # noqa: E402
from codes.noisebert.noise import VibrationNoiseConfig, add_raw_vibration, feature_strength  # noqa: E402

CONDITIONS_CLEAN = "clean"


def shaken_table(
    table: SequenceTable, settings, strength: float, seed: int, sampling_rate_hz: float
) -> tuple[SequenceTable, list[np.ndarray]]:
    """``table`` with every sequence's raw acc and rotation shaken, features recomputed, and each
    sequence's shaken steps ``(T_i,)`` bool (the steps whose features see a shaken row)."""
    cfg = VibrationNoiseConfig(
        sampling_rate_hz=sampling_rate_hz, min_bursts=1, max_bursts=3,
        min_amplitude=0.5 * strength, max_amplitude=2.0 * strength,
    )  # fmt: skip
    sequences, shaken_steps = [], []
    for i in range(table.n_sequences):
        rows = table.sensors[table.offsets[i] : table.offsets[i + 1]]
        rng = np.random.default_rng([seed, i, round(1000 * strength)])
        vibration = add_raw_vibration(rows, settings.sensor_columns, rng, cfg)
        sequences.append(vibration.noisy)
        step_strength = feature_strength(vibration.strength, (rows, vibration.noisy), settings.sensor_columns)
        shaken_steps.append(step_strength > cfg.strength_threshold)
    step, offsets = batch_step_features(sequences, table.left_handed, settings)
    assert np.array_equal(offsets, table.offsets)
    shaken = replace(
        table, features=step.features, step_valid=step.step_valid, feature_present=step.feature_present
    )
    return shaken, shaken_steps


def cls_mass_on_shaken(
    model: torch.nn.Module, tensors, shaken: np.ndarray, batch_size: int = 256
) -> tuple[float, int]:
    """(sum over the sequences with a shaken step of the CLS mass on their shaken steps, their count):
    the last BERT layer's CLS row over the step keys, heads averaged."""
    recorder = ClsAttentionRecorder(model.bert, "last")  # hooks on the model, taken off at the end
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(tensors), batch_size):
                batch = slice(start, start + batch_size)
                mask = tensors.mask[batch]
                recorder.start()
                model(tensors.features[batch], mask, tensors.demographics[batch])
                recorder.stop()
                rows = recorder.rows(torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1))
                region = torch.from_numpy(shaken[batch]) & mask
                mass = noisy_attention_mass(rows, region)
                has = region.any(dim=1)
                total += float(mass[has].sum())
                count += int(has.sum())
    finally:
        recorder.remove()
    return total, count


def fold_probabilities(members: list, inputs) -> np.ndarray:
    """(N, 18) probabilities of a fold's models (its seeds) averaged, as inference averages them."""
    cpu = torch.device("cpu")
    return np.mean([predict_probabilities(m.model, inputs, 256, cpu, None)[0] for m in members], axis=0)


def score_run(run_dir: Path, strengths: list[float], seed: int, tables: dict, cls_mass: bool = False) -> dict:
    """Clean and shaken OOF scores of one run folder (``tables`` caches data between runs); with
    ``cls_mass``, the CLS attention mass on the shaken steps too."""
    cfg = load_run_config(run_dir)
    exp = cfg.exp_name
    inference = importlib.import_module(f"codes.exp.{exp}.inference")
    dataset = importlib.import_module(f"codes.exp.{exp}.dataset")
    settings = dataset.feature_settings(cfg.data)
    data_dir = resolve_data_dir(
        source=cfg.data.source, competition_dir=repo_path(cfg.paths.data_dir),
        synthetic_dir=repo_path(cfg.paths.synthetic_dir), synthetic_subjects=cfg.data.synthetic_subjects,
        synthetic_seed=cfg.data.synthetic_seed,
    )  # fmt: skip
    key = (str(data_dir), settings)
    if key not in tables:
        table = load_sequence_table(data_dir, "train", settings, keep_sensors=True)
        conditions, shaken_steps = {CONDITIONS_CLEAN: table}, {}
        for strength in strengths:
            conditions[f"x{strength:g}"], shaken_steps[f"x{strength:g}"] = shaken_table(
                table, settings, strength, seed, cfg.data.sampling_rate_hz
            )
        tables[key] = (table, conditions, shaken_steps, data_dir)
    table, conditions, shaken_steps, data_dir = tables[key]
    folds, _ = data_folds(data_dir, table.gestures, table.subjects, cfg.data.n_folds, cfg.data.fold_seed)
    oof = pl.read_parquet(run_dir / "oof.parquet")
    position = {sid: i for i, sid in enumerate(table.sequence_ids)}
    oof_index = np.array([position[s] for s in oof["sequence_id"].to_list()])
    if not np.array_equal(folds[oof_index], oof["fold"].to_numpy()):
        raise ValueError(f"{run_dir}: its oof.parquet folds differ from the data's folds")

    predictor = inference.load_predictor(run_dir, device="cpu")
    names = np.array(GESTURES)
    result = {}
    for condition, data in conditions.items():
        true, pred, imu = [], [], []
        mass_sum, mass_count, shaken_share = 0.0, 0, []
        for fold in sorted({m.fold for m in predictor.members}):
            members = [m for m in predictor.members if m.fold == fold]
            index = np.flatnonzero(folds == fold)
            tensors = dataset.make_tensors(data.subset(index), members[0].normalizer, cfg.data.max_len)
            imu_tensors = tensors.imu_only(dataset.non_imu_columns(table))
            if cls_mass and condition in shaken_steps:
                flags = pad_step_flags([shaken_steps[condition][i] for i in index], cfg.data.max_len)
                shaken_share.append(flags[tensors.mask.numpy()])
                for member in members:  # each seed's model: its mass counts once per sequence
                    total, count = cls_mass_on_shaken(member.model, tensors, flags)
                    mass_sum, mass_count = mass_sum + total / len(members), mass_count + count / len(members)

            probabilities = fold_probabilities(members, tensors)
            imu_probabilities = fold_probabilities(members, imu_tensors)
            true.append(names[table.labels[index]])
            pred.append(names[probabilities.argmax(1)])
            imu.append(names[imu_probabilities.argmax(1)])
        y_true = np.concatenate(true)
        result[condition] = {
            "score": competition_score(y_true, np.concatenate(pred)),
            "score_imu_only": competition_score(y_true, np.concatenate(imu)),
        }
        if shaken_share:
            result[condition]["cls_mass_on_shaken"] = mass_sum / max(mass_count, 1)
            result[condition]["shaken_step_share"] = float(np.concatenate(shaken_share).mean())
    recorded = json.loads((run_dir / "metrics.json").read_text())["overall"]
    for name in ("score", "score_imu_only"):
        if abs(result[CONDITIONS_CLEAN][name] - recorded[name]) > 1e-9:
            raise ValueError(
                f"{run_dir}: clean {name} {result[CONDITIONS_CLEAN][name]:.6f} does not reproduce the "
                f"run's {recorded[name]:.6f}"
            )
    return result


def summarise(arms: dict[str, dict[str, dict]], strengths: list[float]) -> list[str]:
    """Markdown rows: each arm's mean (min-max) per condition, its losses, and the loss ratios."""
    lines = []
    conditions = [CONDITIONS_CLEAN] + [f"x{s:g}" for s in strengths]
    for metric in ("score", "score_imu_only"):
        lines += [f"\n{metric}: mean over runs (min-max); loss = clean - shaken\n"]
        header = (
            "| arm | runs | "
            + " | ".join(conditions)
            + " | "
            + " | ".join(f"loss {c}" for c in conditions[1:])
            + " |"
        )
        lines += [header, "|" + " --- |" * (2 + 2 * len(conditions) - 1)]
        losses = {}
        for arm, runs in arms.items():
            cells = []
            for condition in conditions:
                values = np.array([r[condition][metric] for r in runs.values()])
                cells.append(f"{values.mean():.4f} ({values.min():.4f}-{values.max():.4f})")
            for condition in conditions[1:]:
                loss = np.array([r[CONDITIONS_CLEAN][metric] - r[condition][metric] for r in runs.values()])
                losses[(arm, condition)] = loss.mean()
                cells.append(f"{loss.mean():+.4f} ({loss.min():+.4f}..{loss.max():+.4f})")
            lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
        for condition in conditions[1:]:
            for arm in arms:
                for other in arms:
                    if other != arm and losses[(other, condition)] > 0:
                        reduction = 1 - losses[(arm, condition)] / losses[(other, condition)]
                        lines.append(
                            f"- {metric} {condition}: {arm} loses {reduction:+.0%} less than {other}"
                        )
    for condition in conditions[1:]:
        for arm, runs in arms.items():
            masses = [
                r[condition]["cls_mass_on_shaken"]
                for r in runs.values()
                if "cls_mass_on_shaken" in r[condition]
            ]
            if masses:
                share = np.mean([r[condition]["shaken_step_share"] for r in runs.values()])
                lines.append(
                    f"- CLS mass on shaken steps {condition}: {arm} {np.mean(masses):.3f} "
                    f"({min(masses):.3f}-{max(masses):.3f}); shaken steps are {share:.1%} of the real steps"
                )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar=("NAME", "RUN_DIR"),
                        help="an arm's name and its run folders (one per seed)")  # fmt: skip
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write every run's scores as JSON")
    parser.add_argument(
        "--cls-mass", action="store_true", help="the CLS attention mass on the shaken steps too"
    )
    args = parser.parse_args(argv)
    apply_num_threads(args.threads)
    tables: dict = {}
    arms: dict[str, dict[str, dict]] = {}
    for name, *run_dirs in args.arm:
        if not run_dirs:
            parser.error(f"--arm {name} names no run folder")
        arms[name] = {}
        for run_dir in run_dirs:
            arms[name][run_dir] = score_run(
                repo_path(run_dir), args.strengths, args.seed, tables, args.cls_mass
            )
            print(name, run_dir, json.dumps(arms[name][run_dir]), flush=True)
    lines = summarise(arms, args.strengths)
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text(
            json.dumps({"strengths": args.strengths, "seed": args.seed, "arms": arms}, indent=1)
        )
    return arms


if __name__ == "__main__":
    main()
