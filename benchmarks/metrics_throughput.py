"""Metrics throughput: seconds per metric family on generated caption pairs, and the whole metric set against
one raw forward pass of the embedding encoder over the same unique texts (measured in the same run).

    python benchmarks/metrics_throughput.py                 # 3,000 pairs, 5 references each (the target's setting)
    python benchmarks/metrics_throughput.py SAMPLES=10000

The captions come from the sample-data caption generator (geochange/sample/data.py): five references per pair,
and a prediction that describes the pair's own changes in other words (60 %) or another pair's changes (40 %),
so texts repeat as much as in LEVIR-CC. Models load (and METEOR's Java starts) before any timing; those one-off
costs are printed apart. Each of ROUNDS metric sets runs between two raw passes and is compared with their mean (a
shared machine's other work slows some minutes more than others); the median round is the figure, and the fastest
set against the fastest pass is printed too. Prints figures only; nothing is written.
"""
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SAMPLES = 3_000             # caption pairs
TARGET = 1.3                # the whole metric set within this many raw encoder passes
SEED = 0                    # which predictions are drawn
DEVICE = "auto"             # embedding models: auto = CUDA when available
ROUNDS = 3                  # metric sets, each between two raw passes (raw, set, raw, set, ..., raw) and compared with
                            # their mean: other work on a shared machine slows some minutes; the median round is the
                            # figure (and every round is printed)

if __name__ == "__main__":
    import numpy as np
    import torch

    from geochange import metrics as M
    from geochange.overrides import load_settings
    from geochange.paths import minilm_dir
    from geochange.sample.data import caption, main_caption, reference_captions
    from geochange.sample.scenes import make_scene_pair
    from geochange.text_embeddings import length_sorted_batches, load_encoder, unique_texts

    cfg = load_settings(globals())

    # 1. the caption pairs
    rng = np.random.default_rng(cfg.SEED)
    refs, preds = [], []
    for i in range(cfg.SAMPLES):
        changes = make_scene_pair(i).changes
        refs.append(reference_captions(changes, main_caption(changes, rng)))
        told = make_scene_pair(int(rng.integers(cfg.SAMPLES))).changes if rng.random() < 0.4 else changes
        preds.append(caption(told, [int(rng.integers(5)) for _ in range(max(len(told), 1))]))
    texts, _ = unique_texts(preds, *refs)
    print(f"{cfg.SAMPLES} pairs, {sum(map(len, refs))} references; {len(texts)} unique texts "
          f"of {sum(map(len, refs)) + len(preds)}; torch threads {torch.get_num_threads()}")

    # 2. one-off costs: models load, METEOR's Java starts (a warm-up call on a few pairs)
    started = time.perf_counter()
    warm = M.compute_metrics_report(refs[:8], preds[:8], device=cfg.DEVICE)
    print(f"one-off: models loaded and METEOR started in {time.perf_counter() - started:.1f} s "
          f"(device {warm.device}; sbert {warm.models.get('sbert')}; coco tokenizer {warm.coco_tokenizer})")

    # 3. the raw encoder pass: the embedding model over the unique texts, length-sorted batches, nothing else
    encoder = load_encoder(str(minilm_dir()), warm.device)

    def raw_pass() -> tuple[float, float]:
        started = time.perf_counter()
        batches = length_sorted_batches(encoder, texts)
        tokenised = time.perf_counter() - started
        started = time.perf_counter()
        with torch.inference_mode():
            for _, inputs in batches:
                encoder.model(**inputs)
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, tokenised

    def load() -> str:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())

    def cpu_seconds() -> float:
        """CPU time of this process (every thread) and of its children: those that ended (the PTB tokenizer's Java)
        and those still running (METEOR's Java). Other work on a shared machine moves wall times a lot, CPU time
        little: on an otherwise idle machine whose cores the encoder keeps busy, the two ratios agree."""
        ended = resource.getrusage(resource.RUSAGE_CHILDREN)
        running = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it ended meanwhile
            if int(fields[1]) == os.getpid():  # ppid
                running += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return time.process_time() + ended.ru_utime + ended.ru_stime + running

    # 4. rounds of the whole metric set (as evaluations call it; its report holds the seconds per metric family), each
    #    between two raw passes (raw, set, raw, set, ..., raw): each set is compared with the mean of the passes just
    #    before and after it, which met the same background load as nearly as two runs can
    def timed_raw() -> tuple[float, float, float]:
        cpu = cpu_seconds()
        raw, tokenised = raw_pass()
        return raw, tokenised, cpu_seconds() - cpu

    passes = [timed_raw()]
    wholes, reports, ratios, cpu_ratios = [], [], [], []
    for round_ in range(cfg.ROUNDS):
        cpu = cpu_seconds()
        started = time.perf_counter()
        report = M.compute_metrics_report(refs, preds, device=cfg.DEVICE)
        whole = time.perf_counter() - started
        whole_cpu = cpu_seconds() - cpu
        assert not report.missing, report.missing
        passes.append(timed_raw())
        (before, _, before_cpu), (after, tokenised, after_cpu) = passes[-2], passes[-1]
        wholes.append(whole)
        reports.append(report)
        ratios.append(whole / ((before + after) / 2))
        cpu_ratios.append(whole_cpu / ((before_cpu + after_cpu) / 2))
        print(f"round {round_ + 1}: raw encoder pass {before:.1f} s, whole metric set {whole:.1f} s, raw encoder pass "
              f"{after:.1f} s (+ {tokenised:.1f} s tokenising): {ratios[-1]:.2f}x their mean; CPU "
              f"{before_cpu:.1f}, {whole_cpu:.1f} and {after_cpu:.1f} s = {cpu_ratios[-1]:.2f}x; load average {load()}",
              flush=True)

    fastest = reports[wholes.index(min(wholes))]
    width = max(map(len, fastest.seconds))
    print("the fastest metric set, per family (the lexical and Java metrics run beside the embedding pass):")
    for family, seconds in fastest.seconds.items():
        print(f"  {family:<{width}}  {seconds:7.1f} s")
    raw, whole = min(p[0] for p in passes), min(wholes)
    print(f"whole metric set: {statistics.median(ratios):.2f}x the raw encoder pass (median of {cfg.ROUNDS} rounds, each "
          f"against the passes around it; per round {min(ratios):.2f}x to {max(ratios):.2f}x; target <= "
          f"{cfg.TARGET:g}x); fastest set against fastest pass {whole / raw:.2f}x ({whole:.1f} s / {raw:.1f} s); "
          f"{cfg.SAMPLES / whole:.0f} pairs/s; load average {load()}")
    print(f"CPU time (this process's threads and its Java children): the whole metric set "
          f"{statistics.median(cpu_ratios):.2f}x the raw encoder pass (median of {cfg.ROUNDS} rounds)")
