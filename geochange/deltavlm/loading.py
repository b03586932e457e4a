"""Build DeltaVLM from its three sources and say exactly what came from where.

1. ``VISION_QFORMER_BASE`` (InstructBLIP-Vicuna-7B in transformers' layout): the frozen ViT
   (patch/class/position embeddings, blocks 0-36) and the model's shapes (its config.json);
2. ``CHECKPOINT`` (DeltaVLM's ``checkpoint_best.pth``, LAVIS layout): everything DeltaVLM
   trained, overlaid through the key map of ``checkpoint.py``;
3. ``LLM_MODEL`` (Vicuna-7B v1.5) and ``BERT_MODEL`` (bert-base-uncased's tokenizer).

A DeltaVLM key with no home, a trained parameter the checkpoint lacks, or a base
parameter nobody supplies stops the load with one line naming them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import load_adapter_verified
from ..errors import UserError
from ..paths import hub_offline, hub_unreachable, local_or_hub
from ..devices import compute_dtype, quantization_config
from .checkpoint import CsrmCheck, check_csrm_initialisation, convert_lavis_state, ours_to_lavis
from .model import CSRM, DeltaVLM, build_on_meta, own_parameter_shapes, trained_parameter_names

CHECKPOINT_FILE = "checkpoint_best.pth"
# The released model's two public parts (the scripts' VISION_QFORMER_BASE / LLM_MODEL defaults), named in messages.
INSTRUCTBLIP_7B_ID = "Salesforce/instructblip-vicuna-7b"
VICUNA_7B_ID = "lmsys/vicuna-7b-v1.5"
LLM_ADAPTER_DIR = "llm_lora"   # a LoRA adapter on the LLM, saved beside a checkpoint_best.pth by training
QFORMER_BOS = "[DEC]"          # LAVIS adds it to BERT's vocabulary: 30522 + 1 tokens
LLM_PAD = "[PAD]"              # the released code's pad token (id 32000 for Vicuna)
LLM_EOS = "</s>"               # ... and its BOS = EOS = UNK
MAX_LISTED = 8


def listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def _hub_file(repo: str, filename: str, what: str) -> Path:
    """One file of a Hub repo: from the local cache, or downloaded once the Hub has answered one short try."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception:  # not cached: the Hub decides below
        pass
    unreachable = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable()
    if unreachable:
        raise UserError(f"{what} {repo!r}: {filename} is not in the local Hugging Face cache and {unreachable}; "
                        f"download it first: huggingface-cli download {repo} {filename}")
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as exc:  # no such repo/file, gated, the network failed mid-way
        reason = str(exc).splitlines()[0][:200]
        raise UserError(f"{what} {repo!r}: cannot get {filename} ({type(exc).__name__}: {reason}); download it "
                        f"first: huggingface-cli download {repo} {filename}") from None


