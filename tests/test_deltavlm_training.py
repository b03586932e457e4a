"""deltavlm_finetune.py on the tiny twin: what trains, the loss, validation, the released-layout checkpoint the
predictor loads, resume, and settings that stop before any model is loaded (DDP and DeepSpeed: test_scaleout.py)."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from conftest import run_script

from geochange.annotations import ChangeChatSample
from geochange.deltavlm import training as t
from geochange.deltavlm.checkpoint import ours_to_lavis, released_extras
from geochange.deltavlm.inputs import IGNORE_INDEX, Prompting, encode_prompts, encode_training_batch
from geochange.deltavlm.model import build_on_meta, full_size_configs, trained_parameter_names
from geochange.deltavlm.predictor import Predictor, items_of
from geochange.errors import UserError
from geochange.overrides import load_settings, make_settings, settings_of

REPO = Path(__file__).resolve().parent.parent
# Its module fixtures (tiny trainings) are made once: every test of this file on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("deltavlm_training")
SCRIPT = REPO / "deltavlm_finetune.py"
RELEASED_KEYS = Path(__file__).parent / "data" / "deltavlm_released_keys.json"
CAPTIONS = REPO / "annotations" / "sample_changechat_captions.json"
# Small and quick: 64 training answers (16 pairs x 4 tasks), 12 validation captions, greedy and short.
QUICK = ["INIT=tiny", "TRAIN_LIMIT=64", "VAL_LIMIT=12", "BATCH_SIZE=8", "VAL_NUM_BEAMS=1", "VAL_MAX_NEW_TOKENS=12",
         "NUM_WORKERS=0", "LOGGING_STEPS=1", "SAVE_STEPS=4", "VAL_BATCH_SIZE=12"]


def settings(tmp: Path, *overrides: str):
    scope = runpy.run_path(str(SCRIPT))  # the script's constants (its __main__ does not run)
    return t.resolve_recipe(load_settings(scope, [*QUICK, f"OUTPUT_DIR={tmp}", *overrides], quiet=True))


def train_in_process(cfg, callbacks=()):
    """The script's steps 1-9, keeping the model; returns (run_dir, weights before, model, record)."""
    sources = t.check_settings(cfg)
    examples, val_items = t.load_data(cfg)
    with t.open_run_dir(cfg) as run_dir:  # released even when the run is interrupted, as the OS does for a killed one
        model, tokenizers, report = t.build_model(cfg, sources, torch.device("cpu"))
        counts = t.choose_trainable(model, cfg)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        record = t.start_record(cfg, sources, run_dir, counts, examples, val_items, report)
        trainer = t.make_trainer(cfg, model, tokenizers, examples, val_items, run_dir, sources,
                                 callbacks=list(callbacks))
        resumed_from = t.train(trainer, run_dir)
        record = t.finish(trainer, record, run_dir, 0.0, resumed_from)
    return run_dir, before, model, record


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread, sample_dir):
    """The paper's setting on the tiny twin (CSRM in the forward, Vicuna frozen): 2 epochs of 4 steps on the
    instruction answers of 8 sample pairs, validated on 8 captions."""
    return train_in_process(settings(tmp_path_factory.mktemp("runs"), "EPOCHS=2", "TRAIN_LIMIT=32", "VAL_LIMIT=8",
                                     "VAL_BATCH_SIZE=8"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, one_thread, sample_dir):
    """LoRA on the LLM, the CSRM out of the forward: 5 epochs of 8 steps on the captions of 12 sample pairs
    (5 references each), validated on the same 12 pairs, the best checkpoint by CIDEr. The tiny twin's LLM is
    random, so it can only say caption words once it has learnt them (a pretrained Vicuna knows them)."""
    return train_in_process(settings(tmp_path_factory.mktemp("runs"), "EPOCHS=5", "LR=3e-2", "USE_CSRM=False",
                                     "LLM_LORA_R=16", "LLM_LORA_ALPHA=32", "TRAIN_LIMIT=12",
                                     f"TRAIN_ANNOTATIONS={CAPTIONS}", "BEST_METRIC=cider"))


def changed(before: dict, model, prefix: str) -> dict[str, bool]:
    now = dict(model.named_parameters())
    return {n: not torch.equal(before[n], now[n].detach()) for n in before if n.startswith(prefix)}


# --------------------------------------------------------------------------- the layout and the labels

def test_training_prompts_are_the_predictors_and_every_answer_turn_trains(tmp_path):
    sample = ChangeChatSample("x", tmp_path / "a.png", tmp_path / "b.png", 1,
                              [("Has anything changed?", "Yes."), ("How many roads?", "Two new roads!")])
    prompting = Prompting(training_format=True)
    examples = t.training_examples(items_of([sample]), prompting)
    predictor = Predictor(None, None, torch.device("cpu"), t.Decoding(), prompting)
    assert [e.prompt for e in examples] == [predictor.prompt("Has anything changed?"),
                                            predictor.prompt("How many roads?", [("Has anything changed?", "Yes.")])]
    assert examples[1].prompt == "q has anything changed? a yes q how many roads?"
    assert [e.answer for e in examples] == ["yes", "two new roads"]


def test_labels_cover_the_answer_and_eos_only(trained):
    from geochange.deltavlm.loading import load_llm_tokenizer, load_qformer_tokenizer, Tokenizers

    sources = json.loads((trained[0] / "run.json").read_text())["sources"]
    tokenizers = Tokenizers(load_qformer_tokenizer(sources["bert"], 30523), load_llm_tokenizer(sources["llm"]))
    prompts, answers = ["q what changed", "q has it changed at all"], ["a new road", "no"]
    batch = encode_training_batch(prompts, answers, tokenizers)
    served = encode_prompts(prompts, tokenizers)
    llm = tokenizers.llm
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        prompt_ids = [x for x, m in zip(served["input_ids"][i].tolist(), served["attention_mask"][i].tolist()) if m]
        answer_ids = llm(answer, add_special_tokens=False)["input_ids"] + [llm.eos_token_id]
        length = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :length].tolist() == prompt_ids + answer_ids  # generation's prompt, then answer
        assert batch["labels"][i, :length].tolist() == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        assert (batch["labels"][i, length:] == IGNORE_INDEX).all()
    assert torch.equal(batch["qformer_input_ids"], served["qformer_input_ids"])


