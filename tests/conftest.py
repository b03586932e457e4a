"""Shared fixtures: the bundled sample media, small synthetic image pairs, a free port; the ``java`` marker."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from geochange.errors import UserError
from geochange.sample.data import ensure_sample_media
from geochange.sample.scenes import make_scene_pair, render_pair
from geochange.video import write_image

JAVA_MISSING = ("needs Java on the PATH: pycocoevalcap's PTB tokenizer and METEOR run on it (without Java the suite "
                "falls back to its own normaliser and reports METEOR as missing, which other tests check)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.java`` skip, with the reason, where no ``java`` is on the PATH."""
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
