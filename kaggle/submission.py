"""Kaggle submission notebook: serve a trained run, or a blend of runs, through the competition's
inference server.

Paste this file into one notebook cell (or attach the code dataset and run it with
``%run /kaggle/input/<code dataset>/kaggle/submission.py``). Attach three inputs: the
competition data, the code dataset and a run dataset (see docs/inference.md: both datasets are
staged by ``python -m codes.inference.kaggle_package``). Internet off: nothing is downloaded.

- The code and run datasets are found under /kaggle/input (or given by CMI_CODE_DIR,
  CMI_RUN_DIR); the code folder goes onto sys.path and the run's fold models are loaded once,
  before the server starts. A folder holding blend.json (``kaggle_package --blend-dir``) is a
  blend: found before any run folder, loaded with ``codes.inference.blend.load_blend`` (each
  member by its own experiment's code; CMI_EXPERIMENT is not used; docs/blend.md).
- On Kaggle, ``predict`` is served through
  ``kaggle_evaluation.cmi_inference_server.CMIInferenceServer``: ``serve()`` during the
  competition rerun, the local gateway on the public test.csv otherwise.
- Where ``kaggle_evaluation`` cannot be imported (not on Kaggle), it says so and falls back to
  batch mode: test.csv -> submission.csv (CMI_OUTPUT), with the score when labels exist.
- CMI_NUM_THREADS sets torch's CPU threads (default: torch's, one per core); 1 is faster on a
  busy or shared CPU and with CMI_FOLD_THREADS=2.
- CMI_SUBJECT_AWARE=1 / 0 turns subject-aware answers on / off. Unset: on at pair level where
  it pays (``subject_aware="pairs"``: the run's protocol.json, staged with the run, counts
  gesture x orientation pairs and the model gives the heads; docs/results.md), plain otherwise.
- Yes/no switches (CMI_SUBJECT_AWARE, CMI_QUANTIZE) take 1/0, true/false, yes/no, on/off (any
  case); whole numbers (CMI_NUM_THREADS, CMI_FOLD_THREADS) are at least 1. Any other value stops
  the script before the run loads, naming the variable (``codes/common/env_flags.py``).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the BERT head is built from a config; never download

EXPERIMENT = os.environ.get("CMI_EXPERIMENT", "exp018")  # whose inference.py loads the run
INPUT_ROOT = Path(os.environ.get("CMI_INPUT_ROOT", "/kaggle/input"))
COMPETITION_DIR = Path(
    os.environ.get("CMI_COMPETITION_DIR", str(INPUT_ROOT / "cmi-detect-behavior-with-sensor-data"))
)
CODE_DIR = os.environ.get("CMI_CODE_DIR", "")  # "" = search INPUT_ROOT for the code dataset
RUN_DIR = os.environ.get("CMI_RUN_DIR", "")  # "" = search INPUT_ROOT for a run folder
WORKING_DIR = Path("/kaggle/working")
BLEND_FILE = "blend.json"  # a blend folder (codes/inference/blend.py): several runs served together
SEARCH_DEPTH = 4


def _search(root: Path, is_match, depth: int = SEARCH_DEPTH) -> Path | None:
    """The first folder under ``root`` (breadth first, ``depth`` levels) for which ``is_match`` holds."""
    level = [root]
    for _ in range(depth + 1):
        following = []
        for folder in sorted(level):
            if is_match(folder):
                return folder
            try:
                following += [child for child in folder.iterdir() if child.is_dir()]
            except OSError:
                continue
        level = following
    return None


def find_code_dir() -> Path:
    if CODE_DIR:
        return Path(CODE_DIR)
    found = _search(INPUT_ROOT, lambda f: (f / "codes" / "inference" / "predictor.py").is_file())
    if found is None:
        raise FileNotFoundError(
            f"no code dataset (codes/inference/predictor.py) under {INPUT_ROOT}; set CMI_CODE_DIR"
        )
    return found


def find_run_dir() -> Path:
    if RUN_DIR:
        return Path(RUN_DIR)
    found = _search(  # a blend (blend.json) lies above its members' run folders: found first
        INPUT_ROOT,
        lambda f: (
            (f / BLEND_FILE).is_file() or ((f / "config.yaml").is_file() and any(f.glob("fold*/best.pt")))
        ),
    )
    if found is None:
        raise FileNotFoundError(
            f"no run folder (config.yaml + fold*/best.pt) or blend ({BLEND_FILE}) under {INPUT_ROOT}; "
            "set CMI_RUN_DIR"
        )
    return found


if not EXPERIMENT.isidentifier():  # a module name under codes/exp/, nothing else
    raise ValueError(f"CMI_EXPERIMENT must name an experiment folder such as exp018, got {EXPERIMENT!r}")
code_dir = find_code_dir()
sys.path.insert(0, str(code_dir))
from codes.common.env_flags import env_flag, env_positive_int  # noqa: E402  (the code dataset's)

# CPU only: int8 Linear layers, about twice as fast, probabilities slightly off training's
QUANTIZE_ON_CPU = env_flag("CMI_QUANTIZE", False)
FOLD_THREADS = env_positive_int("CMI_FOLD_THREADS", 1)  # fold models run at once per sequence
# torch CPU threads (None = torch's default, one per core): 1 on a busy or shared CPU, or with fold threads
NUM_THREADS = env_positive_int("CMI_NUM_THREADS", None)
SUBJECT_AWARE = env_flag("CMI_SUBJECT_AWARE", None)  # None: "pairs", pair level where it pays
run_dir = find_run_dir()
is_blend = (run_dir / BLEND_FILE).is_file()
if is_blend:  # every member's experiment is named in blend.json; CMI_EXPERIMENT is not used
    from codes.inference import blend as inference
else:
    inference = importlib.import_module(f"codes.exp.{EXPERIMENT}.inference")
from codes.common.runs import setup_logging  # noqa: E402  (importable once code_dir is on the path)

setup_logging(None)
print(f"code: {Path(inference.__file__).parent}, {'blend' if is_blend else 'run'}: {run_dir}")
started = time.perf_counter()
import torch  # noqa: E402

quantize = QUANTIZE_ON_CPU and not torch.cuda.is_available()
load = inference.load_blend if is_blend else inference.load_predictor
predictor = load(
    run_dir,
    quantize=quantize,
    fold_threads=FOLD_THREADS,
    num_threads=NUM_THREADS,
    subject_aware="pairs" if SUBJECT_AWARE is None else SUBJECT_AWARE,
)  # every fold, once, before the server starts
print(
    f"loaded folds {predictor.folds} on {predictor.device} in {time.perf_counter() - started:.1f} s "
    f"({torch.get_num_threads()} torch threads, {FOLD_THREADS} fold threads)"
)


def predict(sequence, demographics) -> str:
    """The competition's contract: one sequence (polars, test.csv columns) + its demographics row."""
    return predictor.predict(sequence, demographics)


try:  # kaggle_evaluation ships with the competition data
    if str(COMPETITION_DIR) not in sys.path:
        sys.path.append(str(COMPETITION_DIR))
    import kaggle_evaluation.cmi_inference_server as cmi_inference_server
except ImportError:
    cmi_inference_server = None

if cmi_inference_server is not None:
    inference_server = cmi_inference_server.CMIInferenceServer(predict)
    if os.getenv("KAGGLE_IS_COMPETITION_RERUN"):
        inference_server.serve()
    else:
        inference_server.run_local_gateway(
            data_paths=(str(COMPETITION_DIR / "test.csv"), str(COMPETITION_DIR / "test_demographics.csv"))
        )
else:
    from codes.inference.batch import run_batch

    default_output = WORKING_DIR if WORKING_DIR.is_dir() else Path.cwd()
    output = Path(os.environ.get("CMI_OUTPUT", str(default_output / "submission.csv")))
    print("kaggle_evaluation is not importable (not on Kaggle?): falling back to batch mode")
    run_batch(predictor, COMPETITION_DIR, output, run_dir=run_dir)  # never over an input file
    print(f"submission: {output}")