def test_best_metric_scores():
    metrics = {"bleu4": 0.4, "meteor": 0.3, "rouge_l": 0.6, "cider": 1.3, "bleu1": 0.9}
    assert t.caption_score(metrics, "bleu4") == 0.4 and t.caption_score(metrics, "cider") == 1.3
    assert t.caption_score(metrics, "sm") == pytest.approx((0.4 + 0.3 + 0.6 + 1.3) / 4)


# --------------------------------------------------------------------------- one trained run

def test_loss_falls_and_validation_runs_each_epoch(trained):
    run_dir, _, _, record = trained
    losses = [point["loss"] for point in record["loss_curve"]]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert [v["epoch"] for v in record["validation_curve"]] == [1, 2]
    for epoch in (1, 2):
        results = (run_dir / "validation" / f"epoch{epoch:03d}.jsonl").read_text().splitlines()
        assert len(results) == 8 and all(json.loads(line)["task"] == "caption" for line in results)
        metrics = json.loads((run_dir / "validation" / f"epoch{epoch:03d}.metrics.json").read_text())
        assert metrics["score"] == pytest.approx(metrics["metrics"]["bleu4"])
    best = max(record["validation_curve"], key=lambda v: v["score"])
    assert json.loads((run_dir / "run.json").read_text())["best_epoch"] == best["epoch"]
    assert torch.load(run_dir / "checkpoint_best.pth", weights_only=True)["epoch"] == best["epoch"]
    assert record["trainable_parameters"]["csrm"] == sum(p.numel() for n, p in trained[2].named_parameters()
                                                         if n.startswith("csrm."))
    assert list((run_dir / "tensorboard").iterdir())


def test_only_the_intended_parameters_change(trained):
    _, before, model, _ = trained
    depth = model.vision_model.config.num_hidden_layers  # 3: block 0 frozen, blocks 1-2 trained
    frozen = {**changed(before, model, "vision_model.embeddings."), **changed(before, model, "language_model."),
              **changed(before, model, "vision_model.encoder.layers.0.")}
    assert frozen and not any(frozen.values())
    for prefix in (f"vision_model.encoder.layers.{depth - 1}.", "vision_model.post_layernorm.", "qformer.encoder.",
                   "query_tokens", "language_projection.", "csrm."):
        assert any(changed(before, model, prefix).values()), prefix
    # EVA's qkv has no key bias: the key third of the fused bias stays exactly zero.
    bias = model.vision_model.encoder.layers[depth - 1].self_attn.qkv.bias.detach()
    width = bias.shape[0] // 3
    assert not bias[width:2 * width].any() and bias[:width].any()


