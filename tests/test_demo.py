"""demo.py: the page's logic in plain tests, and the page itself in headless Chromium (Playwright) for the tiny
DeltaVLM and the tiny Video-LLaVA."""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_TIMEOUT, start_command, wait_until

import geochange.changechat_format as cc
from geochange import demo
from geochange.sample.data import SAMPLE_CHANGECHAT_ROOT
from geochange.video import write_image, write_video
from geochange.video_llm.families import FAMILIES

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class FakeChat:
    """A model that answers "answer <n>" and remembers what it received; its images' shorter side is ``input_side``
    (None: any size)."""

    description = "a fake model"

    def __init__(self, input_side=None):
        self.prompts = []
        self.input_side = input_side

    def prompt(self, question, history):
        return " | ".join(f"{q} -> {a}" for q, a in history) + f" | {question}"

    def stream(self, pair, prompt, max_new_tokens, num_beams):
        self.prompts.append((prompt, pair.before.shape, pair.after.shape))
        answer = f"answer {len(self.prompts)}"
        for end in range(1, len(answer) + 1):
            yield answer[:end]


def turns(chat, question, before, after, history=(), video=None, max_pixels=None):
    return list(demo.answer_turn(chat, question, before, after, video, list(history), 8, 1, "test", [],
                                 log=lambda _: None, max_pixels=max_pixels))


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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_video_model_chats_about_a_pair_brought_down_to_its_input_side(family, image_pair):
    """Each family's tiny twin through the page's own turn: the pair read at the entry's input side, the answer
    streamed, the second turn's prompt holding the first; a batch of pairs (whole scenes) answered at once."""
    chat = demo.VideoChat(family, "base", "tiny", "cpu")
    assert chat.input_side == FAMILIES[family].input_side(chat.model.config)
    first = turns(chat, "What changed?", *map(str, image_pair))
    assert first[-1].history[-1][0] == "What changed?" and isinstance(first[-1].history[-1][1], str)
    prompt = chat.prompt("How many roads?", first[-1].history)
    assert prompt.count(chat.processor.video_token) == 1 and prompt.index("What changed?") < prompt.index("How many")
    pair = demo.load_pair(str(image_pair[0]), str(image_pair[1]), None, side=chat.input_side)
    assert min(pair.before.shape[:2]) <= chat.input_side
    answers = chat.answer_pairs([(pair.before, pair.after)] * 2, "What changed?", 3)
    assert len(answers) == 2 and answers[0] == answers[1]  # one batch, greedy: identical pairs, identical answers


def test_an_unknown_model_or_path_is_one_line(user_error):
    from geochange.overrides import make_settings

    settings = {"MODEL": "gpt", "MODEL_PATH": "tiny", "DEVICE": "cpu", "MAX_NEW_TOKENS": 4, "NUM_BEAMS": 1}
    user_error(lambda: demo.load_chat(make_settings(settings)), "MODEL='gpt' is not one of deltavlm, videollava")
    user_error(lambda: demo.load_chat(make_settings({**settings, "MODEL": "videollava", "MODEL_PATH": "runs/none"})),
               "MODEL_PATH runs/none is not a fine-tuning run directory")


# ----------------------------------------------------------------------------------------------- an untrusted user's uploads

