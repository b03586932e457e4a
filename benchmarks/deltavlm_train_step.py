"""One DeltaVLM training step per setting: peak GPU memory and step time.

With CUDA: random weights at the real shapes (EVA ViT-g/14, the InstructBLIP Q-Former, Vicuna-7B's
LlamaForCausalLM; nothing downloaded), a random batch of BATCH_SIZE pairs, AdamW over what
deltavlm_finetune.py trains, bf16/fp16 autocast as the Trainer runs it. Without CUDA it runs the tiny
twin instead, and says that its figures are not GPU figures.

    python benchmarks/deltavlm_train_step.py            # every setting
    python benchmarks/deltavlm_train_step.py BATCH_SIZE=4
"""
BATCH_SIZE = 12             # the released per-GPU batch
PROMPT_TOKENS = 24          # prompt + answer lengths of a typical ChangeChat turn
ANSWER_TOKENS = 24
# (name, USE_CSRM, GRADIENT_CHECKPOINTING, LLM_LORA_R, LLM bits)
SETTINGS = [("paper (CSRM, Vicuna fp16)", True, False, 0, None),
            ("released forward (no CSRM)", False, False, 0, None),
            ("gradient checkpointing", True, True, 0, None),
            ("LoRA r=8 on Vicuna", True, False, 8, None),
            ("Vicuna 8-bit", True, False, 0, 8),
            ("Vicuna 4-bit nf4", True, False, 0, 4)]

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from geochange.deltavlm.inputs import IGNORE_INDEX  # noqa: E402
from geochange.deltavlm.loading import frozen_llm_dtype  # noqa: E402
from geochange.deltavlm.model import DeltaVLM, full_size_configs  # noqa: E402
from geochange.deltavlm.tiny import ensure_tiny_deltavlm  # noqa: E402
from geochange.deltavlm.training import Sources, adapt_llm, build_model, choose_trainable  # noqa: E402
from geochange.overrides import load_settings, make_settings  # noqa: E402

VICUNA_7B = {"vocab_size": 32001, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "pad_token_id": 32000, "bos_token_id": 2, "eos_token_id": 2}


def _quantise_linears(llm, bits: int) -> None:
    """Swap the decoder's Linear layers for bitsandbytes ones holding the same (random) weights, as
    from_pretrained(quantization_config=...) would (which needs saved weights)."""
    import bitsandbytes as bnb

    for layer in llm.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                data = child.weight.data.cpu()
                if bits == 8:
                    new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False,
                                              has_fp16_weights=False, threshold=6.0)
                    new.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
                else:
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                            compute_dtype=torch.bfloat16, quant_type="nf4")
                    new.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4")
                setattr(parent, name, new.cuda())
                del child
    torch.cuda.empty_cache()


def real_size_model(use_csrm: bool, bits: int | None) -> DeltaVLM:
    """DeltaVLM at InstructBLIP-Vicuna-7B's shapes on the GPU: the vision side fp32, Vicuna in the dtype training
    loads it in (``frozen_llm_dtype``: bf16 on bf16 GPUs) or quantised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda")
    with device:
        model = DeltaVLM(*full_size_configs(), use_csrm=use_csrm)
    default = torch.get_default_dtype()
    torch.set_default_dtype(frozen_llm_dtype(device, bits))
    try:
        with device:
            llm = LlamaForCausalLM(LlamaConfig(**VICUNA_7B))
    finally:
        torch.set_default_dtype(default)
    if bits:
        _quantise_linears(llm, bits)
    model.language_model = llm.eval().requires_grad_(False)
    return model


def random_batch(model: DeltaVLM, batch: int, prompt_tokens: int, answer_tokens: int, device) -> dict:
    size, vocab = model.image_size, model.language_model.config.vocab_size - 1
    length = prompt_tokens + answer_tokens
    labels = torch.randint(0, vocab, (batch, length), device=device)
    labels[:, :prompt_tokens] = IGNORE_INDEX
    return {"pixels_before": torch.randn(batch, 3, size, size, device=device),
            "pixels_after": torch.randn(batch, 3, size, size, device=device),
            "qformer_input_ids": torch.randint(0, 30000, (batch, prompt_tokens), device=device),
            "qformer_attention_mask": torch.ones(batch, prompt_tokens, dtype=torch.long, device=device),
            "input_ids": torch.randint(0, vocab, (batch, length), device=device),
            "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device), "labels": labels}


def one_training_step(cfg, *, use_csrm: bool, gradient_checkpointing: bool, lora_r: int, bits: int | None,
                      real_size: bool) -> dict:
    """Build, then time the second of two AdamW steps; peak memory over both (optimizer state included)."""
    settings = make_settings({"USE_CSRM": use_csrm, "GRADIENT_CHECKPOINTING": gradient_checkpointing,
                              "LLM_LORA_R": lora_r, "LLM_LORA_ALPHA": 2 * max(lora_r, 1),
                              "LOAD_LLM_IN_8BIT": bits == 8, "LOAD_LLM_IN_4BIT": bits == 4, "TRAIN_VIT_BLOCKS": 2,
                              "SEED": 0, "PRECISION": "auto"})
    if real_size:
        device = torch.device("cuda")
        model = real_size_model(use_csrm, bits)
        adapt_llm(model, settings)
    else:
        device = torch.device("cpu")
        tiny = ensure_tiny_deltavlm()
        model, _, _ = build_model(settings, Sources(None, str(tiny.base), str(tiny.llm), str(tiny.bert)), device)
    counts = choose_trainable(model, settings)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.05)
    batch = random_batch(model, cfg.BATCH_SIZE, cfg.PROMPT_TOKENS, cfg.ANSWER_TOKENS, device)
    dtype = torch.bfloat16 if real_size and torch.cuda.is_bf16_supported() else torch.float16
    if real_size:
        torch.cuda.reset_peak_memory_stats()
    seconds = 0.0
    for _ in range(2):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=real_size):
            loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if real_size:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    result = {"step_s": seconds, "loss": loss.item(), "trainable": sum(counts.values()),
              "llm_dtype": str(next(model.language_model.parameters()).dtype).removeprefix("torch."),
              "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if real_size else None}
    del model, optimizer, batch
    if real_size:
        torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    cfg = load_settings(globals())
    cuda = torch.cuda.is_available()
    print(f"{'GPU ' + torch.cuda.get_device_name() if cuda else 'no CUDA: the tiny twin on the CPU; these are NOT GPU figures'}"
          f", batch {cfg.BATCH_SIZE}")
    for name, use_csrm, checkpointing, lora_r, bits in cfg.SETTINGS:
        if bits and not cuda:
            print(f"{name:<32} skipped (bitsandbytes quantisation needs CUDA)")
            continue
        started = time.time()
        try:
            result = one_training_step(cfg, use_csrm=use_csrm, gradient_checkpointing=checkpointing,
                                       lora_r=lora_r, bits=bits, real_size=cuda)
        except torch.cuda.OutOfMemoryError:
            print(f"{name:<32} out of memory")
            torch.cuda.empty_cache()
            continue
        memory = f"peak {result['peak_gib']:.1f} GiB" if cuda else "peak (CPU, not measured)"
        print(f"{name:<32} step {result['step_s']:.2f} s  {memory}  trainable {result['trainable']:,}  "
              f"loss {result['loss']:.3f}  (built and run in {time.time() - started:.0f} s)")