def test_checkpoint_has_the_released_key_set_and_the_trained_values(trained):
    from geochange.deltavlm.tiny import ensure_tiny_deltavlm

    run_dir, _, model, _ = trained
    saved = torch.load(run_dir / "checkpoint_best.pth", weights_only=True)["model"]
    released = torch.load(ensure_tiny_deltavlm().checkpoint, weights_only=True)["model"]
    assert set(saved) == set(released)
    assert {k: tuple(v.shape) for k, v in saved.items() if not k.endswith("_proj.weight") and
            not k.endswith("_proj.bias")} == {k: tuple(v.shape) for k, v in released.items()
                                              if not k.endswith("_proj.weight") and not k.endswith("_proj.bias")}
    if json.loads((run_dir / "run.json").read_text())["best_epoch"] == 2:  # the last epoch: the model as it is now
        assert torch.equal(saved["llm_proj.weight"], model.language_projection.weight.detach())
        assert torch.equal(saved["context3.weight"], model.csrm.context3.weight.detach())


def test_full_size_checkpoint_keys_are_the_released_ones():
    from transformers import LlamaConfig

    released = json.loads(RELEASED_KEYS.read_text())["keys"]
    model = build_on_meta()
    parameters = dict(model.named_parameters())
    keys = {k: list(v.shape) for name in trained_parameter_names(model) for k, v in
            ours_to_lavis(name, parameters[name]).items()}
    vicuna = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32)
    keys |= {k: list(v.shape) for k, v in released_extras(full_size_configs()[1], vicuna).items()}
    assert keys == released


@pytest.mark.slow
def test_the_predictor_answers_from_the_checkpoint_and_beats_the_untrained_twin(lora_run, one_thread):
    from geochange.deltavlm import run
    from geochange.deltavlm.predictor import answer_batch
    from geochange.deltavlm.scoring import score_records

    run_dir, _, _, record = lora_run
    _, val_items = t.load_data(settings(run_dir.parent))
    scope = runpy.run_path(str(REPO / "deltavlm_predict.py"))
    cider = {}
    for name, checkpoint in (("trained", str(run_dir / "checkpoint_best.pth")), ("untrained", "tiny")):
        s = dict(scope, CHECKPOINT=checkpoint, NUM_BEAMS=1, MAX_NEW_TOKENS=12, DEVICE="cpu",
                 TRAINING_TURN_FORMAT=True, USE_CSRM=name == "untrained")
        records = answer_batch(run.load_predictor(make_settings(settings_of(s))), val_items)
        assert all(r["generated"] for r in records)
        cider[name] = score_records(records)["caption"].metrics["cider"]
    print(f"validation CIDEr: trained {cider['trained']:.4f}, untrained {cider['untrained']:.4f}")
    assert cider["trained"] == pytest.approx(record["best_score"])  # the predictor reproduces the validation
    assert cider["trained"] > cider["untrained"] + 0.02


# --------------------------------------------------------------------------- CSRM off, LoRA on

@pytest.mark.slow
def test_csrm_trains_only_when_in_the_forward(trained, lora_run):
    assert all(changed(trained[1], trained[2], "csrm.").values())
    _, before, model, record = lora_run
    assert not any(changed(before, model, "csrm.").values()) and "csrm" not in record["trainable_parameters"]


@pytest.mark.slow
def test_lora_trains_beside_a_frozen_vicuna_and_the_predictor_loads_it(lora_run):
    from geochange.deltavlm import run

    run_dir, before, model, record = lora_run
    llm = changed(before, model, "language_model.")
    assert any(v for n, v in llm.items() if "lora_" in n)
    assert not any(v for n, v in llm.items() if "lora_" not in n)
    assert record["trainable_parameters"]["llm_lora"] > 0
    assert (run_dir / "llm_lora" / "adapter_model.safetensors").is_file()
    scope = runpy.run_path(str(REPO / "deltavlm_predict.py"))
    predictor = run.load_predictor(make_settings(settings_of(dict(scope, CHECKPOINT=str(run_dir / "checkpoint_best.pth"),
                                                                  NUM_BEAMS=1, MAX_NEW_TOKENS=4, DEVICE="cpu",
                                                                  USE_CSRM=False))))
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "llm_lora" / "adapter_model.safetensors"))  # the best epoch's adapter
    lora = {n.replace(".default", ""): p for n, p in predictor.model.language_model.named_parameters() if "lora_" in n}
    assert lora.keys() == saved.keys() and all(torch.equal(p, saved[n]) for n, p in lora.items())
    assert any(saved[n].any() for n in saved if "lora_B" in n)  # lora_B starts at zero: it trained


# --------------------------------------------------------------------------- resume, mixed settings