def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` but which holds one row of pixels: a few hundred bytes that
    would decode to a huge image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(3 * width + 1)))
                     + chunk(b"IEND", b""))
    return path


def test_uploads_are_brought_down_to_the_models_input_size_as_they_are_read(tmp_path, scene_images):
    """A large upload never reaches the model (or its partner) at full size: each image is read straight down to the
    model's input size (shorter side), and a smaller partner is fitted to it, never the other way round."""
    import tracemalloc

    from PIL import Image

    big = np.tile(scene_images[0], (8, 8, 1))  # 2048 x 2048: a full-size copy (12 MB) would show
    write_image(big, tmp_path / "big.png")
    small = write_image(scene_images[1][:200, :], tmp_path / "small.png")  # 256 x 200
    tracemalloc.start()
    pair = demo.load_pair(str(tmp_path / "big.png"), str(small), side=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pair.before.shape == pair.after.shape == (64, 64, 3)
    assert peak < 3_000_000, f"{peak / 1e6:.1f} MB of arrays: an image was held at full size"
    assert pair.notes == ["the images differ in size: the after image (256x200) was resized to the before image's "
                          "2048x2048"]
    reference = np.asarray(Image.fromarray(big).resize((64, 64), Image.LANCZOS), dtype=float)
    assert np.abs(pair.before - reference).mean() < 2.0  # the same picture, brought down
    # a JPEG is decoded at a reduced scale straight away, and still gives the same picture; never enlarged
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.tile(scene_images[0], (4, 6, 1))).save(photo, quality=95)  # 1536 x 1024
    read = demo.load_pair(str(photo), str(photo), side=100).before
    reference = np.asarray(Image.open(photo).convert("RGB").resize((150, 100), Image.LANCZOS), dtype=float)
    assert read.shape == (100, 150, 3) and np.abs(read - reference).mean() < 3.0
    assert demo.load_pair(str(small), str(small), side=512).before.shape == (200, 256, 3)
    clip = write_video([np.tile(scene_images[0], (2, 2, 1)), np.tile(scene_images[1], (2, 2, 1))], tmp_path / "c.mp4")
    assert demo.load_pair(None, None, str(clip), side=64).after.shape == (64, 64, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns past 89 MP
def test_an_upload_past_the_pixel_limit_is_refused_from_its_header(tmp_path, image_pair, monkeypatch, scene_images):
    from PIL import ImageFile

    huge = png_claiming(tmp_path / "huge.png", 12000, 12000)
    bomb = png_claiming(tmp_path / "bomb.png", 20000, 20000)  # past PIL's own limit too
    clip = write_video([scene_images[0], scene_images[1]], tmp_path / "clip.mp4")

    def decode(*_):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)  # the refusal reads headers only
    chat = FakeChat(input_side=224)
    (turn,) = turns(chat, "What changed?", str(huge), str(image_pair[1]), max_pixels=40_000_000)
    assert turn.notice == ("**huge.png is 12000x12000 (144 megapixels), more than the 40 megapixels this page takes "
                           "(MAX_IMAGE_PIXELS): bring it down first**")
    (turn,) = turns(chat, "What changed?", str(image_pair[0]), str(bomb), max_pixels=40_000_000)
    assert "bomb.png has more than 179 megapixels" in turn.notice
    (turn,) = turns(chat, "What changed?", None, None, video=str(clip), max_pixels=256 * 255)
    assert "clip.mp4 is 256x256 (0.0655 megapixels), more than the 0.06528 megapixels" in turn.notice
    assert chat.prompts == []
    # the page says so as soon as the file is given, before any question
    assert demo.pair_notice(demo.Upload.of(huge), None, None, 40_000_000).startswith("**huge.png is 12000x12000")
    assert demo.pair_notice(demo.Upload.of(image_pair[0]), None, None, 40_000_000) == ""


def test_notices_name_the_file_the_user_chose_not_the_servers_copy(tmp_path, scene_images):
    """gradio keeps an upload under its temporary folder and hands its components the original name beside it
    (``FileData.orig_name``; the browser test checks that end to end): the page's notices use that name."""
    from types import SimpleNamespace

    def upload(path: Path, name: str) -> demo.Upload:  # what a component made by as_upload hands the page
        return demo.as_upload(SimpleNamespace()).preprocess(SimpleNamespace(path=str(path), orig_name=name))

    server_copy = tmp_path / "gradio" / "3f9a0c" / "fake.png"
    server_copy.parent.mkdir(parents=True)
    server_copy.write_text("not an image")
    chosen = upload(server_copy, "my field.png")
    assert chosen == demo.Upload(str(server_copy), "my field.png")
    (turn,) = turns(FakeChat(), "What changed?", chosen, chosen)
    assert "my field.png is not a readable image" in turn.notice and str(tmp_path) not in turn.notice
    one_frame = write_video([scene_images[0]], tmp_path / "gradio" / "3f9a0c" / "clip.mp4")
    (turn,) = turns(FakeChat(), "What changed?", None, None, video=upload(one_frame, "holiday.mp4"))
    assert "video holiday.mp4 has 1 frame(s)" in turn.notice and str(tmp_path) not in turn.notice
    assert upload(server_copy, None).name == "fake.png"  # pasted from the clipboard: no original name


# ----------------------------------------------------------------------------------------------- who may use the page

def demo_settings(**values):
    from geochange.overrides import make_settings

    defaults = {"HOST": "127.0.0.1", "SHARE": False, "AUTH": None, "ALLOW_NO_AUTH": False}
    return make_settings({**defaults, **values})


def test_a_page_served_beyond_this_machine_needs_a_login(tmp_path, user_error, capsys):
    from geochange.overrides import apply_overrides

    assert demo.page_login(demo_settings()) is None  # this machine only: no login needed
    for where, settings in (("HOST=0.0.0.0", {"HOST": "0.0.0.0"}), ("SHARE=True", {"SHARE": True}),
                            ("HOST=192.168.1.5", {"HOST": "192.168.1.5"})):
        user_error(lambda: demo.page_login(demo_settings(**settings)), where.split("=")[0], "AUTH is not set",
                   "ALLOW_NO_AUTH=True")
    assert demo.page_login(demo_settings(HOST="0.0.0.0", ALLOW_NO_AUTH=True)) is None  # said explicitly
    assert demo.page_login(demo_settings(HOST="0.0.0.0", AUTH="ann:pa:ss")) == [("ann", "pa:ss")]
    logins = tmp_path / "logins.txt"
    logins.write_text("# who may use the demo\nann:first secret\n\nbob:second\n")
    assert demo.page_login(demo_settings(HOST="0.0.0.0", AUTH=str(logins))) == [("ann", "first secret"),
                                                                                ("bob", "second")]
    logins.write_text("ann:first\nbob-without-a-password\n")
    message = user_error(lambda: demo.page_login(demo_settings(AUTH=str(logins))), f"{logins} line 2")
    assert "bob-without" not in message
    message = user_error(lambda: demo.page_login(demo_settings(AUTH="hunter2")), "AUTH is not user:password")
    assert "hunter2" not in message
    # a password given on the command line is never printed back
    scope = {"AUTH": None, "HOST": "127.0.0.1"}
    apply_overrides(scope, ["AUTH=ann:hunter2", "HOST=0.0.0.0"])
    assert scope["AUTH"] == "ann:hunter2" and "hunter2" not in capsys.readouterr().out


@pytest.mark.slow
def test_the_login_guards_the_page_and_its_api(free_port, sample_dir):
    """The page served in this process with a login: nothing of it, and no call of the model, without logging in."""
    import httpx

    settings = demo_settings(HOST="0.0.0.0", AUTH="ann:hunter2", MAX_NEW_TOKENS=8, NUM_BEAMS=1,
                             MAX_IMAGE_PIXELS=40_000_000)
    page = demo.build_page(FakeChat(), settings)
    page.launch(server_name="127.0.0.1", server_port=free_port, auth=demo.page_login(settings),
                prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{free_port}"
    try:
        assert httpx.get(f"{url}/config").status_code == 401  # the page's contents, and every call of the model
        assert httpx.post(f"{url}/gradio_api/queue/join", json={"data": [], "fn_index": 0}).status_code == 401
        assert httpx.post(f"{url}/login", data={"username": "ann", "password": "wrong"}).status_code == 400
        with httpx.Client() as client:
            assert client.post(f"{url}/login", data={"username": "ann", "password": "hunter2"}).status_code == 200
            config = client.get(f"{url}/config")
            assert config.status_code == 200 and "a fake model" in config.text
    finally:
        page.close()


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


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns past 89 MP
@pytest.mark.slow
def test_what_a_newcomer_and_an_untrusted_upload_see_in_the_browser(tmp_path, free_port, sample_dir):
    """The page (with a stand-in model) on a laptop's screen: the sample pairs above the fold, beside the chat, not
    under it; images from a file or the clipboard, no webcam; a huge upload refused at once, named as the user
    named it."""
    from playwright.sync_api import sync_playwright

    settings = demo_settings(MAX_NEW_TOKENS=8, NUM_BEAMS=1, MAX_IMAGE_PIXELS=40_000_000)
    page = demo.build_page(FakeChat(), settings)
    page.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    huge = png_claiming(tmp_path / "my huge field.png", 12000, 12000)
    try:
        with sync_playwright() as playwright:
            browser, context = browser_page(playwright, width=1280)
            tab = context.new_page()
            tab.set_viewport_size({"width": 1280, "height": 800})
            tab.goto(f"http://127.0.0.1:{free_port}")
            tab.wait_for_selector("#send")
            examples, chat = tab.locator("#examples").bounding_box(), tab.locator("#chat").bounding_box()
            assert examples["y"] + 200 < 800, examples  # the label and the first pairs on the first screen
            assert examples["y"] < chat["y"] + chat["height"] and examples["x"] + examples["width"] <= chat["x"]
            for name in ("before", "after"):
                sources = {tab.locator(f"#{name} button").nth(i).get_attribute("aria-label") or ""
                           for i in range(tab.locator(f"#{name} button").count())}
                assert {"Upload file", "Paste from clipboard"} <= sources
                assert not [s for s in sources if "camera" in s.lower() or "webcam" in s.lower()], sources
            tab.locator("#after input[type=file]").set_input_files(str(huge))
            tab.wait_for_function("document.querySelector('#notice').innerText.includes('megapixels')")
            notice = tab.locator("#notice").inner_text()
            assert notice.startswith("my huge field.png is 12000x12000 (144 megapixels)") and "/" not in notice
            browser.close()
    finally:
        page.close()
