"""The browser chat of ``demo.py``: a before/after pair, any model this suite trains, a multi-turn conversation.

The page's logic, apart from the page: what a model receives (its own multi-turn format: DeltaVLM's dialogue layout
as its predictor builds it, the video models' chat template with the earlier turns), the inputs checked as an
untrusted user may send them (one clear notice, naming the file as the user chose it, for a file that is not an
image, an image past the pixel limit, a missing image, an empty message; every upload brought down to the model's
input size as it is read; images of different sizes resized, and said so), who may use the page (Gradio's login,
required beyond this machine), answers streamed token by token (greedy decoding; beam search answers whole), and
quick scores of a caption against a bundled pair's references (the per-sample lexical metrics of ``METRICS``).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from . import changechat_format as cc
from .deltavlm import DISPLAY_NAME as DELTAVLM_NAME
from .deltavlm import FAMILY_ID as DELTAVLM_ID
from .deltavlm import run as deltavlm_run
from .errors import UserError, first_line
from .metrics import METRIC_NAMES, Texts, metric_groups
from .overrides import load_settings, script_constants
from .sample.data import SAMPLE_CHANGECHAT_CAPTIONS, SAMPLE_CHANGECHAT_ROOT, ensure_sample_media
from .video import clip_size, image_size, read_image, read_video_frames, resize_image, shrink_image
from .video_llm.evaluation import generate_answers, load_eval_model, model_inputs
from .video_llm.families import FAMILIES, get_family
from .video_llm.modeling import video_prompt

MODELS = (DELTAVLM_ID, *FAMILIES)
# One click asks these (ChangeChat's question types).
QUICK_QUESTIONS = cc.TASK_QUESTIONS
# Bundled sample pairs offered as examples (with changes to talk about).
EXAMPLE_PAIRS = ("val_00002", "val_00005", "val_00007", "val_00011")
# HOST values that serve this machine alone: any other address (or SHARE) needs a login.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------- the inputs

@dataclass(frozen=True)
class Upload:
    """A file given to the page: where the server keeps it (gradio's temporary copy) and the name the user chose it
    by, which every notice uses (the server's paths are no business of the page's users)."""
    path: str
    name: str

    @classmethod
    def of(cls, value: Upload | str | Path | None) -> Upload | None:
        """An Upload as it is, a path as the file of that name; None (nothing uploaded) as None."""
        if value is None or isinstance(value, Upload):
            return value
        return cls(str(value), Path(value).name)


def _named(upload: Upload, read: Callable[[str], T]) -> T:
    """``read(upload.path)``, its error naming the file as the user chose it instead of the server's copy."""
    try:
        return read(upload.path)
    except UserError as exc:
        raise UserError(str(exc).replace(upload.path, upload.name)) from None


def check_pixels(upload: Upload, max_pixels: int | None, clip: bool = False) -> tuple[int, int]:
    """The upload's (width, height), read from its header alone; past ``max_pixels`` (None: no limit) it is refused
    before anything is decoded."""
    width, height = _named(upload, clip_size if clip else image_size)
    if max_pixels and width * height > max_pixels:
        raise UserError(f"{upload.name} is {width}x{height} ({width * height / 1e6:.3g} megapixels), more than the "
                        f"{max_pixels / 1e6:g} megapixels this page takes (MAX_IMAGE_PIXELS): bring it down first")
    return width, height


@dataclass
class Pair:
    """The before/after images (RGB arrays of one size) and what the page should say about them."""
    before: np.ndarray
    after: np.ndarray
    notes: list[str]


def load_pair(before: Upload | str | None, after: Upload | str | None, video: Upload | str | None = None, *,
              side: int | None = None, max_pixels: int | None = None) -> Pair:
    """The pair to talk about: two image files, or a clip whose first and last frames are the pair. Each is checked
    against ``max_pixels`` from its header, then brought down as it is read so that its shorter side is ``side``
    (the model's input size; None: kept as it is), so that a huge upload never reaches, or enlarges, its partner.
    A missing image, a file that is not an image or is too large, a clip that cannot serve two frames: UserError, one
    line for the page, naming the file as the user chose it."""
    before, after, video = Upload.of(before), Upload.of(after), Upload.of(video)
    if video and not (before or after):
        check_pixels(video, max_pixels, clip=True)
        frames = _named(video, lambda path: read_video_frames(path, 2))
        return Pair(shrink_image(frames[0], side), shrink_image(frames[-1], side),
                    [f"the first and last frames of {video.name}"])
    if not before or not after:
        missing = " and ".join(name for name, upload in (("before", before), ("after", after)) if not upload)
        raise UserError(f"upload the {missing} image (or a 2-frame clip) first")
    (width, height), (after_width, after_height) = (check_pixels(upload, max_pixels) for upload in (before, after))
    first, second = (_named(upload, lambda path: read_image(path, side)) for upload in (before, after))
    notes = []
    if first.shape != second.shape:
        notes.append(f"the images differ in size: the after image ({after_width}x{after_height}) was resized to the "
                     f"before image's {width}x{height}")
        second = resize_image(second, (first.shape[1], first.shape[0]))
    return Pair(first, second, notes)


def pair_notice(before: Upload | None, after: Upload | None, video: Upload | None, max_pixels: int | None) -> str:
    """What the page says as soon as a file is given: the first upload that is not an image (or clip) or is too large,
    from the files' headers alone; "" when all are fine so far."""
    for upload, clip in ((before, False), (after, False), (video, True)):
        if upload is not None:
            try:
                check_pixels(Upload.of(upload), max_pixels, clip)
            except UserError as exc:
                return f"**{exc}**"
    return ""


def check_question(question: str | None) -> str:
    question = (question or "").strip()
    if not question:
        raise UserError("type a question (or click one of the questions below the box)")
    return question


# ----------------------------------------------------------------------------------------------- the models

def _stream(generate, streamer) -> Iterator[str]:
    """Run ``generate()`` in a thread and yield the text as ``streamer`` receives it (partial answers); returns when
    generation ends, re-raising its error."""
    failure: list[BaseException] = []

    def work() -> None:
        try:
            generate()
        except BaseException as exc:  # noqa: BLE001 - handed to the page below
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if failure:
        raise failure[0]


class DeltaVLMChat:
    """DeltaVLM through its predictor: the dialogue laid out as its predictor (and its training) lays it out."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.predictor = deltavlm_run.load_predictor(cfg)
        self.device = self.predictor.device
        self.input_side = self.predictor.model.image_size  # both images are resized to this square
        self.checkpoint = str(cfg.CHECKPOINT)

    @property
    def description(self) -> str:
        return f"{DELTAVLM_NAME}, checkpoint {self.checkpoint}, on {self.device}"

    def prompt(self, question: str, history: list[tuple[str, str]]) -> str:
        return self.predictor.prompt(question, history)

    def answer_pairs(self, pairs: list[tuple[np.ndarray, np.ndarray]], question: str,
                     max_new_tokens: int) -> list[str]:
        """One question about many pairs, in one batch, decoded as the predictor's batch mode decodes."""
        self.predictor.decoding = replace(self.predictor.decoding, max_new_tokens=int(max_new_tokens))
        return self.predictor.answer(pairs, [self.prompt(question, [])] * len(pairs))

    def stream(self, pair: Pair, prompt: str, max_new_tokens: int, num_beams: int) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        self.predictor.decoding = replace(self.predictor.decoding, max_new_tokens=int(max_new_tokens),
                                          num_beams=int(num_beams))
        images = [(pair.before, pair.after)]
        if num_beams > 1:  # beam search cannot stream: the answer comes whole
            yield self.predictor.answer(images, [prompt])[0]
            return
        answers: list[str] = []
        streamer = TextIteratorStreamer(self.predictor.tokenizers.llm, skip_prompt=True, skip_special_tokens=True)
        partial = ""
        for partial in _stream(lambda: answers.extend(self.predictor.answer(images, [prompt], streamer)), streamer):
            yield partial.strip()
        yield answers[0] if answers else partial.strip()  # the predictor's own decoding (cut at </s>)


class VideoChat:
    """A video LLM (base, tiny or a fine-tuning run) on the pair as a clip: its chat template with the earlier turns."""

    def __init__(self, family: str, model_path: str, model_id: str, device: str):
        self.family = get_family(family)
        self.model, self.processor = load_eval_model(family, model_path, model_id, False, device)
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.checkpoint = model_id if model_path == "base" else model_path
        self.input_side = self.family.input_side(self.model.config)  # uploads are brought down to this side

    @property
    def description(self) -> str:
        return f"{self.family.display_name}, {self.checkpoint}, on {self.device}"

    def prompt(self, question: str, history: list[tuple[str, str]]) -> str:
        return video_prompt(self.processor, question, history)

    def answer_pairs(self, pairs: list[tuple[np.ndarray, np.ndarray]], question: str,
                     max_new_tokens: int) -> list[str]:
        """One question about many pairs as 2-frame clips, in one greedy batch, as evaluation generates."""
        clips = [np.stack(pair) for pair in pairs]
        return generate_answers(self.model, self.processor, clips, [question] * len(pairs), max_new_tokens)[0]

    def stream(self, pair: Pair, prompt: str, max_new_tokens: int, num_beams: int) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        inputs = model_inputs(self.model, self.processor, [prompt], [np.stack([pair.before, pair.after])])
        tokenizer = self.processor.tokenizer
        settings = dict(do_sample=False, num_beams=int(num_beams), max_new_tokens=int(max_new_tokens),
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if num_beams > 1:
            with torch.inference_mode():
                output = self.model.generate(**inputs, **settings)
            yield tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            return
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

        def generate() -> None:
            with torch.inference_mode():
                self.model.generate(**inputs, **settings, streamer=streamer)

        partial = ""
        for partial in _stream(generate, streamer):
            yield partial.strip()
        yield partial.strip()


def load_chat(cfg):
    """The model ``MODEL`` / ``MODEL_PATH`` name, loaded once for the page."""
    if cfg.MODEL not in MODELS:
        raise UserError(f"MODEL={cfg.MODEL!r} is not one of {', '.join(MODELS)}")
    if cfg.MODEL == DELTAVLM_ID:
        predict = script_constants("deltavlm_predict.py")  # its defaults: the released checkpoint and parts
        checkpoint = predict.CHECKPOINT if cfg.MODEL_PATH == "base" else cfg.MODEL_PATH
        return DeltaVLMChat(script_constants("deltavlm_predict.py", CHECKPOINT=checkpoint, DEVICE=cfg.DEVICE,
                                             NUM_BEAMS=cfg.NUM_BEAMS, MAX_NEW_TOKENS=cfg.MAX_NEW_TOKENS))
    family = get_family(cfg.MODEL)
    if cfg.MODEL_PATH == "tiny":
        return VideoChat(family.id, "base", "tiny", cfg.DEVICE)
    if cfg.MODEL_PATH == "base":
        return VideoChat(family.id, "base", family.default_model_id, cfg.DEVICE)
    if not Path(cfg.MODEL_PATH).is_dir():
        raise UserError(f"MODEL_PATH {cfg.MODEL_PATH} is not a fine-tuning run directory (nor 'base' or 'tiny')")
    return VideoChat(family.id, cfg.MODEL_PATH, family.default_model_id, cfg.DEVICE)


# ----------------------------------------------------------------------------------------------- scores and examples

def quick_scores(references: list[str], answer: str) -> dict[str, float]:
    """The per-sample lexical metrics of ``METRICS`` (ROUGE, BLEU) of one answer against its references, by their
    table names: instant, no model or Java."""
    texts = Texts([list(references)], [answer])
    scores: dict[str, float] = {}
    for compute, metrics in metric_groups().items():
        if all(metric.per_sample for metric in metrics):
            for key, values in compute(texts).items():
                scores[METRIC_NAMES[key]] = round(float(values[0]), 3)
    return scores


def example_pairs() -> list[tuple[str, str, list[str]]]:
    """The bundled sample pairs offered on the page: (before, after, reference captions)."""
    ensure_sample_media()
    records = {Path(r["image_A"]).stem: r for r in json.loads(SAMPLE_CHANGECHAT_CAPTIONS.read_text(encoding="utf-8"))}
    pairs = []
    for name in EXAMPLE_PAIRS:
        record = records.get(name)
        if record is not None:
            pairs.append((str(SAMPLE_CHANGECHAT_ROOT / record["image_A"]), str(SAMPLE_CHANGECHAT_ROOT / record["image_B"]),
                          record["captions"]))
    return pairs


def references_for(before: Upload | str | None, examples: list[tuple[str, str, list[str]]]) -> list[str]:
    """The reference captions of a bundled example pair (by its before image's name), else none."""
    if not before:
        return []
    name = Upload.of(before).name
    return next((refs for first, _, refs in examples if Path(first).name == name), [])


# ----------------------------------------------------------------------------------------------- one turn

@dataclass
class Turn:
    """What the page shows after a step of a turn: the chat messages, the notice line, and the history."""
    chat: list[dict]
    notice: str
    history: list[tuple[str, str]]


def answer_turn(chat, question: str | None, before: Upload | str | None, after: Upload | str | None,
                video: Upload | str | None, history: list[tuple[str, str]], max_new_tokens: int, num_beams: int,
                session: str, examples: list[tuple[str, str, list[str]]], log=print,
                max_pixels: int | None = None) -> Iterator[Turn]:
    """One question answered about the pair, streamed: the question and the growing answer appear in the chat, the
    history keeps the finished turn. The pair is read at the model's input size (``chat.input_side``); a mistake in
    the input is a notice on the page, nothing else changes."""
    messages = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    try:
        question = check_question(question)
        pair = load_pair(before, after, video, side=chat.input_side, max_pixels=max_pixels)
    except UserError as exc:
        yield Turn(messages, f"**{exc}**", history)
        return
    prompt = chat.prompt(question, history)
    log(f"[{session}] model input: {json.dumps(prompt)}")
    notes = "; ".join(pair.notes)
    messages = messages + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    answer = ""
    try:
        for answer in chat.stream(pair, prompt, max_new_tokens, num_beams):
            messages[-1] = {"role": "assistant", "content": answer}
            yield Turn(list(messages), notes, history)
    except Exception as exc:  # a model failure is a notice too; the server keeps serving
        log(f"[{session}] failed: {type(exc).__name__}: {first_line(exc)}")
        yield Turn(messages[:-2], f"**the model failed: {first_line(exc, 200)}**", history)
        return
    log(f"[{session}] answer: {json.dumps(answer)}")
    history = history + [(question, answer)]
    references = references_for(before, examples) if question == cc.CAPTION_PROMPT else []
    scored = quick_scores(references, answer) if references else {}
    if scored:
        notes = "; ".join(filter(None, [notes, "against the pair's reference captions: " +
                                       ", ".join(f"{name} {value:.3f}" for name, value in scored.items())]))
    yield Turn(messages, notes, history)


# ----------------------------------------------------------------------------------------------- who may use it

def load_checked_settings(scope: dict):
    """Step 1: the script's settings (``overrides.load_settings`` over the constants in ``scope``) and the page's
    login, checked (``page_login``) before any model loads: (settings, login)."""
    cfg = load_settings(scope)
    return cfg, page_login(cfg)


def page_login(cfg) -> list[tuple[str, str]] | None:
    """Gradio's login for the page, from ``AUTH``: one ``user:password``, or a file of them (one a line; blank lines
    and ``#`` comments skipped). A page served beyond this machine (a ``HOST`` other than loopback, or ``SHARE``)
    without a login is refused unless ``ALLOW_NO_AUTH=True`` says so. Checked before any model loads; no error
    repeats a password."""
    public = cfg.SHARE or str(cfg.HOST) not in LOOPBACK_HOSTS
    if not cfg.AUTH:
        if public and not cfg.ALLOW_NO_AUTH:
            where = "a public gradio.live link (SHARE=True)" if cfg.SHARE else f"HOST={cfg.HOST}"
            raise UserError(f"{where} serves the page to other machines, and AUTH is not set: anyone who reaches it "
                            f"could use the model. Set AUTH=\"user:password\" (or AUTH=<a file of user:password "
                            f"lines>), or ALLOW_NO_AUTH=True on a network you trust")
        return None
    source = Path(str(cfg.AUTH))
    if source.is_file():
        lines = [(f"{source} line {number}", line.strip())
                 for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not lines:
            raise UserError(f"AUTH file {source} holds no user:password line")
    else:
        lines = [("AUTH", str(cfg.AUTH))]
    logins = []
    for where, line in lines:
        user, _, password = line.partition(":")
        if not user.strip() or not password:
            raise UserError(f"{where} is not user:password (nor is AUTH an existing file): a user name, a colon, "
                            f"a password")
        logins.append((user.strip(), password))
    return logins


# ----------------------------------------------------------------------------------------------- the page

def as_upload(component):
    """``component`` (a gradio Image or Video) handing the page's logic an ``Upload`` (the server's copy and the name
    the user chose) as it is: nothing decoded by gradio, so that a file that is not an image gets this suite's
    one-line notice instead of gradio's generic error, and a huge one is refused from its header. (Set on the
    instance: a subclass of a gradio component makes gradio write a .pyi file beside this module.)"""
    component.preprocess = lambda payload: None if payload is None else Upload(
        payload.path, payload.orig_name or Path(payload.path).name)
    return component


def build_page(chat, cfg):
    """The Blocks page, in two columns: the pair (two images, the bundled sample pairs right under them, or a clip)
    and the conversation (the chat, the question box and buttons, the one-click questions, the generation settings);
    what answers on top. One conversation per browser tab (gradio state), one generation at a time (the queue).
    Images come from an upload or the clipboard (no webcam: satellite pairs are files)."""
    import gradio as gr

    examples = example_pairs()
    with gr.Blocks(title="geollava-suite: chat about a change") as page:
        gr.Markdown(f"## Chat about what changed\nAnswering: **{chat.description}**", elem_id="model")
        history = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=400):  # the pair
                with gr.Row():
                    before, after = (as_upload(gr.Image(type="filepath", sources=["upload", "clipboard"], label=name,
                                                        elem_id=name, height=260)) for name in ("before", "after"))
                gr.Examples([[first, second] for first, second, _ in examples], inputs=[before, after],
                            label="start here: click a bundled sample pair (or upload your own above)",
                            elem_id="examples")
                with gr.Accordion("or a 2-frame clip (before, after)", open=False):
                    video = as_upload(gr.Video(label="2-frame clip", sources=["upload"], elem_id="clip", height=140))
            with gr.Column(scale=1, min_width=400):  # the conversation
                chatbot = gr.Chatbot(label="conversation", elem_id="chat", height=480)
                notice = gr.Markdown("", elem_id="notice")
                with gr.Row():
                    message = gr.Textbox(label="your question", elem_id="message", lines=2, scale=4,
                                         placeholder="e.g. " + cc.CAPTION_PROMPT)
                    with gr.Column(scale=1, min_width=120):
                        send = gr.Button("Send", elem_id="send", variant="primary")
                        clear = gr.Button("New conversation", elem_id="clear", size="sm")
                with gr.Row():
                    quick = [gr.Button(label, size="sm", min_width=80,
                                       elem_id=f"ask-{label.strip('?').replace(' ', '-')}") for label in QUICK_QUESTIONS]
                with gr.Accordion("generation settings", open=False):
                    max_new_tokens = gr.Slider(1, 512, value=cfg.MAX_NEW_TOKENS, step=1, label="MAX_NEW_TOKENS")
                    num_beams = gr.Slider(1, 8, value=cfg.NUM_BEAMS, step=1, label="NUM_BEAMS (1 streams the answer)")

        def respond(question, first, second, clip, turns, tokens, beams, request=None):
            session = getattr(request, "session_hash", None) or "local"
            for turn in answer_turn(chat, question, first, second, clip, turns, tokens, beams, session, examples,
                                    max_pixels=cfg.MAX_IMAGE_PIXELS):
                yield turn.chat, turn.notice, turn.history, ""

        respond.__annotations__["request"] = gr.Request  # gradio passes the request (the tab's session) by type

        def forget():
            return [], "", []

        def new_pair(first, second, clip):
            """A new pair starts a new conversation; an upload that cannot serve is said at once (headers only)."""
            return [], pair_notice(first, second, clip, cfg.MAX_IMAGE_PIXELS), []

        inputs = [message, before, after, video, history, max_new_tokens, num_beams]
        outputs = [chatbot, notice, history, message]
        # one queue for answering and forgetting, served in order: a new pair's reset cannot land after (and wipe)
        # the answer or notice of a question sent once the pair was shown
        in_order = {"concurrency_id": "conversation"}
        send.click(respond, inputs, outputs, **in_order)
        message.submit(respond, inputs, outputs, **in_order)
        clear.click(forget, None, [chatbot, notice, history], **in_order)
        chatbot.clear(forget, None, [chatbot, notice, history], **in_order)  # the chat's own bin forgets it too
        for component in (before, after, video):
            component.change(new_pair, [before, after, video], [chatbot, notice, history], **in_order)
        for button, question in zip(quick, QUICK_QUESTIONS.values()):
            button.click(lambda q=question: q, None, message)
    return page.queue(default_concurrency_limit=1)  # one generation at a time on the one model; the rest wait
