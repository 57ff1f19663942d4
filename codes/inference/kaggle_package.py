"""Stage a run folder and the code as two Kaggle datasets, ready for ``kaggle datasets create``.

    python -m codes.inference.kaggle_package --run-dir outputs/exp018/<run> --user <kaggle user>

writes ``outputs/kaggle/<exp>-<run>/code/`` (``codes/``, ``configs/``, ``kaggle/submission.py``)
and ``outputs/kaggle/<exp>-<run>/run/`` (config.yaml, metrics.json, git_commit.txt and per fold
normalizer.json + best.pt), each with a ``dataset-metadata.json`` filled in from the templates in
``kaggle/``. ``best.pt`` is slimmed to the weights inference uses (the EMA weights when training
evaluated those): about half the size, same predictions; ``last.pt`` (optimizer state) is left
out. Upload with the commands it prints; nothing is sent anywhere by this module.

It only ever replaces a folder it staged itself: each staging folder it creates gets a marker
file (``.kaggle_package_staging``), and an existing ``code/`` or ``run/`` folder without one is
refused, never deleted. The run's ``exp_name`` (from its ``config.yaml``, which may come from a
download) must be a plain name (``exp018``), since it becomes part of the output path. Every
file staged is read first: a damaged ``best.pt`` or ``normalizer.json``, or a fold folder
holding only one of the two, is an error (``--folds`` stages only the folds named).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from codes.common.checkpoint import CheckpointError, load_checkpoint, save_atomically
from codes.common.runs import REPO_ROOT
from codes.inference.run_folder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    NORMALIZER_FILE,
    RunFolderError,
    evaluated_weights,
    fold_seed_folders,
    load_normalizer,
    load_run_config,
    run_exp_name,
    select_folds,
)

TEMPLATE_DIR = REPO_ROOT / "kaggle"
CODE_TEMPLATE = TEMPLATE_DIR / "code" / "dataset-metadata.json"
RUN_TEMPLATE = TEMPLATE_DIR / "run" / "dataset-metadata.json"
USER_PLACEHOLDER = "KAGGLE_USERNAME"
SLUG_PLACEHOLDER = "DATASET_SLUG"
TITLE_PLACEHOLDER = "DATASET_TITLE"
DEFAULT_CODE_SLUG = "cmi-bfrb-code"
RUN_FILES = ("config.yaml", "git_commit.txt", "metrics.json", "protocol.json")  # copied when present
CODE_FOLDERS = ("codes", "configs")
CODE_FILES = ("kaggle/submission.py", "pyproject.toml")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{3,48}[a-z0-9]$")
STAGING_MARKER = ".kaggle_package_staging"  # in every folder this module created; only those are replaced


class StagingError(RuntimeError):
    """An output folder this module must not replace; the message says what to do."""


def kaggle_slug(text: str) -> str:
    """A valid Kaggle dataset slug (lowercase letters, digits, hyphens; 5 to 50 characters)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:50].strip("-")
    if len(slug) < 5:
        slug = (slug + "-cmi-run").strip("-")
    return slug


def fill_metadata(template: Path, user: str, slug: str, title: str) -> dict:
    """A dataset-metadata.json template with the user, slug and title filled in."""
    if not _SLUG.match(slug):
        raise ValueError(f"{slug!r} is not a Kaggle dataset slug (5-50 of a-z, 0-9, '-')")
    if not user or "/" in user:
        raise ValueError(f"{user!r} is not a Kaggle user name")
    text = template.read_text(encoding="utf-8")
    for placeholder, value in (
        (USER_PLACEHOLDER, user),
        (SLUG_PLACEHOLDER, slug),
        (TITLE_PLACEHOLDER, title),
    ):
        text = text.replace(placeholder, value)
    return json.loads(text)


def _write_metadata(folder: Path, metadata: dict) -> None:
    (folder / "dataset-metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def check_replaceable(folder: Path) -> None:
    """Raise :class:`StagingError` unless ``folder`` is absent, empty or staged by this module.

    Only a folder holding the marker file (or an empty one) is ever replaced; anything else (a
    folder of the user's, a file, a symbolic link) is refused and left as it is.
    """
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise StagingError(
            f"refusing to replace {folder}: it is a file or a link, not a staging folder of this tool. "
            "Choose another --out, or move it away yourself"
        )
    if folder.is_dir() and not (folder / STAGING_MARKER).is_file() and any(folder.iterdir()):
        raise StagingError(
            f"refusing to delete or overwrite {folder}: it exists and was not staged by "
            f"codes.inference.kaggle_package (it has no {STAGING_MARKER} file), so it may hold files "
            "of yours. Choose another --out (a new or empty folder), or move that folder away yourself"
        )


def _fresh(folder: Path) -> Path:
    """An empty staging folder at ``folder``, marked as this module's (see :func:`check_replaceable`)."""
    folder = Path(folder)
    check_replaceable(folder)
    if (folder / STAGING_MARKER).is_file():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAGING_MARKER).write_text(
        "staged by python -m codes.inference.kaggle_package; it replaces this folder when run again\n",
        encoding="utf-8",
    )
    return folder


def stage_code_dataset(
    out_dir: Path, user: str, slug: str = DEFAULT_CODE_SLUG, repo_root: Path = REPO_ROOT
) -> Path:
    """Copy the code a notebook needs (Python sources and configs, no caches) into ``out_dir``."""
    out_dir = _fresh(Path(out_dir))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for name in CODE_FOLDERS:
        shutil.copytree(repo_root / name, out_dir / name, ignore=ignore)
    for name in CODE_FILES:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo_root / name, out_dir / name)
    _write_metadata(out_dir, fill_metadata(CODE_TEMPLATE, user, slug, "CMI BFRB experiment code"))
    return out_dir


