"""What the stored clip size costs: write time, file size and read time of one 2-frame clip, full size vs bounded.

fMoW images run to thousands of pixels while the processors use 224 (Video-LLaVA) or 336 px (LLaVA-NeXT-Video);
``pairs-to-videos`` stores clips with the longest side at most 512 px by default (``--max-side``).

    python benchmarks/clip_size.py [WIDTH HEIGHT]     # default 2000 1800, an fMoW-sized pair
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from geochange.sample.scenes import make_scene_pair, render_pair  # noqa: E402
from geochange.convert import DEFAULT_MAX_SIDE, SheetOptions, fit_pair  # noqa: E402
from geochange.video import read_video_frames, write_video  # noqa: E402


def main(width: int = 2000, height: int = 1800, repeats: int = 3) -> None:
    before, after = (np.array(Image.fromarray(image).resize((width, height), Image.BICUBIC))
                     for image in render_pair(make_scene_pair(200_003)))
    print(f"a {width}x{height} pair, best of {repeats}:")
    print(f"{'max side':>9} {'clip':>11} {'write s':>8} {'MB':>6} {'read s':>7} {'clips/s (1 core)':>17}")
    for max_side in (None, 1024, DEFAULT_MAX_SIDE, 336):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "clip.mp4"
            writes, reads = [], []
            for _ in range(repeats):
                started = time.perf_counter()
                frames = fit_pair(before, after, SheetOptions(max_side=max_side))[:2]
                write_video(list(frames), path)
                writes.append(time.perf_counter() - started)
                started = time.perf_counter()
                read_video_frames(path, 2)
                reads.append(time.perf_counter() - started)
            shape = frames[0].shape
            print(f"{str(max_side or 'full'):>9} {shape[1]:>5}x{shape[0]:<5} {min(writes):>8.3f} "
                  f"{path.stat().st_size / 1e6:>6.2f} {min(reads):>7.3f} {1 / min(reads):>17.1f}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
