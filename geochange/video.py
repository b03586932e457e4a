"""Before/after pairs as 2-frame H.264 videos (the GeoLLaVA input format), and reading them back.

GeoLLaVA trained on fMoW image pairs stored as videos but never released the step
that makes them; ``pair_to_video`` and ``pairs_sheet_to_videos`` are that step.

    python common.py pairs-to-videos SHEET OUT_DIR [IMAGE_ROOT] [--size WxH] [--max-side N] [--strict]
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
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


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``size`` = (width, height); Lanczos, the usual choice for shrinking photographs."""
    from PIL import Image

    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.array(Image.fromarray(image).resize(tuple(size), Image.LANCZOS))


def bounded_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so that the longer side is at most ``max_side``; never scaled up."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(2, round(width * scale)), max(2, round(height * scale))


def read_image_pair(path_a: str | Path, path_b: str | Path, *, resize: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) RGB arrays; the after image must match the before image's size unless ``resize``."""
    before, after = read_image(path_a), read_image(path_b)
    if before.shape != after.shape:
        if not resize:
            raise UserError(f"image pair sizes differ: {path_a} is {before.shape[1]}x{before.shape[0]}, "
                            f"{path_b} is {after.shape[1]}x{after.shape[0]} (pass resize=True to resize the "
                            "after image to the before image's size)")
        after = resize_image(after, (before.shape[1], before.shape[0]))
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
# The processors resize to 224 (Video-LLaVA) and 336 px (LLaVA-NeXT-Video); fMoW images run to thousands of
# pixels, and a 2000x1800 clip takes ~0.4 s to decode, too slow to feed a GPU. 512 keeps headroom above 336.
DEFAULT_MAX_SIDE = 512


@dataclass(frozen=True)
class SheetOptions:
    """How a pairs sheet becomes videos.

    ``resize``: a pair whose images differ in size is resized to one size (``size``, else the before image's);
    ``False`` stops at such a pair. ``size``: (width, height) for every video. ``max_side``: videos are scaled
    down (never up) so their longer side is at most this; ``None`` or 0 keeps the images' size.
    """
    resize: bool = True
    size: tuple[int, int] | None = None
    max_side: int | None = DEFAULT_MAX_SIDE


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


def geollava_video_name(image_path1: str, image_path2: str) -> str:
    """GeoLLaVA's released video name: ``airport_hangar_0_4-airport_hangar_0_1.mp4`` (the stems without ``_rgb``)."""
    def stem(path: str) -> str:
        name = Path(path.replace("\\", "/")).stem
        return name[: -len("_rgb")] if name.endswith("_rgb") else name

    return f"{stem(image_path1)}-{stem(image_path2)}.mp4"


def _video_name(table, sheet_path: Path, row: int) -> str:
    if "video" in table.columns:
        name = _cell(table, sheet_path, row, "video")
    elif "id" in table.columns:
        name = _cell(table, sheet_path, row, "id")
    else:
        return geollava_video_name(*(_cell(table, sheet_path, row, column) for column in PAIR_COLUMNS))
    name = name if name.lower().endswith(".mp4") else f"{name}.mp4"
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise UserError(f"{_where(sheet_path, row)}: video name {name!r} must stay inside the output folder")
    return name


def image_candidates(written: str, root: Path) -> list[Path]:
    """Where a sheet's image path may be, in order: relative paths under ``root``; an absolute path as written,
    then under ``root`` by its trailing components (``/Datasets/val/x/y.jpg`` -> ``root/Datasets/val/x/y.jpg``,
    ``root/val/x/y.jpg``, ``root/x/y.jpg``, ``root/y.jpg``), since released sheets hold their authors' paths."""
    path = Path(written.replace("\\", "/")).expanduser()
    if not path.is_absolute() and not path.drive:
        return [root / path]
    parts = path.parts[1:]
    return [path] + [root.joinpath(*parts[start:]) for start in range(len(parts))]


def locate_image(written: str, root: Path) -> Path:
    """The first existing candidate of ``image_candidates``; a miss names where it looked."""
    candidates = image_candidates(written, root)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shown = ", ".join(map(str, candidates[:4])) + (f" and {len(candidates) - 4} more" if len(candidates) > 4 else "")
    raise UserError(f"image {written} not found (image root {root}; looked at {shown})")


def fit_pair(before: np.ndarray, after: np.ndarray, options: SheetOptions) -> tuple[np.ndarray, np.ndarray, bool]:
    """(before, after, whether the sizes differed): both at one even size, bounded by ``options.max_side``."""
    differ = before.shape != after.shape
    if differ and not options.resize:
        raise UserError(f"image sizes differ: {before.shape[1]}x{before.shape[0]} and "
                        f"{after.shape[1]}x{after.shape[0]} (drop --strict to resize them to one size)")
    width, height = options.size or bounded_size(before.shape[1], before.shape[0], options.max_side)
    before, after = resize_image(before, (width, height)), resize_image(after, (width, height))
    if min(before.shape[:2]) < 2:
        raise UserError(f"image too small for a video ({before.shape[1]}x{before.shape[0]})")
    return crop_to_even(before), crop_to_even(after), differ


def _plan_row(table, sheet_path: Path, row: int, root: Path, out_dir: Path, first_row_of: dict[str, int]):
    """(video path, before image, after image) for one row; images are looked up only for videos still to make."""
    name = _video_name(table, sheet_path, row)
    if name in first_row_of:
        raise UserError(f"video name {name!r} repeats row {first_row_of[name]}")
    first_row_of[name] = row
    target = out_dir / name
    written = [_cell(table, sheet_path, row, column) for column in PAIR_COLUMNS]
    if target.exists():
        return target, None, None
    return target, locate_image(written[0], root), locate_image(written[1], root)


