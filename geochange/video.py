"""Before/after pairs as 2-frame H.264 videos (the GeoLLaVA input format), and reading them back.

GeoLLaVA trained on fMoW image pairs stored as videos but never released the step
that makes them; ``pair_to_video`` and ``pairs_sheet_to_videos`` are that step.

    python -m geochange.video SHEET OUT_DIR [IMAGE_ROOT]   # a pairs sheet (.xlsx/.csv) -> a folder of videos
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import UserError, install_error_handler
from .fileio import atomic_path

# Near-lossless: decoded frames stay within a few grey levels of the input (yuv420p chroma aside).
H264_CRF = 12
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: int = 1) -> Path:
    """Write HxWx3 uint8 RGB frames (even H and W, all the same size) as an H.264 .mp4; returns the path.

    The file appears only when complete: it is written under a temporary name and renamed.
    """
    import av

    path = Path(path)
    if len(frames) == 0:
        raise UserError(f"{path}: no frames to write")
    first = np.asarray(frames[0])
    for index, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise UserError(f"{path}: frame {index} must be an HxWx3 uint8 RGB array, got {frame.dtype} "
                            f"{frame.shape}")
        if frame.shape != first.shape:
            raise UserError(f"{path}: frame {index} is {frame.shape[1]}x{frame.shape[0]} but frame 0 is "
                            f"{first.shape[1]}x{first.shape[0]}; all frames need one size")
    height, width = first.shape[:2]
    if height % 2 or width % 2:
        raise UserError(f"{path}: H.264 (yuv420p) needs an even width and height, got {width}x{height}; "
                        "crop or pad the frames (pair_to_video does this for you)")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(H264_CRF)}
            for frame in frames:
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                container.mux(stream.encode(picture))
            container.mux(stream.encode(None))  # flush the frames the encoder still holds
    return path


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Uniform frame indices over the whole video; with 2 frames: first and last (before, after)."""
    return [int(i) for i in np.linspace(0, total - 1, num_frames).round()]


def _too_few(path: Path, total: int, num_frames: int) -> UserError:
    why = " (a before/after pair needs 2)" if total < 2 else ""
    return UserError(f"video {path} has {total} frame(s) but num_frames={num_frames} were asked for{why}")


def _read_with_decord(path: Path, num_frames: int) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    total = len(reader)
    if total < num_frames:
        raise _too_few(path, total, num_frames)
    batch = reader.get_batch(sample_indices(total, num_frames))
    # A caller may have switched decord's bridge to torch; both have a numpy view.
    return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _read_with_pyav(path: Path, num_frames: int) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise UserError(f"{path} has no video stream")
        counted = container.streams.video[0].frames  # from the container's header; 0 when unknown
    total = counted or _count_frames(path)
    for attempt in range(2):
        if total < num_frames:
            raise _too_few(path, total, num_frames)
        wanted = sample_indices(total, num_frames)
        picked: dict[int, np.ndarray] = {}
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    picked[index] = frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    break
        if len(picked) == len(set(wanted)):
            return np.stack([picked[i] for i in wanted])
        total = _count_frames(path)  # the header's frame count was wrong; count by decoding, once
    raise UserError(f"cannot decode video {path}: frames {wanted} could not all be read")


def read_video_frames(path: str | Path, num_frames: int = 2, *, backend: str = "auto") -> np.ndarray:
    """``num_frames`` uniformly sampled frames as a [num_frames, H, W, 3] uint8 RGB array.

    Decoded with decord; with PyAV when decord is missing or fails (or ``backend="pyav"``).
    """
    path = Path(path)
    if num_frames < 1:
        raise UserError(f"num_frames must be >= 1, got {num_frames}")
    if backend not in ("auto", "decord", "pyav"):
        raise UserError(f"unknown video backend {backend!r} (use auto, decord or pyav)")
    if not path.is_file():
        raise UserError(f"video {path} does not exist")
    decord_error = None
    if backend in ("auto", "decord"):
        try:
            return _read_with_decord(path, num_frames)
        except UserError:
            raise
        except ImportError as exc:
            decord_error = exc
        except Exception as exc:  # decord raises its own error types (and RuntimeError) on bad files
            decord_error = exc
        if backend == "decord":
            raise UserError(f"cannot decode video {path} with decord: {decord_error}")
    try:
        return _read_with_pyav(path, num_frames)
    except UserError:
        raise
    except Exception as exc:  # PyAV's FFmpegError subclasses, or a broken stream mid-way
        reason = getattr(exc, "strerror", None) or exc  # FFmpeg errors repeat the file name in str(exc)
        raise UserError(f"cannot decode video {path}: {reason}") from None


# --------------------------------------------------------------------------- images

def read_image(path: str | Path) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path} is not a readable image: {exc}") from None


def read_image_pair(path_a: str | Path, path_b: str | Path, *, resize: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) RGB arrays; the after image must match the before image's size unless ``resize``."""
    before, after = read_image(path_a), read_image(path_b)
    if before.shape != after.shape:
        if not resize:
            raise UserError(f"image pair sizes differ: {path_a} is {before.shape[1]}x{before.shape[0]}, "
                            f"{path_b} is {after.shape[1]}x{after.shape[0]} (pass resize=True to resize the "
                            "after image to the before image's size)")
        from PIL import Image

        after = np.array(Image.fromarray(after).resize((before.shape[1], before.shape[0]), Image.BICUBIC))
    return before, after


