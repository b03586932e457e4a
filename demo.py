"""Chat about what changed between two satellite images, in the browser, with any model this suite trains.

A before/after pair (two images, or a 2-frame clip for the video models), a multi-turn conversation in the model's
own format (DeltaVLM's dialogue as its predictor builds it; the video models' chat template with the earlier
turns), answers streamed token by token, the bundled sample pairs as examples and ChangeChat's question types one
click away. One conversation per browser tab; one generation at a time (the rest wait in the queue).

    python demo.py MODEL_PATH=tiny                             # offline tiny DeltaVLM, on this machine's CPU
    python demo.py MODEL=videollava MODEL_PATH=tiny            # the tiny Video-LLaVA
    python demo.py MODEL=videollava MODEL_PATH=runs/<run>      # a fine-tuning run, on the GPU
    python demo.py HOST=0.0.0.0                                # the released DeltaVLM, for other machines to reach
"""
MODEL = "deltavlm"          # "deltavlm", "videollava" or "llavanext"
MODEL_PATH = "hlwu/DeltaVLM"  # DeltaVLM: a checkpoint_best.pth (file, folder or Hub repo; base = the released one);
                            # video models: a fine-tuning run directory or base (the family's 7B model); or tiny
DEVICE = "auto"             # "auto" = the GPU if there is one, else the CPU; or "cuda:1", "cpu"
HOST = "127.0.0.1"          # 0.0.0.0 = reachable from other machines (see the README before you do)
PORT = 7860
MAX_NEW_TOKENS = 128        # per answer (changeable on the page)
NUM_BEAMS = 1               # 1 = greedy, streamed token by token; more = beam search, the answer comes whole
SHARE = False               # True = a temporary public gradio.live link (needs the internet)

if __name__ == "__main__":
    from common import demo, load_settings

    cfg = load_settings(globals())
    # 1. the model that answers (loaded once): DeltaVLM through its predictor, or a video model
    chat = demo.load_chat(cfg)
    # 2. the page: the pair, the chat, the questions, the examples, the settings; a conversation per tab
    page = demo.build_page(chat, cfg)
    # 3. serve it, printing the address to open
    print(f"{chat.description}: open http://{cfg.HOST}:{cfg.PORT} in a browser", flush=True)
    page.launch(server_name=cfg.HOST, server_port=cfg.PORT, share=cfg.SHARE, show_error=False)
