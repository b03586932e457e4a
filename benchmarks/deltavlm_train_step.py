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

if __name__ == "__main__":
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from geochange.deltavlm.benchmark import one_training_step
    from geochange.overrides import load_settings

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
