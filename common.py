"""geollava-suite's command line for the data and scoring tools (the scripts import their own recipes, not this).

Command line:
    python common.py score FILE... [--pred KEY] [--refs KEY[,KEY...]] [--id KEY]
                                          # rescore results files: ours, GeoLLaVA's or any tool's (JSON, JSONL, CSV)
    python common.py sample-data          # regenerate the bundled sample data
    python common.py pairs-to-videos SHEET OUT_DIR [IMAGE_ROOT] [--size WxH] [--max-side N] [--strict]
                                          # fMoW image pairs (GeoLLaVA's pairs sheet) -> 2-frame videos
    python common.py changechat-to-videos ANNOTATIONS IMAGE_ROOT OUT_DIR [--split NAME] [--size WxH] [--max-side N]
                                          # LEVIR-CC / ChangeChat -> 2-frame videos + GeoLLaVA JSON (all references)
    python common.py videos-to-pairs ANNOTATIONS VIDEO_DIR OUT_DIR [--split NAME]
                                          # GeoLLaVA videos + JSON -> A/, B/ images + ChangeChat JSON (DeltaVLM)
    python common.py memory-table         # estimated GB per device, each 7B model x each training mode
"""
from __future__ import annotations

import sys

from geochange.convert import changechat_to_videos_main, pairs_to_videos_main, videos_to_pairs_main
from geochange.errors import UserError
from geochange.process import prepare_process
from geochange.results import main as score_main
from geochange.sample.data import main as sample_data_main
from geochange.video_llm.memory import memory_table_main

USAGE = __doc__.split("Command line:")[1]
COMMANDS = {"score": score_main, "sample-data": sample_data_main, "pairs-to-videos": pairs_to_videos_main,
            "changechat-to-videos": changechat_to_videos_main, "videos-to-pairs": videos_to_pairs_main,
            "memory-table": memory_table_main}


def main(argv: list[str]) -> int:
    prepare_process()
    if not argv:
        print("usage:" + USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r}; usage:{USAGE}")
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