def _looks_like_repo(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not os.path.exists(spec)


def resolve_checkpoint(spec: str) -> Path:
    """A checkpoint file, a folder holding checkpoint_best.pth, or a Hub repo holding it."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / CHECKPOINT_FILE).is_file():
            return path / CHECKPOINT_FILE
        raise UserError(f"CHECKPOINT folder {path} has no {CHECKPOINT_FILE}")
    if _looks_like_repo(spec):
        return _hub_file(spec, CHECKPOINT_FILE, "CHECKPOINT")
    raise UserError(f"CHECKPOINT {spec!r} does not exist (a checkpoint_best.pth file, its folder, a Hugging Face "
                    "repo such as hlwu/DeltaVLM, or 'tiny')")


def load_lavis_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of a LAVIS checkpoint, tensors only (weights_only; memory-mapped)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # not a torch file, truncated, or holding pickled objects
        raise UserError(f"CHECKPOINT {path} cannot be read as a weights-only torch checkpoint: "
                        f"{str(exc).splitlines()[0][:200]}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"CHECKPOINT {path}: expected a dict whose 'model' entry is a state dict of tensors")
    return state


# --------------------------------------------------------------------------- the InstructBLIP base

def _base_file(base: str, filename: str) -> Path | None:
    folder = Path(base).expanduser()
    if folder.is_dir():
        return folder / filename if (folder / filename).is_file() else None
    if not _looks_like_repo(base):
        raise UserError(f"VISION_QFORMER_BASE {base!r} is neither a folder nor a Hugging Face repo id")
    try:
        return _hub_file(base, filename, "VISION_QFORMER_BASE")
    except UserError:
        return None


def base_configs(base: str):
    """(vision config, Q-Former config, number of query tokens) from the base's config.json."""
    from transformers import InstructBlipConfig

    config_file = _base_file(base, "config.json")
    if config_file is None:
        raise UserError(f"VISION_QFORMER_BASE {base!r}: no config.json (an InstructBLIP checkpoint in transformers' "
                        f"layout, e.g. {INSTRUCTBLIP_7B_ID}; download: huggingface-cli download {INSTRUCTBLIP_7B_ID})")
    try:
        config = InstructBlipConfig.from_pretrained(config_file.parent)
    except Exception as exc:
        raise UserError(f"VISION_QFORMER_BASE {base!r}: config.json is not an InstructBLIP config "
                        f"({str(exc).splitlines()[0][:200]})") from None
    return config.vision_config, config.qformer_config, config.num_query_tokens


def _base_weight_files(base: str, wanted: set[str]) -> list[Path]:
    """The base's weight files holding ``wanted`` (only those shards of a sharded checkpoint are fetched)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = _base_file(base, index_name)
        if index is not None:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items()
                             if key in wanted or key.removeprefix("model.") in wanted})
            files = [_base_file(base, shard) for shard in shards]
            if None in files:
                raise UserError(f"VISION_QFORMER_BASE {base!r}: a shard named in {index_name} is missing")
            return files
        found = _base_file(base, single)
        if found is not None:
            return [found]
    raise UserError(f"VISION_QFORMER_BASE {base!r}: no model.safetensors / pytorch_model.bin (or their index)")


def _our_name(key: str, wanted: set[str]) -> str:
    # Newer transformers layouts may prefix the InstructBLIP modules with "model.".
    return key.removeprefix("model.") if key.removeprefix("model.") in wanted else key


def read_base_tensors(base: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (our names = transformers' InstructBLIP names) from the base, and nothing else.

    Reads only those entries (safetensors are opened lazily), so the base's own 7B LLM is never loaded.
    """
    wanted = set(names)
    found: dict[str, torch.Tensor] = {}
    for path in _base_weight_files(base, wanted):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    name = _our_name(key, wanted)
                    if name in wanted and name not in found:
                        found[name] = handle.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for key, tensor in state.items():
                name = _our_name(key, wanted)
                if name in wanted and name not in found:
                    found[name] = tensor
    return found


# --------------------------------------------------------------------------- tokenizers and the LLM

@dataclass
class Tokenizers:
    qformer: object   # BERT WordPiece + [DEC]
    llm: object       # Vicuna's, with [PAD] and </s> as BOS/EOS/UNK


def load_qformer_tokenizer(bert_model: str, vocab_size: int):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(local_or_hub(bert_model), truncation_side="left")
    except Exception as exc:
        raise UserError(f"BERT_MODEL {bert_model!r}: cannot load its tokenizer ({str(exc).splitlines()[0][:200]}); "
                        "download: huggingface-cli download google-bert/bert-base-uncased") from None
    tokenizer.add_special_tokens({"bos_token": QFORMER_BOS})
    if len(tokenizer) > vocab_size:
        raise UserError(f"BERT_MODEL {bert_model!r}: {len(tokenizer)} tokens with [DEC] but the Q-Former has "
                        f"{vocab_size} embeddings (expected bert-base-uncased)")
    return tokenizer


def load_llm_tokenizer(llm_model: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(local_or_hub(llm_model))
    except Exception as exc:
        raise UserError(f"LLM_MODEL {llm_model!r}: cannot load its tokenizer ({str(exc).splitlines()[0][:200]}); "
                        f"download: huggingface-cli download {VICUNA_7B_ID}") from None
    # As the released code: [PAD] appended (id 32000 for Vicuna), </s> as BOS, EOS and UNK.
    tokenizer.add_special_tokens({"pad_token": LLM_PAD, "bos_token": LLM_EOS, "eos_token": LLM_EOS,
                                  "unk_token": LLM_EOS})
    tokenizer.padding_side = "left"
    return tokenizer


def frozen_llm_dtype(device: torch.device, bits: int | None, compute: torch.dtype | None = None) -> torch.dtype:
    """The frozen LLM's dtype: the training's ``compute`` dtype (PRECISION) where given, else the compute dtype of its
    GPU (bf16 where the GPU has it, as the training's autocast; fp16 weights under bf16 autocast carried fp16
    gradients across the vision->LLM boundary with no loss scaling, and autocast kept bf16 copies of all 7B weights,
    ~13 GB); fp16 for int8, whose matmuls take fp16; fp32 on a CPU (fp16 with a 4-bit LLM, as bitsandbytes' CPU
    kernels take it)."""
    if bits == 8:
        return torch.float16
    if bits == 4 and device.type != "cuda":
        return torch.float16
    if compute is not None:
        return compute
    return compute_dtype(device) if device.type == "cuda" else torch.float32


def load_llm(llm_model: str, device: torch.device, vocab: int, bits: int | None = None,
             compute: torch.dtype | None = None):
    """The frozen LLM: in the ``compute`` dtype (``frozen_llm_dtype``), or quantised to ``bits`` (8 or 4,
    bitsandbytes), loaded straight onto ``device`` (not first whole into host memory, once per process); its
    embeddings resized to ``vocab``."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": frozen_llm_dtype(device, bits, compute)}
    if bits or device.type == "cuda":
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else
                                str(device)}
    if bits:
        kwargs["quantization_config"] = quantization_config(bits)
    try:
        llm = AutoModelForCausalLM.from_pretrained(local_or_hub(llm_model), **kwargs)
    except Exception as exc:
        raise UserError(f"LLM_MODEL {llm_model!r}: cannot load ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); "
                        f"download: huggingface-cli download {VICUNA_7B_ID}") from None
    rows = llm.get_input_embeddings().weight.shape[0]
    if rows < vocab:  # the released code's [PAD] row (Vicuna: 32000 -> 32001); padding only, never attended
        llm.resize_token_embeddings(vocab, mean_resizing=False)
        with torch.no_grad():  # the mean of the others, the same on every load (transformers' default is a draw)
            for embedding in {id(m.weight): m.weight for m in (llm.get_input_embeddings(),
                                                               llm.get_output_embeddings())}.values():
                embedding[rows:] = embedding[:rows].mean(0, keepdim=True)
    if not bits:
        llm.to(device)
    llm.eval().requires_grad_(False)
    return llm


# --------------------------------------------------------------------------- assembling

@dataclass
class LoadReport:
    checkpoint: Path | None   # None: the InstructBLIP base with a fresh CSRM (training's start)
    from_checkpoint: int
    from_base: int
    ignored: dict[str, str] = field(default_factory=dict)
    csrm: CsrmCheck | None = None
    llm_adapter: Path | None = None

    def lines(self) -> list[str]:
        if self.checkpoint is None:
            lines = [f"InstructBLIP base: {self.from_base} tensors (ViT, ln_vision, Q-Former, queries, projection); "
                     f"a fresh CSRM ({self.from_checkpoint} tensors)"]
        else:
            lines = [f"DeltaVLM checkpoint {self.checkpoint}: {self.from_checkpoint} trained tensors loaded, "
                     f"{self.from_base} frozen tensors from the InstructBLIP base"]
        if self.llm_adapter is not None:
            lines.append(f"LLM LoRA adapter: {self.llm_adapter}")
        if self.ignored:
            lines.append(f"ignored (not used at inference): {listed(sorted(self.ignored))}")
        if self.csrm is not None:
            lines.append(self.csrm.summary())
        return lines


def assemble(model: DeltaVLM, lavis_state: dict[str, torch.Tensor], base: str, checkpoint: Path) -> LoadReport:
    """Fill a meta-device DeltaVLM: trained tensors from the LAVIS state, the rest from the base."""
    shapes = own_parameter_shapes(model)
    conversion = convert_lavis_state(lavis_state, shapes)
    problems = []
    if conversion.no_home:
        problems.append(f"{len(conversion.no_home)} checkpoint keys have no place in the model: "
                        f"{listed(conversion.no_home)}")
    if conversion.wrong_shape:
        problems.append(f"shapes differ: {listed(conversion.wrong_shape)}")
    if conversion.incomplete:
        problems.append(f"incomplete fused tensors: {listed(conversion.incomplete)}")
    parameters = dict(model.named_parameters())
    lacking = [f"{'+'.join(ours_to_lavis(name, parameters[name]))} (-> {name})"
               for name in trained_parameter_names(model) if name not in conversion.state]
    if lacking:
        problems.append(f"it lacks {len(lacking)} trained parameters: {listed(lacking)}")
    if problems:
        raise UserError(f"CHECKPOINT {checkpoint} does not fit DeltaVLM: " + "; ".join(problems))
    base_state = _base_state(base, [name for name in shapes if name not in conversion.state], shapes)
    _fill(model, {**base_state, **conversion.state})
    return LoadReport(checkpoint, len(conversion.state), len(base_state), conversion.ignored,
                      check_csrm_initialisation(model.csrm))


def _base_state(base: str, names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` from the base, every one present and of the model's shape."""
    base_state = read_base_tensors(base, names)
    uninitialised = [name for name in names if name not in base_state]
    wrong = [f"{n}: base {list(base_state[n].shape)} vs model {list(shapes[n])}"
             for n in base_state if tuple(base_state[n].shape) != shapes[n]]
    if uninitialised or wrong:
        detail = (f"{len(uninitialised)} parameters left uninitialised (in neither the checkpoint nor the base): "
                  f"{listed(uninitialised)}" if uninitialised else f"shapes differ: {listed(wrong)}")
        raise UserError(f"VISION_QFORMER_BASE {base!r}: {detail}")
    return base_state


def _fill(model: DeltaVLM, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (fp32) into the meta-device model; every own parameter must be real afterwards."""
    missing, unexpected = model.load_state_dict({n: t.float() for n, t in state.items()}, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith("language_model.")]
    if unexpected or still_meta:  # the callers' checks make this unreachable; kept as a guard
        raise UserError(f"internal: unexpected {listed(unexpected)}; uninitialised {listed(still_meta)}")


def assemble_from_base(model: DeltaVLM, base: str) -> LoadReport:
    """Fill a meta-device DeltaVLM from the InstructBLIP base alone (the paper's starting point for training):
    everything but the CSRM, which InstructBLIP lacks and which gets PyTorch's default initialisation."""
    shapes = own_parameter_shapes(model)
    base_state = _base_state(base, [name for name in shapes if not name.startswith("csrm.")], shapes)
    fresh = {f"csrm.{name}": tensor for name, tensor in CSRM(model.vision_width).state_dict().items()}
    _fill(model, {**base_state, **fresh})
    return LoadReport(None, len(fresh), len(base_state), csrm=check_csrm_initialisation(model.csrm))


def llm_adapter_beside(checkpoint: Path) -> Path | None:
    """The LLM LoRA adapter a training run saved beside its checkpoint_best.pth, if any."""
    folder = checkpoint.parent / LLM_ADAPTER_DIR
    return folder if folder.is_dir() else None


def load_deltavlm(checkpoint: str | None, *, base: str, llm_model: str, bert_model: str, device: torch.device,
                  load_in_8bit: bool = False, load_in_4bit: bool = False, use_csrm: bool = True,
                  compute: torch.dtype | None = None) -> tuple[DeltaVLM, Tokenizers, LoadReport]:
    """The model (eval mode, frozen), its two tokenizers and the load report; the frozen LLM in ``compute`` (the
    training's PRECISION; None: the device's compute dtype).

    ``checkpoint`` None: the InstructBLIP base with a fresh CSRM (where training starts). A LoRA adapter
    saved beside the checkpoint (``llm_lora/``) is put on the LLM.
    """
    from transformers import AutoConfig

    checkpoint_path = resolve_checkpoint(checkpoint) if checkpoint is not None else None
    lavis_state = load_lavis_state(checkpoint_path) if checkpoint_path is not None else None
    vision_config, qformer_config, num_query_tokens = base_configs(base)
    try:
        llm_hidden = AutoConfig.from_pretrained(local_or_hub(llm_model)).hidden_size
    except Exception as exc:
        raise UserError(f"LLM_MODEL {llm_model!r}: cannot read its config ({str(exc).splitlines()[0][:200]}); "
                        f"download: huggingface-cli download {VICUNA_7B_ID}") from None
    model = build_on_meta(vision_config, qformer_config, num_query_tokens, llm_hidden, use_csrm=use_csrm)
    report = (assemble(model, lavis_state, base, checkpoint_path) if checkpoint_path is not None
              else assemble_from_base(model, base))
    tokenizers = Tokenizers(load_qformer_tokenizer(bert_model, qformer_config.vocab_size),
                            load_llm_tokenizer(llm_model))
    model.to(device).eval().requires_grad_(False)
    bits = 8 if load_in_8bit else 4 if load_in_4bit else None
    model.language_model = load_llm(llm_model, device, len(tokenizers.llm), bits, compute)
    report.llm_adapter = llm_adapter_beside(checkpoint_path) if checkpoint_path is not None else None
    if report.llm_adapter is not None:
        model.language_model = load_adapter_verified(model.language_model, report.llm_adapter).eval()
    return model, tokenizers, report