def _readable_checkpoint(run_dir: Path, fold: int, seed_folder: str | None = None) -> dict:
    """``fold{k}/best.pt`` (or ``fold{k}/<seed_folder>/best.pt``), loaded and checked to hold the
    weights inference uses."""
    path = run_dir / f"fold{fold}" / (seed_folder or "") / CHECKPOINT_FILE
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise RunFolderError(f"{error} To stage the other folds only, pass --folds without {fold}.") from None
    try:
        evaluated_weights(checkpoint)
    except (RunFolderError, AttributeError):
        raise RunFolderError(
            f"{path} holds no model weights; it is not a checkpoint of this training"
        ) from None
    return checkpoint


def stage_run_dataset(
    run_dir: Path,
    out_dir: Path,
    user: str,
    slug: str | None = None,
    slim: bool = True,
    folds: Iterable[int] | None = None,
) -> Path:
    """Copy what inference needs from a run folder into ``out_dir`` (every trained fold, or ``folds``).

    Every fold's files are read before anything is written: a damaged or incomplete fold is a
    :class:`~codes.inference.run_folder.RunFolderError` naming the file.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    exp_name = run_exp_name(run_dir, cfg)
    resolved_run, resolved_out = run_dir.resolve(), Path(out_dir).resolve()
    if resolved_out == resolved_run or resolved_out in resolved_run.parents:
        raise StagingError(
            f"the output folder {out_dir} holds the run folder {run_dir}; choose another --out"
        )
    selected = select_folds(run_dir, folds)
    checkpoints = {}
    for fold in selected:
        load_normalizer(run_dir, fold)  # readable, with sound statistics
        for seed_folder in [None, *fold_seed_folders(run_dir, fold)]:  # further seeds: trainer.seeds
            checkpoints[fold, seed_folder] = _readable_checkpoint(run_dir, fold, seed_folder)
    out_dir = _fresh(Path(out_dir))
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out_dir / name)
    for fold in selected:
        (out_dir / f"fold{fold}").mkdir()
        shutil.copy2(run_dir / f"fold{fold}" / NORMALIZER_FILE, out_dir / f"fold{fold}" / NORMALIZER_FILE)
    for (fold, seed_folder), checkpoint in checkpoints.items():
        source = run_dir / f"fold{fold}" / (seed_folder or "")
        target = out_dir / f"fold{fold}" / (seed_folder or "")
        target.mkdir(exist_ok=True)
        if not slim:
            shutil.copy2(source / CHECKPOINT_FILE, target / CHECKPOINT_FILE)
            continue
        weights, kind = evaluated_weights(checkpoint)
        slimmed = {
            "model": weights,
            "ema": None,
            "weights": kind,  # which weights of the training checkpoint these are
            **{k: checkpoint[k] for k in ("epoch", "score") if k in checkpoint},
        }
        save_atomically(slimmed, target / CHECKPOINT_FILE)
    run_name = run_dir.resolve().name
    slug = slug or kaggle_slug(f"cmi-{exp_name}-{run_name}")
    title = f"CMI BFRB run {exp_name} {run_name}".strip()[:50]
    _write_metadata(out_dir, fill_metadata(RUN_TEMPLATE, user, slug, title))
    if not (out_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} has no {CONFIG_FILE}")
    return out_dir


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, required=True, help="outputs/<exp>/<run>")
    parser.add_argument("--user", required=True, help="your Kaggle user name (the datasets' owner)")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/kaggle/<exp>-<run>")
    parser.add_argument("--code-slug", default=DEFAULT_CODE_SLUG)
    parser.add_argument("--run-slug", default=None, help="default: cmi-<exp>-<run>")
    parser.add_argument(
        "--no-slim", action="store_true", help="copy best.pt unchanged (model and EMA weights)"
    )
    parser.add_argument(
        "--folds", type=int, nargs="+", default=None, help="stage only these folds (default: every fold)"
    )
    args = parser.parse_args(argv)
    try:
        exp_name = run_exp_name(args.run_dir)
        if not (REPO_ROOT / "codes" / "exp" / exp_name / "inference.py").is_file():
            raise StagingError(
                f"{args.run_dir} was trained by {exp_name}, but this repository has no "
                f"codes/exp/{exp_name}/inference.py to load it with: the code dataset would not serve it"
            )
        out = args.out or REPO_ROOT / "outputs" / "kaggle" / f"{exp_name}-{args.run_dir.resolve().name}"
        for folder in (out / "code", out / "run"):
            check_replaceable(folder)  # before anything is written
        run = stage_run_dataset(
            args.run_dir, out / "run", args.user, args.run_slug, slim=not args.no_slim, folds=args.folds
        )
        code = stage_code_dataset(out / "code", args.user, args.code_slug)
    except (StagingError, RunFolderError) as error:
        raise SystemExit(f"kaggle_package: {error}") from None
    print(
        f"staged the code in {code} and the run in {run} (the notebook loads it with "
        f"CMI_EXPERIMENT={exp_name}). Upload them (first time: create; later: version):"
    )
    for folder in (code, run):
        print(f"  kaggle datasets create -p {folder} --dir-mode zip")
        print(f'  kaggle datasets version -p {folder} --dir-mode zip -m "<what changed>"')
    return code, run


if __name__ == "__main__":
    main()
