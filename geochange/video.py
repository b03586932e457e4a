"""Before/after pairs as 2-frame H.264 videos (the GeoLLaVA input format), reading them back, and images."""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from .errors import UserError, first_line
from .fileio import atomic_path

# Near-lossless: decoded frames stay within a few grey levels of the input (yuv420p chroma aside).
H264_CRF = 12


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


def clip_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a clip's frames, from its container's header: no frame is decoded."""
    import av

    path = Path(path)
    if not path.is_file():
        raise UserError(f"video {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream")
            stream = container.streams.video[0].codec_context
            return stream.width, stream.height
    except UserError:
        raise
    except Exception as exc:  # PyAV's FFmpegError subclasses: not a video, cut short, unknown codec
        raise UserError(f"cannot decode video {path}: {getattr(exc, 'strerror', None) or exc}") from None


def probe_clip(path: str | Path, num_frames: int) -> str | None:
    """Why a clip cannot give ``num_frames`` frames, or None: the container is opened once, its frames counted and
    the first one decoded (milliseconds), so that a bad clip is found before any model loads, not hours into
    training. Results are kept per file version (path, size, modification time)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    return _probe(str(path), stat.st_size, stat.st_mtime_ns, num_frames)


@lru_cache(maxsize=65536)
def _probe(path: str, size: int, mtime_ns: int, num_frames: int) -> str | None:
    total = None
    try:
        import decord

        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        if total:
            reader.get_batch([0])
    except Exception:  # decord missing, or failing on this file: PyAV decides
        total = None
    if total is None:
        import av

        try:
            with av.open(path) as container:
                if not container.streams.video:
                    return "has no video stream"
                total = container.streams.video[0].frames
                if next(container.decode(video=0), None) is None:
                    return "has no decodable frame"
            total = total or _count_frames(Path(path))
        except Exception as exc:  # PyAV's FFmpegError subclasses: not a video, cut short, unknown codec
            reason = getattr(exc, "strerror", None) or first_line(exc, 120)
            return f"is not a readable video ({reason})"
    if total < num_frames:
        why = " (a before/after pair needs 2)" if total < 2 else ""
        return f"has {total} frame(s), {num_frames} needed{why}"
    return None


# --------------------------------------------------------------------------- images

def _open_image(path: Path) -> Image.Image:
    """The image, its header read and its pixels not yet decoded (PIL decodes lazily). (Past PIL's own limit, 89
    megapixels, PIL warns once; not silenced here: ``warnings.catch_warnings`` is not safe in a threaded server.)"""
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        return Image.open(path)
    except Image.DecompressionBombError:  # past twice PIL's own limit: not opened at all
        raise UserError(f"{path} has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: too large to "
                        f"open") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path} is not a readable image: {exc}") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header alone: nothing is decoded."""
    with _open_image(Path(path)) as image:
        return image.size


def read_image(path: str | Path, shortest_side: int | None = None) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array; with ``shortest_side``, brought down while it is decoded so that
    its shorter side is that long (never enlarged; a JPEG is decoded at a reduced scale straight away)."""
    path = Path(path)
    try:
        with _open_image(path) as image:
            size = shrunk_size(*image.size, shortest_side)
            if size == image.size:
                return np.array(image.convert("RGB"))
            image.draft("RGB", size)
            return np.array(image.convert("RGB").resize(size, Image.LANCZOS, reducing_gap=3.0))
    except OSError as exc:  # the header was readable, the pixels are not (cut short, corrupt)
        raise UserError(f"{path} is not a readable image: {exc}") from None


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``size`` = (width, height); Lanczos, the usual choice for shrinking photographs."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.array(Image.fromarray(image).resize(tuple(size), Image.LANCZOS))


def shrunk_size(width: int, height: int, shortest_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so that the shorter side is ``shortest_side`` (what a vision encoder's processor
    resizes to before its centre crop); never scaled up."""
    if not shortest_side or min(width, height) <= shortest_side:
        return width, height
    scale = shortest_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink_image(image: np.ndarray, shortest_side: int | None) -> np.ndarray:
    """An RGB array brought down so that its shorter side is ``shortest_side`` (never enlarged)."""
    return resize_image(image, shrunk_size(image.shape[1], image.shape[0], shortest_side))


def bounded_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so that the longer side is at most ``max_side``; never scaled up."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(2, round(width * scale)), max(2, round(height * scale))


def write_image(image: np.ndarray, path: str | Path) -> Path:
    """Save an RGB array as PNG (or the suffix's format), atomically like write_video."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image)).save(tmp, format=Image.registered_extensions().get(path.suffix.lower(),
                                                                                             "PNG"))
    return path


def crop_to_even(image: np.ndarray) -> np.ndarray:
    """Drop the last row / column where needed: H.264 in yuv420p needs even sizes."""
    height, width = image.shape[:2]
    return image[: height - height % 2, : width - width % 2]