@pytest.mark.slow
def test_an_interrupted_run_resumes_and_other_settings_are_refused(tmp_path, one_thread, sample_dir):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    cfg = settings(tmp_path, "EPOCHS=1", "VAL_LIMIT=2")
    with pytest.raises(KeyboardInterrupt):
        train_in_process(cfg, [Crash()])
    assert (t.run_dir_of(cfg) / "checkpoint-4").is_dir()
    with pytest.raises(UserError, match=r"other settings \(LR\)"):
        t.prepare_run_dir(settings(tmp_path, "EPOCHS=1", "VAL_LIMIT=2", "LR=0.5", f"RUN_NAME={t.run_dir_of(cfg).name}"))
    _, holder = t.prepare_run_dir(cfg)  # a second writer of the same run stops in one line
    with holder, pytest.raises(UserError, match="is being written by another process"):
        t.prepare_run_dir(cfg)
    _, _, resumed, record = train_in_process(cfg)
    assert record["resumed_from"].endswith("checkpoint-4") and record["global_step"] == 8
    assert [point["step"] for point in record["loss_curve"]] == list(range(1, 9))  # the log went on, too
    with pytest.raises(UserError, match="finished run"):
        t.prepare_run_dir(cfg)
    # The same run without the interruption ends with the same weights: the resume restored them (and the
    # optimiser, the schedule, the data order and the random state) from checkpoint-4.
    _, _, uninterrupted, _ = train_in_process(settings(tmp_path, "EPOCHS=1", "VAL_LIMIT=2", "RUN_NAME=whole"))
    theirs = dict(uninterrupted.named_parameters())
    for name, parameter in resumed.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, theirs[name], rtol=1e-4, atol=1e-6)


def test_a_later_rank_meets_the_checkpoint_barrier_even_when_rank_0_has_begun_the_run(tmp_path, monkeypatch):
    """Under torchrun, rank 1 may look at the run directory after rank 0 has written run.json: it must still take
    the same path as rank 0 through ``train``, or one waits at a barrier the other never reaches."""
    from contextlib import contextmanager

    from geochange.runs import write_run_file

    cfg = settings(tmp_path, "EPOCHS=1")
    run_dir, lock = t.prepare_run_dir(cfg)  # rank 0: a new run; it starts writing
    write_run_file(run_dir, {"completed": False, "settings": cfg.as_dict()})
    monkeypatch.setenv("RANK", "1")
    assert t.prepare_run_dir(cfg) == (run_dir, None)  # rank 1, later: no lock, no error, nothing removed
    assert (run_dir / "run.json").is_file()
    lock.release()

    entered, resumed = [], []

    class Args:
        process_index = 1

        @contextmanager
        def main_process_first(self, desc: str, local: bool = True):
            entered.append((desc, local))
            yield

    class Trainer:
        args = Args()

        def train(self, resume_from_checkpoint=None):
            resumed.append(resume_from_checkpoint)

    assert t.train(Trainer(), run_dir) is None
    # every rank at the barrier, behind rank 0 (not each node's first process); nothing to resume yet
    assert entered == [("checkpoints", False)] and resumed == [None]


# --------------------------------------------------------------------------- bad settings: one line, no model

@pytest.mark.parametrize("overrides, message", [
    (["BEST_METRIC=rouge"], "BEST_METRIC='rouge' is not one of bleu4, cider, sm"),
    (["TRAIN_VIT_BLOCKS=4"], "TRAIN_VIT_BLOCKS=4 but the ViT of"),
    (["LOAD_LLM_IN_8BIT=True", "LOAD_LLM_IN_4BIT=True"], "both True"),
    (["TRAIN_ANNOTATIONS={missing_image}"], "missing.png"),
    (["VAL_ANNOTATIONS={levir}"], "no entry of split 'val' (the file holds: train 1)"),
])
def test_bad_settings_stop_in_one_line_before_any_model(tmp_path, sample_dir, overrides, message, user_error,
                                                       monkeypatch):
    record = {"id": "r1", "image": ["A/missing.png", "B/missing.png"],
              "conversations": [{"from": "human", "value": "what changed?"}, {"from": "gpt", "value": "a road"}]}
    missing_image = tmp_path / "train.json"
    missing_image.write_text(json.dumps([record]))
    levir = tmp_path / "LevirCCcaptions.json"  # LEVIR-CC's own layout, with a train entry only
    levir.write_text(json.dumps({"images": [{"filepath": "train", "filename": "x.png", "split": "train",
                                             "sentences": [{"raw": "a road was built ."}]}]}))
    args = [a.format(missing_image=missing_image, levir=levir) for a in overrides]
    monkeypatch.setattr(t, "load_deltavlm", lambda *a, **k: pytest.fail("a model was loaded"))
    user_error(lambda: run_script("deltavlm_finetune.py", "INIT=tiny", f"OUTPUT_DIR={tmp_path / 'runs'}", *args),
               message)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- continuing from a DeltaVLM checkpoint

