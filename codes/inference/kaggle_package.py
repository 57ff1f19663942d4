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
holding only one of the two, is an error (``--folds`` stages only the folds named); so is a fold
of the run without its folder, and a ``config.yaml`` that no longer holds the settings of the
run's ``run_record.json``. The staged run gets ``ensemble.json`` naming the folds staged.

It stages exactly the run and the tracked code: a link inside the run folder that leads out of
it is refused (a dataset holds the run's own files); the code is the files git tracks under
``codes/`` and ``configs/`` (``git ls-files``; without git, only with ``--no-git``, which copies
every file there but caches and hidden files); ``--out`` inside ``codes/``, ``configs/`` or a run
folder is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from codes.common.checkpoint import CheckpointError, load_checkpoint, save_atomically
from codes.common.runs import REPO_ROOT, write_json_atomically
from codes.inference.run_folder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ENSEMBLE_FILE,
    METRICS_FILE,
    NORMALIZER_FILE,
    RUN_RECORD_FILE,
    RunFolderError,
    check_config_against_record,
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
# copied when present
RUN_FILES = (CONFIG_FILE, "git_commit.txt", METRICS_FILE, "protocol.json", RUN_RECORD_FILE)
CODE_FOLDERS = ("codes", "configs")
CODE_FILES = ("kaggle/submission.py", "pyproject.toml")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{3,48}[a-z0-9]$")
STAGING_MARKER = ".kaggle_package_staging"  # in every folder this module created; only those are replaced
_FOLD_DIR = re.compile(r"^fold\d+$")
logger = logging.getLogger(__name__)


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


def _within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies under it, once every link on the way is followed."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _is_run_folder(folder: Path) -> bool:
    """A run folder of training (``config.yaml`` with fold folders or metrics) not staged by this module."""
    if not (folder / CONFIG_FILE).is_file() or (folder / STAGING_MARKER).is_file():
        return False
    has_folds = any(_FOLD_DIR.match(child.name) and child.is_dir() for child in folder.iterdir())
    return has_folds or (folder / METRICS_FILE).is_file() or (folder / RUN_RECORD_FILE).is_file()


def check_out_location(out_dir: Path, run_dir: Path | None = None, repo_root: Path = REPO_ROOT) -> None:
    """A :class:`StagingError` when ``out_dir`` lies inside the code it copies (``codes/``,
    ``configs/``), inside the run folder staged, or inside any run folder of training."""
    resolved = Path(out_dir).resolve()
    for name in CODE_FOLDERS:
        if _within(resolved, repo_root / name):
            raise StagingError(
                f"the output folder {out_dir} lies inside {repo_root / name}, which is staged itself (the "
                "copy would hold copies of itself); choose an --out outside it, e.g. outputs/kaggle/<name>"
            )
    enclosing = [run_dir] if run_dir is not None and _within(resolved, run_dir) else []
    enclosing += [
        folder for folder in (resolved, *resolved.parents) if folder.is_dir() and _is_run_folder(folder)
    ]
    if enclosing:
        raise StagingError(
            f"the output folder {out_dir} lies inside the run folder {enclosing[0]}: staging there would mix "
            "the datasets with the run's own files. Choose an --out outside it, e.g. outputs/kaggle/<name>"
        )


def _git_files(root: Path, *options: str) -> list[str]:
    """``git ls-files -z <options> -- codes configs`` run at the top of the checkout ``root``."""
    top = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    if Path(top).resolve() != root:
        raise subprocess.CalledProcessError(1, "git", stderr=f"the git checkout there is {top}")
    listed = subprocess.run(
        ["git", "ls-files", "-z", *options, "--", *CODE_FOLDERS],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in listed.split("\0") if name]


def tracked_code_files(repo_root: Path = REPO_ROOT) -> list[str]:
    """The files git tracks under ``codes/`` and ``configs/`` (paths relative to ``repo_root``); a
    :class:`StagingError` when ``repo_root`` is not the top of a git checkout or git cannot be run."""
    root = Path(repo_root).resolve()
    try:
        files = _git_files(root)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = (getattr(error, "stderr", None) or str(error)).strip().splitlines()
        raise StagingError(
            f"{root} is not a git checkout that git can read ({detail[0] if detail else type(error).__name__}), "
            f"so the files git tracks under {' and '.join(CODE_FOLDERS)}/ cannot be told from untracked ones "
            "(notes, scratch files, keys). Stage from a git clone of the repository, or pass --no-git to copy "
            "every file there but caches and hidden files"
        ) from None
    if not any(name.startswith("codes/") for name in files):
        raise StagingError(f"git tracks no file under {root / 'codes'}; nothing to stage")
    return files


def _copy_tracked_code(repo_root: Path, out_dir: Path, tracked: list[str]) -> None:
    """Copy the files ``tracked`` (:func:`tracked_code_files`, as they are in the working tree); warn
    about untracked Python and YAML files there, which the staged code may need (``git add`` them)."""
    for name in tracked:
        source = repo_root / name
        if not source.is_file():  # tracked but deleted in the working tree
            logger.warning("%s is tracked by git but deleted here; it is not staged", source)
            continue
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, out_dir / name)
    untracked = [
        name
        for name in _git_files(Path(repo_root).resolve(), "--others", "--exclude-standard")
        if name.endswith((".py", ".yaml"))
    ]
    if untracked:
        logger.warning(
            "not staged, since git does not track them: %s. If the code needs them, git add them and stage again",
            ", ".join(untracked),
        )


