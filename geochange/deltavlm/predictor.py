"""Answering questions about before/after pairs: one pair, a chat, or a ChangeChat file with resume."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import changechat_format as cc
from ..errors import UserError
from ..results import ResultsWriter, check_run_settings
from ..sharding import Shard, answer_in_shards, decided_by_main
from ..video import read_image
from .inputs import Prompting, build_prompt, decode_answers, encode_prompts, preprocess_image


@dataclass(frozen=True)
class Decoding:
    """Generation settings; the defaults are DeltaVLM's evaluation (predict_answers -> generate)."""
    num_beams: int = 5
    max_new_tokens: int = 256
    min_new_tokens: int = 1
    repetition_penalty: float = 1.5
    length_penalty: float = 1.0

    def check(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise UserError(f"NUM_BEAMS and MAX_NEW_TOKENS must be >= 1 (got {self.num_beams}, {self.max_new_tokens})")
        if self.min_new_tokens > self.max_new_tokens:
            raise UserError(f"MIN_NEW_TOKENS={self.min_new_tokens} exceeds MAX_NEW_TOKENS={self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise UserError(f"REPETITION_PENALTY must be > 0, got {self.repetition_penalty}")


class Predictor:
    """A loaded DeltaVLM with its tokenizers: ``answer(pairs, prompts)``."""

    def __init__(self, model, tokenizers, device: torch.device, decoding: Decoding, prompting: Prompting,
                 synced_gpus: bool = False):
        decoding.check()
        self.model, self.tokenizers, self.device = model, tokenizers, device
        self.decoding, self.prompting = decoding, prompting
        # Under ZeRO-3 every process takes part in every forward pass: one that has finished its answers keeps
        # stepping until all have.
        self.synced_gpus = synced_gpus

    def prompt(self, question: str, history: list[tuple[str, str]] | tuple = ()) -> str:
        """The text both the Q-Former and the LLM read for ``question`` after ``history``."""
        return build_prompt(question, history, self.prompting)

    @torch.no_grad()
    def answer(self, pairs: list[tuple[np.ndarray, np.ndarray]], prompts: list[str], streamer=None) -> list[str]:
        """The answers to ``prompts`` about ``pairs``; ``streamer`` (transformers' streamer, greedy decoding only)
        receives the tokens as they come."""
        size = self.model.image_size
        before = torch.stack([preprocess_image(a, size) for a, _ in pairs]).to(self.device)
        after = torch.stack([preprocess_image(b, size) for _, b in pairs]).to(self.device)
        batch = {k: v.to(self.device) for k, v in encode_prompts(prompts, self.tokenizers).items()}
        llm = self.tokenizers.llm
        d = self.decoding
        with warnings.catch_warnings():
            # With inputs_embeds the penalty sees only new tokens: exactly the released (4.33) behaviour.
            warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds.*")
            output = self.model.generate(before, after, **batch, do_sample=False, num_beams=d.num_beams,
                                         max_new_tokens=d.max_new_tokens, min_new_tokens=d.min_new_tokens,
                                         repetition_penalty=d.repetition_penalty, length_penalty=d.length_penalty,
                                         bos_token_id=llm.bos_token_id, eos_token_id=llm.eos_token_id,
                                         pad_token_id=llm.pad_token_id, streamer=streamer,
                                         synced_gpus=self.synced_gpus)
        return decode_answers(output, llm)


def read_pair(image_a: str | Path, image_b: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Both images as RGB arrays (any sizes: each is resized to the ViT's size)."""
    return read_image(image_a), read_image(image_b)


def chat(predictor: Predictor, pair: tuple[np.ndarray, np.ndarray], *, read: Callable[[str], str] = input,
         write: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Multi-turn chat about one pair: each question sees the earlier turns. Empty line / 'quit' ends,
    'reset' forgets the history. Returns the turns."""
    history: list[tuple[str, str]] = []
    write("chat about this pair: ask a question; 'reset' forgets the history, an empty line or 'quit' ends")
    while True:
        try:
            question = read("you> ").strip()
        except EOFError:
            break
        if question.lower() in ("", "quit", "exit"):
            break
        if question.lower() == "reset":
            history = []
            write("(history cleared)")
            continue
        answer = predictor.answer([pair], [predictor.prompt(question, history)])[0]
        write(f"deltavlm> {answer}")
        history.append((question, answer))
    return history


# --------------------------------------------------------------------------- batch over a ChangeChat file

@dataclass
class Item:
    """One question to answer: a turn of a ChangeChat record, with the reference turns before it."""
    id: str
    task: str
    image_a: Path
    image_b: Path
    question: str
    history: list[tuple[str, str]]
    true: str | list[str]
    changeflag: int | None


def items_of(samples) -> list[Item]:
    """Every human turn of every record; later turns carry the reference answers before them as history."""
    items = []
    for sample in samples:
        for k, (question, answer) in enumerate(sample.turns):
            true = sample.references if (k == 0 and sample.references) else (answer or "")
            item_id = sample.id if len(sample.turns) == 1 else f"{sample.id}_turn{k + 1}"
            items.append(Item(item_id, cc.task_of(question), sample.image_a, sample.image_b, question,
                              [(q, a or "") for q, a in sample.turns[:k]], true, sample.changeflag))
    return items


def answer_items(predictor: Predictor, items: list[Item], results_path: Path, batch_size: int,
                 run_settings: dict, shard: Shard = Shard()) -> None:
    """Answer the items not yet in ``results_path`` (JSON Lines), one flushed batch at a time. Under torchrun each
    process answers its share (the longest prompts dealt out evenly) and rank 0, the one writer, appends every
    batch of every process."""
    if batch_size < 1:
        raise UserError(f"BATCH_SIZE must be >= 1, got {batch_size}")
    writers: list[ResultsWriter] = []  # rank 0's, the one writer

    def left_to_answer() -> list[str]:
        check_run_settings(results_path.parent / f"{results_path.stem}.settings.json", run_settings, results_path)
        writers.append(ResultsWriter(results_path))
        left = [item.id for item in items if item.id not in writers[0].done_ids]
        if len(left) < len(items):
            print(f"resuming {results_path}: {len(items) - len(left)} of {len(items)} answers already there")
        return left

    missing = set(decided_by_main(shard, left_to_answer))  # other settings wrote the file: every process stops
    todo = [item for item in items if item.id in missing]
    prompts = {item.id: predictor.prompt(item.question, item.history) for item in todo}
    prompt_tokens = {key: len(predictor.tokenizers.llm(prompt)["input_ids"]) for key, prompt in prompts.items()}
    answer_in_shards(shard, todo, batch_size, lambda batch: answer_batch(predictor, batch),
                     writers[0].append if shard.main else None, cost=lambda item: prompt_tokens[item.id],
                     desc="DeltaVLM")


def answer_batch(predictor: Predictor, batch: list[Item]) -> list[dict]:
    """The results records (one per item) of one batch: the predictor's answers beside the references."""
    pairs = [read_pair(item.image_a, item.image_b) for item in batch]
    prompts = [predictor.prompt(item.question, item.history) for item in batch]
    answers = predictor.answer(pairs, prompts)
    return [{"id": item.id, "task": item.task, "image_a": str(item.image_a), "image_b": str(item.image_b),
             "question": item.question, "prompt": prompt, "true": item.true, "generated": answer,
             "changeflag": item.changeflag} for item, prompt, answer in zip(batch, prompts, answers)]


def generation_settings(decoding: Decoding, prompting: Prompting, **extra) -> dict:
    """What decides an answer, for the results' settings file."""
    return {**asdict(decoding), **asdict(prompting), **extra}
