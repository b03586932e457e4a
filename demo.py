"""Chat about what changed between two satellite images, in the browser, with any model this suite trains.

A before/after pair (two images, or a 2-frame clip for the video models), a multi-turn conversation in the model's
own format (DeltaVLM's dialogue as its predictor builds it; the video models' chat template with the earlier
turns), answers streamed token by token, the bundled sample pairs as examples and ChangeChat's question types one
click away. One conversation per browser tab; one generation at a time (the rest wait in the queue).

    python demo.py MODEL_PATH=tiny                             # offline tiny DeltaVLM, on this machine's CPU
    python demo.py MODEL=videollava MODEL_PATH=tiny            # the tiny Video-LLaVA
    python demo.py MODEL=videollava MODEL_PATH=runs/<run>      # a fine-tuning run, on the GPU
    python demo.py HOST=0.0.0.0 AUTH=logins.txt                # the released DeltaVLM, for other machines to reach
"""
MODEL = "deltavlm"          # "deltavlm", "videollava", "llavanext" or "qwen25vl"
MODEL_PATH = "hlwu/DeltaVLM"  # DeltaVLM: a checkpoint_best.pth (file, folder or Hub repo; base = the released one);
                            # video models: a fine-tuning run directory or base (the family's 7B model); or tiny
DEVICE = "auto"             # "auto" = the GPU if there is one, else the CPU; or "cuda:1", "cpu"
HOST = "127.0.0.1"          # this machine only; 0.0.0.0 = reachable from other machines (needs AUTH: docs/demo.md)
PORT = 7860
AUTH = None                 # Gradio's login: "user:password", or a file of user:password lines; None = no login
ALLOW_NO_AUTH = False       # True = serve beyond this machine (HOST=0.0.0.0, SHARE) without AUTH: anyone may use it
MAX_IMAGE_PIXELS = 40_000_000  # larger uploads are refused from their header, before they are decoded
MAX_NEW_TOKENS = 128        # per answer (changeable on the page)
NUM_BEAMS = 1               # 1 = greedy, streamed token by token; more = beam search, the answer comes whole
SHARE = False               # True = a temporary public gradio.live link (needs the internet)

if __name__ == "__main__":
    from geochange import demo

    # 1. the settings, and who may use the page: AUTH's login, required beyond this machine (checked before the
    #    model loads)
    cfg, login = demo.load_checked_settings(globals())
    # 2. the model that answers (loaded once): DeltaVLM through its predictor, or a video model
    chat = demo.load_chat(cfg)
    # 3. the page: the pair, the examples, the chat, the questions, the settings; a conversation per tab
    page = demo.build_page(chat, cfg)
    # 4. serve it, printing the address to open
    who = f"login required ({len(login)} user{'s' if len(login) > 1 else ''})" if login else "no login"
    print(f"{chat.description}; {who}: open http://{cfg.HOST}:{cfg.PORT} in a browser", flush=True)
    page.launch(server_name=cfg.HOST, server_port=cfg.PORT, share=cfg.SHARE, show_error=False, auth=login)
