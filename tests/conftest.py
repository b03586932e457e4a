"""Shared fixtures: the bundled sample media, small synthetic image pairs, a free port, scripts run in this process;
child processes run to one deadline; the ``java`` marker; one torch thread per pytest-xdist worker."""
from __future__ import annotations

import gc
import json
import os
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

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
    # torch's import-time objects out of the full collections to come: the libraries and the tests' own call
    # gc.collect() many times (pytest 5 times at the end), each a walk of a heap torch makes most of.
    gc.collect()
    gc.freeze()


# ----------------------------------------------------------------------------------------------- one deadline

# Every wait on another process, a server or a browser ends at this one deadline (seconds; GEOLLAVA_TEST_TIMEOUT).
# It is generous on purpose: on a busy machine a test may take longer, never fail for it. Tests wait for events (a
# process's exit, a line in a log, a DOM state), never for a fixed time.
TEST_TIMEOUT = float(os.environ.get("GEOLLAVA_TEST_TIMEOUT", "900"))
# The environment of every child process: offline, one thread each (the workers already share the cores).
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false"}


def _tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


class Command:
    """A child process in a process group of its own (so a hung launcher is killed with every worker it started),
    its stdout and stderr in files (a pipe nobody reads would fill up and stall it)."""

    def __init__(self, command: list[str], *, env: dict | None = None, cwd: Path | None = None):
        self.command = [str(part) for part in command]
        self._out = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self._err = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self.process = subprocess.Popen(self.command, cwd=cwd or REPO, env={**os.environ, **CHILD_ENV, **(env or {})},
                                        stdout=self._out, stderr=self._err, text=True, start_new_session=True)

    def stdout(self) -> str:
        self._out.seek(0)
        return self._out.read()

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def output(self) -> str:
        """What it printed so far, stdout then stderr."""
        return self.stdout() + self.stderr()

    def describe(self) -> str:
        return shlex.join(self.command).replace(str(REPO) + "/", "")

    def kill(self) -> None:
        """The whole process group (the launcher and whatever it started), if anything of it is left."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()

    def finish(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Wait for it to exit (at most ``timeout``, default the deadline); a child still running then is killed with
        its process group and the test fails with what it was waiting for and what the child printed last."""
        limit = TEST_TIMEOUT if timeout is None else timeout
        try:
            code = self.process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.kill()
            fail_waiting(f"{self.describe()} to finish", limit, self.output())
        finally:
            self.kill()  # what it started and left behind goes too (an orphaned worker would hold a port)
        return subprocess.CompletedProcess(self.command, code, self.stdout(), self.stderr())


def fail_waiting(what: str, seconds: float, last_output: str = "") -> None:
    pytest.fail(f"timed out after {seconds:.0f} s (GEOLLAVA_TEST_TIMEOUT) waiting for {what}"
                + (f"; its last output:\n{_tail(last_output)}" if last_output else ""), pytrace=False)


def start_command(command: list, *, env: dict | None = None, cwd: Path | None = None) -> Command:
    """A child process started (see ``Command``); ``.finish()`` waits for it."""
    return Command(command, env=env, cwd=cwd)


def run_command(command: list, *, env: dict | None = None, cwd: Path | None = None,
                timeout: float | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run`` to the one deadline, the child killed with its process group if it outlives it."""
    return start_command(command, env=env, cwd=cwd).finish(timeout)


def torchrun(port: int, script: str, *settings: str, processes: int = 2,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N --master_port PORT script SETTINGS...`` on this machine (gloo on the CPU)."""
    return run_command([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                        f"--master_port={port}", script, *settings], env=env)


def wait_until(condition: Callable[[], bool], what: str, *, output: Callable[[], str] = lambda: "",
               process: Command | subprocess.Popen | None = None, poll: float = 0.2) -> None:
    """Poll ``condition`` until it holds, failing at the deadline (or at once if ``process`` has exited) with
    ``what`` was awaited and the last of ``output()``."""
    started = time.monotonic()
    popen = getattr(process, "process", process)
    while not condition():
        if popen is not None and popen.poll() is not None:
            if condition():
                return
            pytest.fail(f"waiting for {what}, but the process exited with status {popen.returncode}; its last "
                        f"output:\n{_tail(output())}", pytrace=False)
        if time.monotonic() - started > TEST_TIMEOUT:
            fail_waiting(what, TEST_TIMEOUT, output())
        time.sleep(poll)


# ----------------------------------------------------------------------------------------------- scripts in-process

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
    ``runs/<run>`` a short LoRA fine-tune of tiny Video-LLaVA (validation loss and captions at steps 2 and 4, the
    checkpoint whose captions score best by sbert kept, evaluation after training),
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
        MAX_STEPS=4, BATCH_SIZE=4, LR=1e-2, WARMUP_STEPS=0, LOGGING_STEPS=1, SAVE_STEPS=2, EVAL_STEPS=2,
        GRADIENT_CHECKPOINTING=False, MAX_NEW_TOKENS=8, EVAL_BATCH_SIZE=4, VAL_GENERATE_LIMIT=TINY_VAL_RECORDS,
        BEST_METRIC="sbert"))
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