def test_training_continues_from_a_deltavlm_checkpoint(tmp_path, one_thread, sample_dir):
    from geochange.deltavlm.tiny import ensure_tiny_deltavlm

    tiny = ensure_tiny_deltavlm()
    cfg = settings(tmp_path, f"INIT={tiny.checkpoint}", f"VISION_QFORMER_BASE={tiny.base}", f"LLM_MODEL={tiny.llm}",
                   f"BERT_MODEL={tiny.bert}", "EPOCHS=1", "MAX_STEPS=1", "VAL_LIMIT=2", "LR=1e-3", "WARMUP_STEPS=0")
    run_dir, before, _, record = train_in_process(cfg)
    released = torch.load(tiny.checkpoint, weights_only=True)["model"]
    # It started from the checkpoint's trained weights (not the base's), and its unused heads were carried over.
    assert torch.equal(before["language_projection.weight"], released["llm_proj.weight"])
    saved = torch.load(run_dir / "checkpoint_best.pth", weights_only=True)["model"]
    assert all(torch.equal(saved[k], released[k]) for k in ("vision_proj.weight", "text_proj.bias", "temp"))
    assert not torch.equal(saved["llm_proj.weight"], released["llm_proj.weight"])  # one step moved it
    assert record["sources"]["init"] == str(tiny.checkpoint)


@pytest.mark.parametrize("quantised", ["LOAD_LLM_IN_8BIT=True", "LOAD_LLM_IN_4BIT=True"])
@pytest.mark.slow
def test_a_quantised_vicuna_trains_the_vision_side_and_lora(tmp_path, one_thread, sample_dir, quantised):
    """bitsandbytes on the CPU: the frozen LLM quantised, the gradient still reaches the queries (and LoRA)."""
    run_dir, before, model, record = train_in_process(settings(tmp_path, quantised, "LLM_LORA_R=4", "EPOCHS=1",
                                                               "MAX_STEPS=2", "TRAIN_LIMIT=4", "VAL_LIMIT=2"))
    assert record["global_step"] == 2 and all(point["loss"] > 0 for point in record["loss_curve"])
    assert any(changed(before, model, "language_projection.").values())
    assert any(v for n, v in changed(before, model, "language_model.").items() if "lora_" in n)
    assert (run_dir / "checkpoint_best.pth").is_file() and (run_dir / "llm_lora").is_dir()


def test_early_stop_and_the_best_checkpoint_follow_the_validation_score(tmp_path, one_thread, sample_dir,
                                                                       monkeypatch):
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])  # best at epoch 2; two epochs without improvement -> stop after 4

    def scripted(predictor, items, batch_size, run_dir, epoch, settings, best_metric, args):
        score = next(scores)
        return score, {"bleu4": score}

    monkeypatch.setattr(t, "validate", scripted)
    run_dir, _, _, record = train_in_process(settings(tmp_path, "EPOCHS=5", "EARLY_STOP_EPOCHS=2", "TRAIN_LIMIT=2",
                                                      "VAL_LIMIT=1"))
    assert [v["epoch"] for v in record["validation_curve"]] == [1, 2, 3, 4]
    assert record["best_epoch"] == 2 and record["best_score"] == 0.7
    checkpoint = torch.load(run_dir / "checkpoint_best.pth", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["scores"] == {"bleu4": 0.7}


@pytest.mark.slow
def test_a_torn_checkpoint_is_skipped_and_deltavlm_training_resumes_from_the_older_one(tmp_path, one_thread,
                                                                                       sample_dir, capsys):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                raise KeyboardInterrupt

    cfg = settings(tmp_path, "EPOCHS=2", "VAL_LIMIT=2", "TRAIN_LIMIT=32", "SAVE_STEPS=2", "SAVE_TOTAL_LIMIT=5")
    with pytest.raises(KeyboardInterrupt):
        train_in_process(cfg, [Crash()])
    run_dir = t.run_dir_of(cfg)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    weights = run_dir / "checkpoint-6" / t.TRAINABLE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    _, _, _, record = train_in_process(cfg)
    out = capsys.readouterr().out
    assert f"skipping checkpoint-6: {t.TRAINABLE_WEIGHTS} is cut short or damaged" in out
    assert (run_dir / "torn-checkpoint-6").is_dir() and record["resumed_from"].endswith("checkpoint-4")
    assert record["global_step"] == 8 and record["completed"]
