"""demo.py: the page's logic in plain tests, and the page itself in headless Chromium (Playwright) for the tiny
DeltaVLM and the tiny Video-LLaVA."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import TEST_TIMEOUT, start_command, wait_until

import geochange.changechat_format as cc
from geochange import demo
from geochange.sample.data import SAMPLE_CHANGECHAT_ROOT
from geochange.video import write_image, write_video

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class FakeChat:
    """A model that answers "answer <n>" and remembers what it received."""

    def __init__(self):
        self.prompts = []

    def prompt(self, question, history):
        return " | ".join(f"{q} -> {a}" for q, a in history) + f" | {question}"

    def stream(self, pair, prompt, max_new_tokens, num_beams):
        self.prompts.append((prompt, pair.before.shape, pair.after.shape))
        answer = f"answer {len(self.prompts)}"
        for end in range(1, len(answer) + 1):
            yield answer[:end]


def turns(chat, question, before, after, history=(), video=None):
    return list(demo.answer_turn(chat, question, before, after, video, list(history), 8, 1, "test", [], log=lambda _: None))


# ----------------------------------------------------------------------------------------------- the page's logic

def test_a_turn_streams_its_answer_and_the_next_turn_gets_the_history(image_pair):
    chat = FakeChat()
    first = turns(chat, "What changed?", *map(str, image_pair))
    assert [t.chat[-1]["content"] for t in first][:3] == ["a", "an", "ans"]  # the answer grows, token by token
    assert first[-1].history == [("What changed?", "answer 1")]
    assert first[-1].chat == [{"role": "user", "content": "What changed?"}, {"role": "assistant", "content": "answer 1"}]
    second = turns(chat, "How many roads?", *map(str, image_pair), history=first[-1].history)
    assert chat.prompts[1][0] == "What changed? -> answer 1 | How many roads?"
    assert second[-1].history == [("What changed?", "answer 1"), ("How many roads?", "answer 2")]
    assert [m["content"] for m in second[-1].chat] == ["What changed?", "answer 1", "How many roads?", "answer 2"]


def test_bad_input_is_a_notice_and_nothing_else_changes(image_pair, tmp_path, scene_images):
    chat = FakeChat()
    history = [("What changed?", "answer 0")]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for question, before, after, expected in [
            ("", image_pair[0], image_pair[1], "type a question"),
            ("What changed?", None, image_pair[1], "upload the before image"),
            ("What changed?", None, None, "upload the before and after image"),
            ("What changed?", image_pair[0], text, "is not a readable image")]:
        (turn,) = turns(chat, question, before and str(before), after and str(after), history)
        assert expected in turn.notice and turn.notice.startswith("**") and turn.history == history
        assert turn.chat == [{"role": "user", "content": "What changed?"}, {"role": "assistant", "content": "answer 0"}]
    assert chat.prompts == []  # the model was never asked
    # images of different sizes: the after image is resized to the before image's, and the page says so
    small = write_image(scene_images[1][:100, :128], tmp_path / "small.png")
    last = turns(chat, "What changed?", str(image_pair[0]), str(small))[-1]
    assert chat.prompts[0][1:] == ((256, 256, 3), (256, 256, 3))
    assert "the after image (128x100) was resized to the before image's 256x256" in last.notice


def test_a_two_frame_clip_is_the_pair(tmp_path, scene_images):
    chat = FakeChat()
    clip = write_video([scene_images[0], scene_images[1]], tmp_path / "pair.mp4")
    last = turns(chat, "What changed?", None, None, video=str(clip))[-1]
    assert last.history == [("What changed?", "answer 1")] and "pair.mp4" in last.notice
    one = write_video([scene_images[0]], tmp_path / "one.mp4")
    assert "1 frame(s)" in turns(chat, "What changed?", None, None, video=str(one))[-1].notice


def test_a_caption_of_a_bundled_pair_is_scored_against_its_references(sample_dir):
    from rouge_score import rouge_scorer

    examples = demo.example_pairs()
    assert len(examples) == len(demo.EXAMPLE_PAIRS) and all(len(refs) == 5 for _, _, refs in examples)
    before, after, references = examples[0]
    chat = FakeChat()
    last = list(demo.answer_turn(chat, cc.CAPTION_PROMPT, before, after, None, [], 8, 1, "test", examples,
                                 log=lambda _: None))[-1]
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    expected = max(scorer.score(r, "answer 1")["rouge1"].fmeasure for r in references)
    assert f"ROUGE-1 {expected:.3f}" in last.notice and "BLEU" in last.notice
    assert demo.quick_scores(references, references[0])["ROUGE-L"] == 1.0


def test_each_models_own_multi_turn_format():
    """DeltaVLM's dialogue as its predictor (and training) lays it out; the video models' chat template with the
    earlier turns, the clip once in the first message."""
    from geochange.deltavlm.inputs import Prompting, build_prompt
    from geochange.video_llm.modeling import load_processor, resolve_model_path, video_prompt

    history = [("Has anything changed?", "yes"), ("How many roads?", "one new road")]
    assert build_prompt("Where?", history, Prompting()) == \
        "q has anything changed? a yes q how many roads? a one new road q where?"
    processor = load_processor(resolve_model_path("tiny", "videollava"))
    assert video_prompt(processor, "Where?", history) == ("USER: <video>\nHas anything changed? ASSISTANT: yes USER: "
                                                          "How many roads? ASSISTANT: one new road USER: Where? ASSISTANT:")
    assert video_prompt(processor, "Where?") == "USER: <video>\nWhere? ASSISTANT:"


def test_an_unknown_model_or_path_is_one_line(user_error):
    from geochange.overrides import make_settings

    settings = {"MODEL": "gpt", "MODEL_PATH": "tiny", "DEVICE": "cpu", "MAX_NEW_TOKENS": 4, "NUM_BEAMS": 1}
    user_error(lambda: demo.load_chat(make_settings(settings)), "MODEL='gpt' is not one of deltavlm, videollava")
    user_error(lambda: demo.load_chat(make_settings({**settings, "MODEL": "videollava", "MODEL_PATH": "runs/none"})),
               "MODEL_PATH runs/none is not a fine-tuning run directory")


# ----------------------------------------------------------------------------------------------- the page, in a browser

class Server:
    """``python demo.py MODEL_PATH=tiny ...`` as a user starts it (the tiny model already built: the server only
    loads it), ready once it prints the address to open."""

    def __init__(self, port: int, *settings: str):
        self.command = start_command([sys.executable, "demo.py", "MODEL_PATH=tiny", f"PORT={port}",
                                      "MAX_NEW_TOKENS=12", *settings])
        self.url = f"http://127.0.0.1:{port}"
        self.wait_for(lambda: f"open {self.url}" in self.text(), "the demo server to print its address")

    def text(self) -> str:
        return self.command.output()

    def wait_for(self, condition, what: str) -> None:
        wait_until(condition, what, output=self.text, process=self.command)

    def lines(self, kind: str, session: str | None = None) -> list[str]:
        return [json.loads(line.split(f"] {kind}: ", 1)[1]) for line in self.text().splitlines()
                if f"] {kind}: " in line and (session is None or line.startswith(f"[{session}]"))]

    def stop(self) -> None:
        self.command.kill()


def browser_page(playwright, width=1100):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    context = browser.new_context(viewport={"width": width, "height": 1400})
    context.set_default_timeout(TEST_TIMEOUT * 1000)  # the one deadline: a busy machine is slower, not red
    return browser, context


# The chat shows the finished turn: one more bot message, and its status tracker idle (gradio hides it when the event
# is complete; while the answer streams it is not).
ANSWER_SHOWN = """count => document.querySelectorAll('#chat [data-testid=bot]').length === count &&
    [...document.querySelectorAll('#chat [data-testid=status-tracker]')].every(t => t.classList.contains('hide'))"""


def ask(page, server: Server, question: str, answers_before: int) -> str:
    """Type a question, send it, wait until the model has finished answering (the server logged the whole answer)
    and the page shows it; returns the answer the server logged."""
    page.locator("#message textarea").fill(question)
    page.locator("#send").click()
    server.wait_for(lambda: len(server.lines("answer")) > answers_before, f"the answer to {question!r}")
    page.wait_for_function(ANSWER_SHOWN, arg=answers_before + 1)
    return server.lines("answer")[-1]


def upload_pair(page, before: Path, after: Path) -> None:
    page.locator("#before input[type=file]").set_input_files(str(before))
    page.locator("#after input[type=file]").set_input_files(str(after))
    page.wait_for_function("document.querySelectorAll('#before img, #after img').length >= 2")


def save_small_screenshot(page, path: Path) -> None:
    """The pair and the chat, 900 px wide, in a 64-colour palette: small enough to commit."""
    from io import BytesIO

    from PIL import Image

    shot = Image.open(BytesIO(page.screenshot(full_page=False, clip={"x": 0, "y": 0, "width": 1100, "height": 1050})))
    shot = shot.convert("RGB").resize((900, round(900 * shot.height / shot.width)), Image.LANCZOS)
    shot.quantize(colors=64).save(path, optimize=True)


def chat_about_a_pair_in_the_browser(tmp_path: Path, free_port: int, model: str, screenshot: Path | None = None):
    from playwright.sync_api import sync_playwright

    from geochange.deltavlm.tiny import ensure_tiny_deltavlm
    from geochange.video_llm.modeling import resolve_model_path

    # The tiny model is built here, before the server starts: the server then only loads it.
    if model == "deltavlm":
        ensure_tiny_deltavlm()
    else:
        resolve_model_path("tiny", model)
    before, after = SAMPLE_CHANGECHAT_ROOT / "A" / "val_00002.png", SAMPLE_CHANGECHAT_ROOT / "B" / "val_00002.png"
    server = Server(free_port, f"MODEL={model}")
    try:
        with sync_playwright() as playwright:
            browser, context = browser_page(playwright)
            page = context.new_page()
            page.goto(server.url)
            page.wait_for_selector("#send")
            assert "checkpoint tiny" in page.locator("#model").inner_text() or "tiny" in page.locator("#model").inner_text()
            upload_pair(page, before, after)
            first = ask(page, server, "What changed?", 0)
            second = ask(page, server, "How many new buildings are there?", 1)
            shown = page.locator("#chat").inner_text()
            assert "What changed?" in shown and "How many new buildings are there?" in shown
            bots = page.locator("#chat [data-testid=bot]")
            assert bots.count() == 2 and all(bots.nth(i).inner_text().strip() for i in range(2))
            assert first and second
            # what the model received: the second question came with the first turn in its history
            session_prompts = server.lines("model input")
            assert len(session_prompts) == 2
            # DeltaVLM's dialogue text is normalised as its training text was (lower case, no full stops)
            earlier = cc.normalise_text(first, None) if model == "deltavlm" else first
            assert "what changed" in session_prompts[1].lower() and earlier in session_prompts[1]
            assert earlier not in session_prompts[0]
            if screenshot is not None:
                save_small_screenshot(page, screenshot)
            # a second tab: its own conversation; a file that is not an image is a notice there
            other = context.new_page()
            other.goto(server.url)
            other.wait_for_selector("#send")
            not_an_image = tmp_path / "notes.png"
            not_an_image.write_text("this is not an image")
            upload_pair(other, not_an_image, after)  # the page shows a broken picture for the text file
            other.locator("#message textarea").fill("What changed?")
            other.locator("#send").click()
            other.wait_for_function("document.querySelector('#notice').innerText.includes('not a readable image')")
            assert other.locator("#chat [data-testid=bot]").count() == 0
            # the first tab still gets answers, with its own history (the other tab's attempt is not in it)
            third = ask(page, server, "Where?", 2)
            prompts = server.lines("model input")
            assert third and len(prompts) == 3 and "how many new buildings" in prompts[2].lower()
            assert page.locator("#chat [data-testid=bot]").count() == 3
            browser.close()
    finally:
        server.stop()
    assert "Traceback" not in server.text()


@pytest.mark.slow
def test_a_conversation_with_the_tiny_deltavlm_in_the_browser(tmp_path, free_port, sample_dir):
    screenshot = REPO / "docs" / "demo.png" if os.environ.get("GEOLLAVA_UPDATE_SCREENSHOT") else tmp_path / "demo.png"
    chat_about_a_pair_in_the_browser(tmp_path, free_port, "deltavlm", screenshot)
    assert screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_a_conversation_with_the_tiny_video_llava_in_the_browser(tmp_path, free_port, sample_dir):
    chat_about_a_pair_in_the_browser(tmp_path, free_port, "videollava")