def stage_code_dataset(
    out_dir: Path,
    user: str,
    slug: str = DEFAULT_CODE_SLUG,
    repo_root: Path = REPO_ROOT,
    use_git: bool = True,
) -> Path:
    """Copy the code a notebook needs into ``out_dir``: the files git tracks under ``codes/`` and
    ``configs/`` (``use_git=False``: every file there but caches and hidden files) and
    :data:`CODE_FILES`."""
    repo_root = Path(repo_root)
    check_out_location(out_dir, repo_root=repo_root)
    tracked = tracked_code_files(repo_root) if use_git else None  # before the folder is replaced
    out_dir = _fresh(Path(out_dir))
    if tracked is not None:
        _copy_tracked_code(repo_root, out_dir, tracked)
    else:
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


def _run_files_staged(run_dir: Path, folds: list[int]) -> list[Path]:
    """Every file of ``run_dir`` that staging ``folds`` copies (:data:`RUN_FILES` present, and per
    fold its normaliser and the best checkpoints of the fold and its further seeds)."""
    files = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    for fold in folds:
        files.append(run_dir / f"fold{fold}" / NORMALIZER_FILE)
        files += [
            run_dir / f"fold{fold}" / (seed or "") / CHECKPOINT_FILE
            for seed in [None, *fold_seed_folders(run_dir, fold)]
        ]
    return files


def check_no_link_out(run_dir: Path, paths: Iterable[Path]) -> None:
    """A :class:`StagingError` naming the first of ``paths`` that a link leads out of ``run_dir``."""
    for path in paths:
        if not _within(path, run_dir):
            raise StagingError(
                f"refusing to stage {path}: a link leads it out of the run folder {run_dir}, to "
                f"{path.resolve()}. A run dataset holds the run's own files only: replace the link with a "
                'copy of the file it points to (cp --remove-destination "$(readlink -f FILE)" FILE), or '
                "leave that fold out with --folds"
            )


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
    check_config_against_record(run_dir, cfg)
    if _within(run_dir, out_dir):
        raise StagingError(
            f"the output folder {out_dir} holds the run folder {run_dir}; choose another --out"
        )
    check_out_location(out_dir, run_dir)
    selected = select_folds(run_dir, folds)
    check_no_link_out(run_dir, _run_files_staged(run_dir, selected))
    checkpoints = {}
    for fold in selected:
        load_normalizer(run_dir, fold)  # readable, with sound statistics
        for seed_folder in [None, *fold_seed_folders(run_dir, fold)]:  # further seeds: trainer.seeds
            checkpoints[fold, seed_folder] = _readable_checkpoint(run_dir, fold, seed_folder)
    out_dir = _fresh(Path(out_dir))
    write_json_atomically({"folds": selected}, out_dir / ENSEMBLE_FILE)  # what the staged run serves
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


CLASSICAL_MODEL_FILE = "model.npz"  # codes.classical: a fold's fitted state (arrays, no pickle)
# what a classical member needs beyond a Kaggle image, offline (docs/blend.md)
CLASSICAL_NEEDS = {"minirocket": "aeon 1.6.0, numba, llvmlite and Deprecated wheels"}


def stage_classical_member(run_dir: Path, out_dir: Path) -> Path:
    """Copy a classical run folder (``codes.classical``): its :data:`RUN_FILES` and every served
    fold's ``model.npz``, after loading the run with its own predictor (a damaged file is refused)."""
    from codes.inference.blend import load_member_predictor

    run_dir = Path(run_dir)
    folds = load_member_predictor(run_dir, device="cpu").folds  # reads and checks every fold
    files = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    files += [run_dir / f"fold{k}" / CLASSICAL_MODEL_FILE for k in folds]
    check_no_link_out(run_dir, files)
    out_dir = _fresh(Path(out_dir))
    write_json_atomically({"folds": folds}, out_dir / ENSEMBLE_FILE)
    for path in files:
        target = out_dir / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return out_dir