def pairs_sheet_to_videos(sheet_path: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
                          options: SheetOptions = SheetOptions()) -> list[Path]:
    """One 2-frame video (before frame first) per row of a pairs sheet; returns the videos of the good rows.

    Columns ``image_path1``, ``image_path2`` (GeoLLaVA's sheets add category, location_id, timestamps...).
    Videos are named by the sheet's ``video`` or ``id`` column, else GeoLLaVA's scheme (``geollava_video_name``).
    Image paths are found under ``image_root`` (default: the sheet's folder), absolute ones by their trailing
    components too. Videos already in ``out_dir`` are kept, so an interrupted run resumes where it stopped.
    A bad row (missing image, empty cell, unreadable image...) gets one line and is skipped; the other rows are
    converted, then a UserError counts the bad rows.
    """
    sheet_path, out_dir = Path(sheet_path), Path(out_dir)
    table = _read_sheet(sheet_path)
    missing_columns = [c for c in PAIR_COLUMNS if c not in table.columns]
    if missing_columns:
        raise UserError(f"pairs sheet {sheet_path} lacks column(s) {', '.join(missing_columns)} "
                        f"(it has: {', '.join(table.columns) or 'none'})")
    root = Path(image_root) if image_root is not None else sheet_path.parent

    # Every row is checked before any video is made, so problems show early, one line each.
    bad: list[str] = []
    plan: list[tuple[int, Path, Path | None, Path | None]] = []  # (row, video, before, after)
    first_row_of: dict[str, int] = {}
    for row in range(len(table)):
        try:
            plan.append((row, *_plan_row(table, sheet_path, row, root, out_dir, first_row_of)))
        except UserError as exc:
            message = str(exc)
            bad.append(message if message.startswith(str(sheet_path)) else f"{_where(sheet_path, row)}: {message}")
            print(f"bad row: {bad[-1]}", file=sys.stderr)

    made, failed = pairs_to_videos([(_where(sheet_path, row), target, before, after)
                                    for row, target, before, after in plan], options, out_dir)
    bad += failed
    if bad:
        raise UserError(f"pairs sheet {sheet_path}: {len(bad)} of {len(table)} rows could not be converted "
                        f"(one line each above; first: {bad[0]}); the {len(made)} other videos are in {out_dir}")
    return made


def pairs_to_videos(jobs: list[tuple[str, Path, Path | None, Path | None]], options: SheetOptions, out_dir: Path
                    ) -> tuple[list[Path], list[str]]:
    """Make the videos of ``jobs`` = (where, video, before image, after image); a video already there is kept
    (its images may be None). Returns (the videos there at the end, one line per job that failed), the failures
    printed as they come, with a progress bar and a count of the pairs whose sizes differed."""
    from tqdm import tqdm

    todo = [job for job in jobs if not job[1].exists()]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} videos already in {out_dir}; making the other {len(todo)}")
    bad: list[str] = []
    resized = 0
    for where, target, before_path, after_path in tqdm(todo, desc="pairs -> videos", unit="video",
                                                       disable=not todo):
        try:
            before, after, differ = fit_pair(read_image(before_path), read_image(after_path), options)
            write_video([before, after], target)
            resized += differ
        except UserError as exc:
            bad.append(f"{where}: {exc}")
            tqdm.write(f"bad row: {bad[-1]}", file=sys.stderr)
    if resized:
        print(f"{resized} of {len(todo)} pairs had images of different sizes; resized to one size "
              f"({'x'.join(map(str, options.size)) if options.size else 'the before image size'})")
    return [target for _, target, *_ in jobs if target.exists()], bad


def _size_argument(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512") from None
    if width < 2 or height < 2:
        raise UserError(f"--size {text!r}: width and height must be at least 2")
    return width, height


SHEET_USAGE = ("pairs-to-videos SHEET OUT_DIR [IMAGE_ROOT] [--size WxH] [--max-side N] [--strict]\n"
               "  --size WxH    every video at this size (default: the before image's, bounded by --max-side)\n"
               f"  --max-side N  longest side at most N pixels, never upscaled (default {DEFAULT_MAX_SIDE}; 0 = keep)\n"
               "  --strict      stop at a pair whose images differ in size instead of resizing it")


def parse_size_options(argv: list[str], usage: str = SHEET_USAGE) -> tuple[list[str], SheetOptions]:
    """(the other arguments, the options) of a command line with ``--size``, ``--max-side``, ``--strict``."""
    positional, options = [], {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        key, _, value = arg.partition("=")
        if key in ("--size", "--max-side") and not value:
            if not args:
                raise UserError(f"{key} needs a value; usage: {usage}")
            value = args.pop(0)
        if key == "--size":
            options["size"] = _size_argument(value)
        elif key == "--max-side":
            if not value.isdigit():
                raise UserError(f"--max-side {value!r}: expected a whole number of pixels (0 = no bound)")
            options["max_side"] = int(value) or None
        elif arg == "--strict":
            options["resize"] = False
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg!r}; usage: {usage}")
        else:
            positional.append(arg)
    return positional, SheetOptions(**options)


def main(argv: list[str] | None = None) -> int:
    """``pairs-to-videos SHEET OUT_DIR [IMAGE_ROOT] [options]``."""
    install_error_handler()
    positional, options = parse_size_options(sys.argv[1:] if argv is None else argv)
    if len(positional) not in (2, 3):
        raise UserError(f"usage: {SHEET_USAGE}")
    written = pairs_sheet_to_videos(positional[0], positional[1], positional[2] if len(positional) == 3 else None,
                                    options)
    print(f"{len(written)} videos in {positional[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
