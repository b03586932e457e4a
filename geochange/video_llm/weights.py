"""A video fine-tuning run's weights: its (pruned) base, loading it back (adapter verified), merging, and the
fingerprint that ties results to the weights that produced them.

Shared by fine-tuning (which writes runs) and evaluation (which reads them), so neither imports the other.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..adapters import ADAPTER_WEIGHTS, load_adapter_verified
from ..errors import UserError
from ..fileio import file_sha256
from ..locks import build_folder_once, save_pretrained_here
from ..overrides import make_settings
from ..paths import CHECKPOINTS_DIR
from ..runs import read_run_file, write_run_file
from .families import get_family
from .modeling import load_model, load_processor, model_label, resolve_model_path
from .pruning import apply_pruning_masks, measure_sparsity, prune_model, pruning_masks

MERGED_DIR = "merged"
PRUNING_MARKER = "pruning.json"  # written last into a pruned base: what was pruned, and the sparsity measured
# Weight files up to this size are fingerprinted by content, larger ones by size and modification time.
_HASHED_WEIGHTS_MAX_BYTES = 256 << 20


def pruned_base(model_path: str, family: str, cfg) -> tuple[str, dict[str, float]]:
    """Prune the full-precision weights once and keep the result on disk.

    QLoRA quantises at load time, so pruning must come first and be saved; the
    same pruned base then serves training, evaluation and merging. Every process of a run may ask at once: the
    first (per filesystem) prunes, the others wait on its lock and read what it wrote.
    """
    label = model_label(cfg.MODEL_ID, family)
    vision = "-vision" if cfg.PRUNE_VISION else ""
    target = CHECKPOINTS_DIR / "pruned" / f"{label}_{cfg.PRUNE_METHOD}{cfg.PRUNE_AMOUNT:g}{vision}"

    def prune(staging: Path) -> None:
        model = load_model(model_path, family)
        sparsity = prune_model(model, get_family(family).parts, cfg.PRUNE_METHOD, cfg.PRUNE_AMOUNT,
                               include_vision=cfg.PRUNE_VISION)
        save_pretrained_here(model, staging)
        load_processor(model_path).save_pretrained(staging)
        (staging / PRUNING_MARKER).write_text(json.dumps({
            "source": model_path, "method": cfg.PRUNE_METHOD, "amount": cfg.PRUNE_AMOUNT,
            "include_vision": cfg.PRUNE_VISION, "sparsity": sparsity}, indent=2))

    build_folder_once(target, lambda folder: (folder / PRUNING_MARKER).is_file(), prune,
                      f"pruning {label}: {cfg.PRUNE_METHOD} {cfg.PRUNE_AMOUNT:.1%} of the full-precision weights "
                      f"-> {target}")
    return str(target), json.loads((target / PRUNING_MARKER).read_text())["sparsity"]


def run_base_path(cfg, family: str) -> str:
    """The weights a run's adapter was trained on: MODEL_ID, or its cached pruned copy."""
    base_path = resolve_model_path(cfg.MODEL_ID, family)
    if cfg.PRUNE:
        base_path, _ = pruned_base(base_path, family, cfg)
    return base_path


def load_run_model(run_dir: str | Path, family: str, *, load_in_4bit: bool = False,
                   device: torch.device | None = None):
    """A fine-tuned model from its run directory: full weights, or (pruned) base + verified adapter."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"MODEL_PATH {run_dir} is not a run directory (and not 'base')")
    record = read_run_file(run_dir) or {}
    if not (run_dir / ADAPTER_WEIGHTS).exists():
        if not (run_dir / "config.json").exists():
            raise UserError(f"{run_dir}: holds neither an adapter nor model weights")
        return load_model(str(run_dir), family, bits=4 if load_in_4bit else None, device=device)
    if record:
        base_path = run_base_path(make_settings(record["settings"]), family)
        bits = record.get("quant_bits") or (4 if load_in_4bit else None)
    else:  # an adapter from elsewhere (e.g. GeoLLaVA's releases): its config names the base
        base_path = json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        bits = 4 if load_in_4bit else None
    model = load_model(base_path, family, bits=bits, device=device)
    return load_adapter_verified(model, run_dir, get_family(family).adapter_renames)


def merge_and_save(run_dir: Path, family: str) -> Path:
    """Merged full-precision weights for deployment, in ``run_dir/merged``.

    A pruned run's adapter would revive the pruned weights (B·A is dense), so the
    base's pruning masks are applied again after merging; the sparsity measured on
    the merged weights goes into ``run.json`` as ``sparsity_after_merging``.
    """
    record = read_run_file(run_dir)
    settings = make_settings(record["settings"])
    base = load_model(run_base_path(settings, family), family)
    parts = get_family(family).parts
    masks = pruning_masks(base, parts, include_vision=settings.PRUNE_VISION) if settings.PRUNE else {}
    # QLoRA adapters are merged into the full-precision base, not the quantised one.
    merged = load_adapter_verified(base, run_dir, get_family(family).adapter_renames).merge_and_unload()
    if settings.PRUNE:
        apply_pruning_masks(merged, masks)
        record["sparsity_after_merging"] = measure_sparsity(merged, parts, settings.PRUNE_VISION)
        write_run_file(run_dir, record)
    target = run_dir / MERGED_DIR
    merged.save_pretrained(target)
    load_processor(str(run_dir)).save_pretrained(target)
    print(f"merged weights written to {target}")
    return target


def weights_fingerprint(model_path: str) -> str:
    """A short hash that changes whenever the weights in ``model_path`` change (a retrained or re-merged run).

    Covers the top-level weight and config files of a local folder: small ones (adapters,
    configs, the tiny models) by content, large ones by size and modification time. A
    Hub id that is not a local folder is fingerprinted by its name only.
    """
    folder = Path(model_path)
    digest = hashlib.sha256()
    if not folder.is_dir():
        digest.update(f"hub:{model_path}".encode())
        return digest.hexdigest()[:16]
    files = sorted(p for p in folder.iterdir() if p.is_file()
                   and (p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name == "config.json"))
    if not files:
        raise UserError(f"{folder}: holds no model or adapter weights")
    for path in files:
        stat = path.stat()
        content = file_sha256(path) if stat.st_size <= _HASHED_WEIGHTS_MAX_BYTES else f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{path.name}={content};".encode())
    return digest.hexdigest()[:16]
