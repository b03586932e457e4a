"""Shared fixtures: the bundled sample media, small synthetic image pairs, a free port, scripts run in this process;
the ``java`` marker; one torch thread per pytest-xdist worker."""
from __future__ import annotations

import json
import os
import runpy
import shutil
import socket
import sys
from pathlib import Path

# Every test runs offline, as CI and the README's quick-start do.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from geochange.errors import UserError  # noqa: E402
from geochange.sample.data import ensure_sample_media  # noqa: E402
from geochange.sample.scenes import make_scene_pair, render_pair  # noqa: E402
from geochange.video import write_image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: one thread each (and for the processes they start) instead of every worker's torch
    # taking all of them, which on 2 cores made the suite slower than one worker. The tiny models lose nothing.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def run_script(script: str, *args: str) -> None:
    """``python <script> ARGS...`` as a user runs it, in this process (no interpreter start); a ``UserError`` the
    script raises reaches the caller (the one-line handler is the subprocess test's business)."""
    saved = sys.argv
    sys.argv = [str(REPO / script), *map(str, args)]
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        sys.argv = saved


def script_args(**settings) -> list[str]:
    """``NAME=VALUE`` arguments for ``run_script``."""
    return [f"{name}={value}" for name, value in settings.items()]

JAVA_MISSING = ("needs Java on the PATH: pycocoevalcap's PTB tokenizer and METEOR run on it (without Java the suite "
                "falls back to its own normaliser and reports METEOR as missing, which other tests check)")


# The multi-process tests take a minute each: started first, they run beside the many short tests instead of leaving
# one pytest-xdist worker to finish the last of them alone (xdist hands tests out in collection order).
LONGEST_FIRST = ("test_scaleout.py",)


def pytest_collection_modifyitems(config, items):
    """The multi-process test file first (modules stay whole, so module fixtures are built once). Tests marked
    ``@pytest.mark.java`` skip, with the reason, where no ``java`` is on the PATH."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)
    if shutil.which("java") is None:
        for item in items:
            if item.get_closest_marker("java"):
                item.add_marker(pytest.mark.skip(reason=JAVA_MISSING))


@pytest.fixture
def free_port() -> int:
    """A TCP port free right now (bound to port 0, then released), for torchrun's --master_port: two test runs
    at once, or a port left in TIME_WAIT, never collide on a fixed 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """data/sample with every sample video and ChangeChat image (drawn once, then reused)."""
    return ensure_sample_media()


@pytest.fixture(scope="session")
def scene_images() -> tuple[np.ndarray, np.ndarray]:
    """A before/after pair from the scene generator (with changes and nuisance), 256x256 RGB."""
    return render_pair(make_scene_pair(200_003))


@pytest.fixture
def image_pair(tmp_path: Path, scene_images) -> tuple[Path, Path]:
    """The scene pair saved as tmp_path/before.png and tmp_path/after.png."""
    return write_image(scene_images[0], tmp_path / "before.png"), write_image(scene_images[1], tmp_path / "after.png")


@pytest.fixture
def write_json(tmp_path: Path):
    """write_json(data, name="x.json") -> Path; a str is written as is (for malformed JSON)."""
    def write(data, name: str = "annotations.json") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1), encoding="utf-8")
        return path

    return write


@pytest.fixture
def user_error():
    """user_error(callable, *parts): call it, expect a UserError whose message contains every part; returns it."""
    def check(call, *parts) -> str:
        with pytest.raises(UserError) as caught:
            call()
        message = str(caught.value)
        for part in parts:
            assert str(part) in message, f"{part!r} not in {message!r}"
        return message

    return check


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread: the tiny models gain nothing from threads and lose much on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Records of the sample's val file that the shared tiny runs validate and evaluate on.
TINY_VAL_RECORDS = 4


@pytest.fixture(scope="session")
def tiny_repo(sample_dir, tmp_path_factory) -> Path:
    """A repo-shaped folder of tiny results, made once per session, as a user's runs leave them:
    ``runs/<run>`` a short LoRA fine-tune of tiny Video-LLaVA (validation loss, evaluation after training),
    ``results/`` its evaluation, the untuned tiny Video-LLaVA's and a tiny DeltaVLM's on the sample captions, and
    the tiny Video-LLaVA's on those captions converted to videos (one test set for both families); ``val.json``."""
    from geochange.convert import changechat_to_videos
    from geochange.sample.data import SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT, SAMPLE_VAL

    root = tmp_path_factory.mktemp("repo")
    results = root / "results"
    val = root / "val.json"
    val.write_text(json.dumps(json.loads(SAMPLE_VAL.read_text())[:TINY_VAL_RECORDS]))
    run_script("videollava_finetune.py", *script_args(
        MODEL_ID="tiny", OUTPUT_DIR=root / "runs", RESULTS_DIR=results, VAL_ANNOTATIONS=val, TRAIN_LIMIT=8,
        MAX_STEPS=4, BATCH_SIZE=4, LR=1e-2, WARMUP_STEPS=0, LOGGING_STEPS=1, SAVE_STEPS=100, EVAL_STEPS=2,
        GRADIENT_CHECKPOINTING=False, MAX_NEW_TOKENS=8, EVAL_BATCH_SIZE=4))
    run_script("videollava_test.py", *script_args(MODEL_ID="tiny", MODEL_PATH="base", RESULTS_DIR=results,
                                                   VAL_ANNOTATIONS=val, MAX_NEW_TOKENS=8, BATCH_SIZE=4))
    converted = changechat_to_videos(SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT, root / "converted")
    run_script("videollava_test.py", *script_args(
        MODEL_ID="tiny", VAL_ANNOTATIONS=converted, VIDEO_DIR=root / "converted" / "videos", BATCH_SIZE=4,
        MAX_NEW_TOKENS=8, RESULTS_DIR=results, LIMIT=TINY_VAL_RECORDS, RUN_NAME="videollava-tiny_captions"))
    run_script("deltavlm_predict.py", *script_args(
        CHECKPOINT="tiny", TEST_ANNOTATIONS=SAMPLE_CHANGECHAT_CAPTIONS, LIMIT=TINY_VAL_RECORDS, NUM_BEAMS=1,
        MAX_NEW_TOKENS=8, RESULTS_DIR=results))
    return root


@pytest.fixture
def clips_with_two_bad_ones(tmp_path):
    """A GeoLLaVA file of 6 sample records whose folder also holds a corrupt clip and a 1-frame clip."""
    import shutil

    from geochange.sample.data import SAMPLE_TRAIN, SAMPLE_VIDEO_DIR
    from geochange.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    records = json.loads(SAMPLE_TRAIN.read_text())[:6]
    for record in records:
        shutil.copy(SAMPLE_VIDEO_DIR / record["video"], videos / record["video"])
    (videos / records[2]["video"]).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))  # corrupt container
    write_video([np.zeros((32, 32, 3), np.uint8)], videos / records[4]["video"])           # one frame only
    annotations = tmp_path / "train.json"
    annotations.write_text(json.dumps(records))
    return annotations, videos, records