def write_image(image: np.ndarray, path: str | Path) -> Path:
    """Save an RGB array as PNG (or the suffix's format), atomically like write_video."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image)).save(tmp, format=Image.registered_extensions().get(path.suffix.lower(),
                                                                                             "PNG"))
    return path


def crop_to_even(image: np.ndarray) -> np.ndarray:
    """Drop the last row / column where needed: H.264 in yuv420p needs even sizes."""
    height, width = image.shape[:2]
    return image[: height - height % 2, : width - width % 2]


def pair_to_video(path_a: str | Path, path_b: str | Path, out_path: str | Path, *, resize: bool = False,
                  fps: int = 1) -> Path:
    """Two images (before, after) -> a 2-frame video at ``out_path``; odd sizes lose their last row/column."""
    before, after = read_image_pair(path_a, path_b, resize=resize)
    if min(before.shape[:2]) < 2:
        raise UserError(f"image {path_a} is too small for a video ({before.shape[1]}x{before.shape[0]})")
    return write_video([crop_to_even(before), crop_to_even(after)], out_path, fps=fps)


# --------------------------------------------------------------------------- pairs sheets

PAIR_COLUMNS = ("image_path1", "image_path2")


def _read_sheet(sheet_path: Path):
    import pandas as pd

    if not sheet_path.is_file():
        raise UserError(f"pairs sheet {sheet_path} does not exist")
    suffix = sheet_path.suffix.lower()
    try:
        if suffix in (".xlsx", ".xlsm", ".xls"):
            table = pd.read_excel(sheet_path, dtype=str)
        elif suffix in (".csv", ".tsv", ".txt"):
            table = pd.read_csv(sheet_path, dtype=str, sep="\t" if suffix == ".tsv" else ",")
        else:
            raise UserError(f"pairs sheet {sheet_path}: unsupported type {suffix!r} (use .xlsx or .csv)")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read pairs sheet {sheet_path}: {exc}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _where(sheet_path: Path, row: int) -> str:
    # Row numbers as in the file: the header is line 1, the first pair line 2.
    return f"{sheet_path}, row {row} (line {row + 2})"


def _cell(table, sheet_path: Path, row: int, column: str) -> str:
    value = table[column].iloc[row]
    if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
        raise UserError(f"{_where(sheet_path, row)}: empty {column}")
    return str(value).strip()


def _video_name(table, sheet_path: Path, row: int) -> str:
    if "video" in table.columns:
        name = _cell(table, sheet_path, row, "video")
    elif "id" in table.columns:
        name = _cell(table, sheet_path, row, "id")
    else:
        return f"pair_{row:06d}.mp4"
    name = name if name.lower().endswith(".mp4") else f"{name}.mp4"
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise UserError(f"{_where(sheet_path, row)}: video name {name!r} must stay inside the output folder")
    return name


def pairs_sheet_to_videos(sheet_path: str | Path, out_dir: str | Path, image_root: str | Path | None = None, *,
                          resize: bool = False) -> list[Path]:
    """One 2-frame video per row of a pairs sheet (columns image_path1, image_path2); returns every row's video.

    Videos are named by the sheet's ``video`` or ``id`` column, else ``pair_{row:06d}.mp4``.
    Relative image paths are resolved against ``image_root`` (default: the sheet's folder).
    Videos already in ``out_dir`` are kept, so an interrupted run resumes where it stopped.
    """
    from tqdm import tqdm

    sheet_path, out_dir = Path(sheet_path), Path(out_dir)
    table = _read_sheet(sheet_path)
    missing_columns = [c for c in PAIR_COLUMNS if c not in table.columns]
    if missing_columns:
        raise UserError(f"pairs sheet {sheet_path} lacks column(s) {', '.join(missing_columns)} "
                        f"(it has: {', '.join(table.columns) or 'none'})")
    root = Path(image_root) if image_root is not None else sheet_path.parent

    # Check every row before writing anything, so all problems are reported at once and early.
    plan: list[tuple[int, Path, Path, Path]] = []
    first_row_of: dict[str, int] = {}
    missing_images: list[str] = []
    for row in range(len(table)):
        name = _video_name(table, sheet_path, row)
        if name in first_row_of:
            raise UserError(f"{_where(sheet_path, row)}: video name {name!r} repeats row {first_row_of[name]}")
        first_row_of[name] = row
        images = []
        for column in PAIR_COLUMNS:
            image = Path(_cell(table, sheet_path, row, column)).expanduser()
            image = image if image.is_absolute() else root / image
            images.append(image)
        target = out_dir / name
        if not target.exists():
            missing_images += [f"row {row} (line {row + 2}): {image}" for image in images if not image.is_file()]
        plan.append((row, images[0], images[1], target))
    if missing_images:
        shown = "; ".join(missing_images[:5]) + ("; ..." if len(missing_images) > 5 else "")
        raise UserError(f"pairs sheet {sheet_path}: {len(missing_images)} image(s) not found (image root "
                        f"{root}): {shown}")

    todo = [item for item in plan if not item[3].exists()]
    if len(todo) < len(plan):
        print(f"{len(plan) - len(todo)} of {len(plan)} videos already in {out_dir}; making the other {len(todo)}")
    for row, before, after, target in tqdm(todo, desc="pairs -> videos", unit="video", disable=not todo):
        try:
            pair_to_video(before, after, target, resize=resize)
        except UserError as exc:
            raise UserError(f"{_where(sheet_path, row)}: {exc}") from None
    return [target for *_, target in plan]


def main(argv: list[str] | None = None) -> int:
    install_error_handler()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        raise UserError("usage: python -m geochange.video SHEET OUT_DIR [IMAGE_ROOT]")
    written = pairs_sheet_to_videos(argv[0], argv[1], argv[2] if len(argv) == 3 else None)
    print(f"{len(written)} videos in {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
