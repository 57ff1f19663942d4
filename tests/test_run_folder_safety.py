"""No silent loss: damaged run folders are errors naming the file, packaging never deletes what it
did not create, and the thread settings reach torch.

The run folders here are written without training: exp013's config at tiny dims, random weights
in ``fold{k}/best.pt`` and identity statistics in ``fold{k}/normalizer.json``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from codes.common.checkpoint import CheckpointError, load_checkpoint, save_atomically
from codes.common.features import feature_layout
from codes.inference import kaggle_package
from codes.inference.experiment import batch_main
from codes.inference.kaggle_package import STAGING_MARKER, StagingError, stage_run_dataset
from codes.inference.run_folder import ConfigView, RunFolderError, check_exp_name, select_folds
from tests.helpers import make_demographics, make_frame, rest_sensors, training_config

REPO_ROOT = Path(__file__).resolve().parents[1]
EXP = "exp013"
TINY = {"d_model": 16, "num_blocks": 3, "num_heads": 2, "ff_dim": 32, "conv_kernel": 3, "demographics_dim": 4}
UNSAFE_ADVICE = ("weights_only", "trust", "arbitrary code")


def inference_module():
    return importlib.import_module(f"codes.exp.{EXP}.inference")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models on a shared CPU


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory) -> Path:
    """A 2-fold exp013 run folder with random weights (``outputs/exp013/tiny`` in layout)."""
    root = tmp_path_factory.mktemp("runs")
    cfg = training_config(EXP, root / "data", root, TINY, "run_name=tiny")
    run_dir = root / EXP / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    view = ConfigView(OmegaConf.to_container(cfg, resolve=True))
    dataset = importlib.import_module(f"codes.exp.{EXP}.dataset")
    model_module = importlib.import_module(f"codes.exp.{EXP}.model")
    n_features = len(feature_layout(dataset.feature_settings(view.data))[0])
    for fold in (0, 1):
        torch.manual_seed(fold)
        model = model_module.build_model(view, n_features)
        fold_dir = run_dir / f"fold{fold}"
        fold_dir.mkdir()
        save_atomically(
            {"model": model.state_dict(), "ema": None, "epoch": 0, "score": 0.5}, fold_dir / "best.pt"
        )
        (fold_dir / "normalizer.json").write_text(
            json.dumps({"mean": [0.0] * n_features, "scale": [1.0] * n_features})
        )
    return run_dir


@pytest.fixture
def run_dir(pristine_run, tmp_path) -> Path:
    """A copy of the pristine run that a test may damage."""
    copy = tmp_path / "outputs" / EXP / "tiny"
    shutil.copytree(pristine_run, copy)
    return copy


def assert_no_unsafe_advice(error: BaseException) -> None:
    message = str(error)
    assert not any(text in message for text in UNSAFE_ADVICE), message
    assert error.__cause__ is None and error.__suppress_context__  # torch's own text is not shown


# ---------------------------------------------------------------- damaged best.pt
def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    damaged = {
        "zero-byte": b"",
        "half": data[: len(data) // 2],
        "last bytes cut": data[:-10],
        "garbage": b"not a checkpoint " * 20,
    }[kind]
    path.write_bytes(damaged)


@pytest.mark.parametrize("kind", ["zero-byte", "half", "last bytes cut", "garbage"])
def test_a_damaged_best_pt_is_an_error_naming_the_file_and_what_to_do(run_dir, kind):
    best = run_dir / "fold1" / "best.pt"
    damage(best, kind)
    with pytest.raises(CheckpointError, match="is damaged or incomplete") as raised:
        load_checkpoint(best)
    assert str(best) in str(raised.value) and "copy it again from the original run folder" in str(
        raised.value
    )
    assert_no_unsafe_advice(raised.value)

    with pytest.raises(RunFolderError) as raised:
        inference_module().load_predictor(run_dir, device="cpu")
    message = str(raised.value)
    assert str(best) in message and "damaged or incomplete" in message
    assert "train the fold again" in message and "pass folds=[...] without it" in message
    assert_no_unsafe_advice(raised.value)
    # the intact fold still loads when the user leaves the damaged one out
    assert inference_module().load_predictor(run_dir, folds=[0], device="cpu").folds == [0]


def test_a_checkpoint_holding_other_objects_is_refused_without_suggesting_to_unpickle_it(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model": {"w": np.zeros(3)}}, path)  # a numpy array: not allowed by weights_only loading
    with pytest.raises(CheckpointError, match="holds pickled Python objects") as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value)
    assert_no_unsafe_advice(raised.value)


def test_a_damaged_last_pt_says_to_delete_it_rather_than_resume_from_it(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"0 bytes; the file ends too early.*delete it and train the fold"
    ):
        load_checkpoint(path)


def test_a_missing_checkpoint_is_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "best.pt")


# ---------------------------------------------------------------- damaged normalizer.json
@pytest.mark.parametrize(
    "text",
    [
        "",
        '{"mean": [0.0, 0.0], "sca',
        "[1, 2]",
        '{"mean": [0.0, 0.0]}',
        '{"mean": [0.0, 0.0], "scale": [1.0]}',
        '{"mean": [NaN, 0.0], "scale": [1.0, 1.0]}',
        '{"mean": [0.0, 0.0], "scale": [1.0, 0.0]}',
        '{"mean": [[0.0], [0.0]], "scale": [[1.0], [1.0]]}',
        '{"mean": "abc", "scale": "def"}',
    ],
)
def test_a_damaged_normalizer_is_an_error_naming_the_file(run_dir, text):
    path = run_dir / "fold0" / "normalizer.json"
    path.write_text(text)
    with pytest.raises(RunFolderError, match="is damaged or incomplete") as raised:
        inference_module().load_predictor(run_dir, device="cpu")
    message = str(raised.value)
    assert str(path) in message and "copy it again" in message and "folds=[...] without fold 0" in message


# ---------------------------------------------------------------- incomplete fold folders
def test_a_fold_without_its_normalizer_is_an_error_unless_the_folds_are_named(run_dir):
    (run_dir / "fold1" / "normalizer.json").unlink()
    load_predictor = inference_module().load_predictor
    expected = (
        r"fold1 has best\.pt but no normalizer\.json.*pass folds=\[0\] to predict with the complete folds"
    )
    with pytest.raises(RunFolderError, match=expected):
        load_predictor(run_dir, device="cpu")
    with pytest.raises(
        RunFolderError, match=r"fold1 has best\.pt but no normalizer\.json.*complete folds are \[0\]"
    ):
        load_predictor(run_dir, folds=[0, 1], device="cpu")
    assert load_predictor(run_dir, folds=[0], device="cpu").folds == [0]


def test_a_fold_without_its_checkpoint_is_an_error_unless_the_folds_are_named(run_dir):
    (run_dir / "fold1" / "best.pt").unlink()
    with pytest.raises(
        RunFolderError, match=r"fold1 has normalizer\.json but no best\.pt.*trainer\.resume=true"
    ):
        select_folds(run_dir)
    assert select_folds(run_dir, [0]) == [0]
    (run_dir / "fold0" / "best.pt").unlink()
    with pytest.raises(RunFolderError, match="holds no complete fold"):
        select_folds(run_dir)


def test_the_default_ensemble_holds_every_complete_fold(run_dir):
    assert select_folds(run_dir) == [0, 1]
    (run_dir / "fold2").mkdir()  # an empty fold folder (created, nothing written yet) is no fold
    assert select_folds(run_dir) == [0, 1]


# ---------------------------------------------------------------- Kaggle packaging
def package(run_dir: Path, out: Path | None = None, *extra: str) -> tuple[Path, Path]:
    argv = ["--run-dir", str(run_dir), "--user", "someone", *extra]
    return kaggle_package.main(argv + (["--out", str(out)] if out is not None else []))


def test_packaging_refuses_to_delete_a_folder_it_did_not_create(run_dir, tmp_path):
    precious = tmp_path / "out" / "code" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("mine")
    with pytest.raises(
        SystemExit, match=r"refusing to delete or overwrite .*code: it exists and was not staged"
    ):
        package(run_dir, tmp_path / "out")
    assert precious.read_text() == "mine"
    assert not (tmp_path / "out" / "run").exists()  # checked before anything was written

    with pytest.raises(StagingError, match="refusing to delete or overwrite"):
        stage_run_dataset(run_dir, precious.parent, "someone")
    assert precious.read_text() == "mine"


def test_packaging_replaces_its_own_marked_folders_and_accepts_an_empty_one(run_dir, pristine_run, tmp_path):
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)  # empty: nothing to lose
    code, run = package(run_dir, out)
    assert (code / STAGING_MARKER).is_file() and (run / STAGING_MARKER).is_file()
    assert sorted(p.name for p in run.glob("fold*")) == ["fold0", "fold1"]
    (run / "stale.txt").write_text("from the first staging")
    second = tmp_path / "outputs" / EXP / "second"  # a second run, staged into the same marked folders
    shutil.copytree(pristine_run, second)
    shutil.rmtree(second / "fold1")
    code, run = package(second, out, "--folds", "0")  # a fold folder gone: only named folds are staged
    assert not (run / "stale.txt").exists() and sorted(p.name for p in run.glob("fold*")) == ["fold0"]
    assert json.loads((run / "dataset-metadata.json").read_text())["id"] == "someone/cmi-exp013-second"


def test_packaging_refuses_a_link_or_a_file_in_place_of_a_staging_folder(run_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / STAGING_MARKER).write_text("")  # even a marked folder is not followed through a link
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run").symlink_to(elsewhere)
    with pytest.raises(SystemExit, match="it is a file or a link"):
        package(run_dir, tmp_path / "out")
    assert (elsewhere / STAGING_MARKER).is_file()


@pytest.mark.parametrize("name", ["../../../x", "..", "a/b", ".hidden", "exp..1", "", "exp 1", "/abs"])
def test_an_experiment_name_must_be_a_plain_name(name):
    with pytest.raises(RunFolderError, match="not a plain name"):
        check_exp_name(name, "config.yaml")


@pytest.mark.parametrize("name", ["exp018", "exp018_v2", "exp-1.2", "_x"])
def test_plain_experiment_names_are_accepted(name):
    assert check_exp_name(name, "config.yaml") == name


def test_packaging_refuses_a_run_whose_exp_name_would_escape_the_output_folder(run_dir, tmp_path):
    config = run_dir / "config.yaml"
    values = yaml.safe_load(config.read_text())
    values["exp_name"] = "../../../x"
    config.write_text(yaml.safe_dump(values))
    escaped = (REPO_ROOT / "outputs" / "kaggle" / f"../../../x-{run_dir.name}").resolve()
    with pytest.raises(SystemExit, match=r"experiment name '\.\./\.\./\.\./x', which is not a plain name"):
        package(run_dir)  # the default output path, outputs/kaggle/<exp>-<run>
    assert not escaped.exists()
    with pytest.raises(RunFolderError, match="not a plain name"):
        stage_run_dataset(run_dir, tmp_path / "out" / "run", "someone")
    assert not (tmp_path / "out").exists()


def test_packaging_checks_every_fold_before_writing(run_dir, tmp_path):
    damage(run_dir / "fold1" / "best.pt", "half")
    with pytest.raises(SystemExit, match=r"fold1/best\.pt is damaged or incomplete.*--folds without 1"):
        package(run_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "run").exists()
    _, run = package(run_dir, tmp_path / "out", "--folds", "0")
    assert sorted(p.name for p in run.glob("fold*")) == ["fold0"]


# ---------------------------------------------------------------- threads
def test_load_predictor_applies_num_threads(pristine_run):
    torch.set_num_threads(2)
    try:
        inference_module().load_predictor(pristine_run, device="cpu", num_threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="num_threads must be a positive whole number"):
            inference_module().load_predictor(pristine_run, device="cpu", num_threads=0)
    finally:
        torch.set_num_threads(1)


def test_batch_mode_passes_num_threads_to_the_predictor():
    received = {}

    class Loaded(Exception):
        pass

    def load_predictor(run_dir, folds, device, **options):
        received.update(options)
        raise Loaded

    with pytest.raises(Loaded):
        batch_main(load_predictor, EXP, ["run_dir=somewhere", "num_threads=1"])
    assert received["num_threads"] == 1


def submission_environment(run_dir: Path, tmp_path: Path, **settings: str) -> dict[str, str]:
    rng = np.random.default_rng(0)
    sensors = [rest_sensors(np.array([1.0, 0, 0, 0]), np.array([0, 0, 9.8]), n, rng) for n in (40, 55)]
    test_dir = tmp_path / "competition"
    test_dir.mkdir()
    make_frame([("SEQ_1", "SUBJ_1", sensors[0]), ("SEQ_2", "SUBJ_2", sensors[1])]).write_csv(
        test_dir / "test.csv"
    )
    make_demographics(["SUBJ_1", "SUBJ_2"]).write_csv(test_dir / "test_demographics.csv")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "CMI_CODE_DIR": str(REPO_ROOT),
        "CMI_RUN_DIR": str(run_dir),
        "CMI_EXPERIMENT": EXP,
        "CMI_COMPETITION_DIR": str(test_dir),
        "CMI_OUTPUT": str(tmp_path / "submission.csv"),
        **settings,
    }


def run_submission(environment: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    script = REPO_ROOT / "kaggle" / "submission.py"
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=environment, cwd=cwd
    )


def test_the_kaggle_script_applies_cmi_num_threads(pristine_run, tmp_path):
    result = run_submission(submission_environment(pristine_run, tmp_path, CMI_NUM_THREADS="1"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1 torch threads, 1 fold threads)" in result.stdout
    assert (tmp_path / "submission.csv").read_text().splitlines()[0] == "sequence_id,gesture"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"CMI_NUM_THREADS": "two"}, "CMI_NUM_THREADS must be a positive whole number"),
        ({"CMI_NUM_THREADS": "0"}, "CMI_NUM_THREADS must be a positive whole number"),
        ({"CMI_EXPERIMENT": "../x"}, "CMI_EXPERIMENT must name an experiment folder"),
    ],
)
def test_the_kaggle_script_refuses_bad_settings_before_loading(pristine_run, tmp_path, settings, expected):
    result = run_submission(submission_environment(pristine_run, tmp_path, **settings), tmp_path)
    assert result.returncode != 0 and expected in result.stderr


def test_a_setting_added_after_a_run_was_saved_resumes_only_at_its_old_behaviour():
    from codes.common.runs import resume_differences

    saved = {"machine": {"compile": False}, "trainer": {"epochs": 3}}
    assert resume_differences(saved, {"machine": {"compile": False, "compile_mode": "default"},
                                      "trainer": {"epochs": 3, "checkpoint_every_epochs": 1}}) == []  # fmt: skip
    changed = resume_differences(saved, {"machine": {"compile": False, "compile_mode": "reduce-overhead"},
                                         "trainer": {"epochs": 3}})  # fmt: skip
    assert changed == ["machine.compile_mode: 'default' -> 'reduce-overhead'"]
    assert resume_differences(saved, {"machine": {"compile": True}, "trainer": {"epochs": 3}})
