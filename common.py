"""geollava-suite's shared logic, in one place for every script.

The code lives in the ``geochange`` package (small modules); this file is its
face, so scripts write ``import common`` and ``common.run_finetune(...)``.

Command line:
    python common.py score FILE...        # rescore results files (ours or GeoLLaVA's)
    python common.py sample-data          # regenerate the bundled sample data
    python common.py pairs-to-videos SHEET OUT_DIR [IMAGE_ROOT] [--size WxH] [--max-side N] [--strict]
                                          # fMoW image pairs (GeoLLaVA's pairs sheet) -> 2-frame videos
    python common.py changechat-to-videos ANNOTATIONS IMAGE_ROOT OUT_DIR [--split NAME] [--size WxH] [--max-side N]
                                          # LEVIR-CC / ChangeChat -> 2-frame videos + GeoLLaVA JSON (all references)
    python common.py videos-to-pairs ANNOTATIONS VIDEO_DIR OUT_DIR [--split NAME]
                                          # GeoLLaVA videos + JSON -> A/, B/ images + ChangeChat JSON (DeltaVLM)
"""
from __future__ import annotations

import sys

from geochange.adapters import load_adapter_verified
from geochange.annotations import Sample, load_annotations, load_changechat
from geochange.convert import changechat_to_videos, changechat_to_videos_main, videos_to_pairs, videos_to_pairs_main
from geochange.errors import UserError, install_error_handler
from geochange.evaluation import evaluate, generate_answers, run_evaluation
from geochange.finetune import run_finetune
from geochange.runs import load_run_model, merge_and_save
from geochange.metrics import compute_metrics, compute_metrics_report
from geochange.modeling import FAMILIES, load_model, load_processor, resolve_model_path, video_prompt
from geochange.overrides import apply_overrides, settings_of
from geochange.pruning import measure_sparsity, prune_model
from geochange.results import ResultsWriter, read_results_file, score_files, write_metrics
from geochange.sample_data import ensure_sample_media
from geochange.tiny import ensure_tiny_checkpoint
from geochange.video import main as pairs_sheet_main
from geochange.video import pair_to_video, pairs_sheet_to_videos, read_image_pair, read_video_frames, write_video

__all__ = [
    "FAMILIES", "ResultsWriter", "Sample", "UserError", "apply_overrides", "changechat_to_videos", "compute_metrics",
    "compute_metrics_report", "videos_to_pairs",
    "ensure_sample_media", "ensure_tiny_checkpoint", "evaluate", "generate_answers", "load_adapter_verified",
    "load_annotations", "load_changechat", "load_model", "load_processor", "load_run_model", "measure_sparsity",
    "merge_and_save", "pair_to_video", "pairs_sheet_to_videos", "prune_model", "read_image_pair",
    "read_results_file", "read_video_frames", "resolve_model_path", "run_evaluation", "run_finetune", "score_files", "settings_of",
    "video_prompt", "write_metrics", "write_video",
]

USAGE = __doc__.split("Command line:")[1]


def main(argv: list[str]) -> int:
    install_error_handler()
    if not argv:
        print("usage:" + USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "score":
        from geochange.results import main as score_main

        return score_main(rest)
    if command == "sample-data":
        from geochange.sample_data import main as sample_main

        return sample_main(rest)
    if command == "pairs-to-videos":
        return pairs_sheet_main(rest)
    if command == "changechat-to-videos":
        return changechat_to_videos_main(rest)
    if command == "videos-to-pairs":
        return videos_to_pairs_main(rest)
    raise UserError(f"unknown command {command!r}; usage:{USAGE}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