def stage_blend_dataset(
    blend_dir: Path, out_dir: Path, user: str, slug: str | None = None, slim: bool = True
) -> Path:
    """A blend folder as one dataset: ``blend.json`` (member paths rewritten to ``members/<k>-<name>``),
    its ``config.yaml`` and ``metrics.json``, and every member staged as a run (its served folds).
    Every member is read before its copy is written; a damaged member stops the staging."""
    from codes.inference.blend import (
        BLEND_FILE,
        CLASSICAL_EXPERIMENTS,
        member_folder,
        read_blend_file,
    )

    blend_dir = Path(blend_dir)
    blend = read_blend_file(blend_dir)
    check_out_location(out_dir)
    out_dir = _fresh(Path(out_dir))
    staged = []
    for index, entry in enumerate(blend["members"]):
        run_dir = member_folder(blend_dir, entry)
        folder = f"members/{index:02d}-{kaggle_slug(entry.get('name', run_dir.name))}"
        if run_exp_name(run_dir) in CLASSICAL_EXPERIMENTS:
            stage_classical_member(run_dir, out_dir / folder)
        else:
            stage_run_dataset(run_dir, out_dir / folder, user, slim=slim)
            (out_dir / folder / "dataset-metadata.json").unlink()  # the blend's dataset holds it
        staged.append({**entry, "path": folder})
    write_json_atomically({**blend, "members": staged}, out_dir / BLEND_FILE)
    for name in (CONFIG_FILE, METRICS_FILE):
        shutil.copy2(blend_dir / name, out_dir / name)
    slug = slug or kaggle_slug(f"cmi-blend-{blend_dir.resolve().name}")
    title = f"CMI BFRB blend {blend_dir.resolve().name}".strip()[:50]
    _write_metadata(out_dir, fill_metadata(RUN_TEMPLATE, user, slug, title))
    return out_dir


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="outputs/<exp>/<run>")
    source.add_argument("--blend-dir", type=Path, help="a blend folder (python -m codes.inference.blend fit)")
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
    parser.add_argument(
        "--no-git",
        action="store_true",
        help="without a git checkout: stage every file under codes/ and configs/ (not only tracked ones)",
    )
    args = parser.parse_args(argv)
    if args.blend_dir is not None:
        return _stage_blend_main(args)
    try:
        exp_name = run_exp_name(args.run_dir)
        if not (REPO_ROOT / "codes" / "exp" / exp_name / "inference.py").is_file():
            raise StagingError(
                f"{args.run_dir} was trained by {exp_name}, but this repository has no "
                f"codes/exp/{exp_name}/inference.py to load it with: the code dataset would not serve it"
            )
        out = args.out or REPO_ROOT / "outputs" / "kaggle" / f"{exp_name}-{args.run_dir.resolve().name}"
        check_out_location(out, args.run_dir)  # before anything is written
        for folder in (out / "code", out / "run"):
            check_replaceable(folder)
        if not args.no_git:
            tracked_code_files()
        run = stage_run_dataset(
            args.run_dir, out / "run", args.user, args.run_slug, slim=not args.no_slim, folds=args.folds
        )
        code = stage_code_dataset(out / "code", args.user, args.code_slug, use_git=not args.no_git)
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


def _stage_blend_main(args: argparse.Namespace) -> tuple[Path, Path]:
    """``--blend-dir``: the code dataset and the blend's dataset (every member inside it)."""
    from codes.inference.blend import BlendError

    out = args.out or REPO_ROOT / "outputs" / "kaggle" / f"blend-{args.blend_dir.resolve().name}"
    try:
        check_out_location(out)
        for folder in (out / "code", out / "run"):
            check_replaceable(folder)
        if not args.no_git:
            tracked_code_files()
        run = stage_blend_dataset(
            args.blend_dir, out / "run", args.user, args.run_slug, slim=not args.no_slim
        )
        code = stage_code_dataset(out / "code", args.user, args.code_slug, use_git=not args.no_git)
    except (StagingError, RunFolderError, BlendError) as error:
        raise SystemExit(f"kaggle_package: {error}") from None
    print(
        f"staged the code in {code} and the blend in {run} (the notebook finds blend.json and serves it). Upload:"
    )
    for folder in (code, run):
        print(f"  kaggle datasets create -p {folder} --dir-mode zip")
    members = json.loads((run / "blend.json").read_text(encoding="utf-8"))["members"]
    for exp_name in sorted({m["exp_name"] for m in members} & set(CLASSICAL_NEEDS)):
        print(
            f"the blend holds a {exp_name} member: offline on Kaggle it needs {CLASSICAL_NEEDS[exp_name]} "
            "(attach their wheels as a dataset and pip install --no-deps them before the script runs; docs/blend.md)"
        )
    return code, run


if __name__ == "__main__":
    main()
