"""The ``keyseg demo`` web page: a Gradio app over :class:`keyseg.pipeline.KeySegPipeline`.

Upload an image, ask; the page shows the overlay (one colour per mask), the answer, the
keyword with its nearest vocabulary words, and the chat history (follow-up questions keep
the conversation; a new image starts a new one). Requests go through Gradio's queue one at a
time (the model is shared), so concurrent users wait instead of crashing it. Nothing reaches
the network: analytics are off, there are no share links, fonts are the system's, and the
server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

# Before gradio is imported anywhere: no usage analytics or version pings.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

#: Demo limits: uploads above these are refused with a friendly message.
DEFAULT_MAX_PIXELS = 16_000_000
DEFAULT_MAX_FILE_SIZE = "20mb"

#: Element ids (stable selectors for the browser test).
IDS = {
    "image": "keyseg-image",
    "query": "keyseg-query",
    "submit": "keyseg-submit",
    "clear": "keyseg-clear",
    "overlay": "keyseg-overlay",
    "answer": "keyseg-answer",
    "keyword": "keyseg-keyword",
    "chat": "keyseg-chat",
}


#: Query families the demo shows an example of, in this order (shapes-world difficulties).
EXAMPLE_DIFFICULTIES = ("indirect", "multi", "relational", "attribute", "negative", "direct")


def example_inputs(directory: str | Path, count: int = 4) -> list[list[str]]:
    """Write shapes-world images to ``directory``, one per query family of
    :data:`EXAMPLE_DIFFICULTIES` (the first ``count``), with that family's query.

    Returns ``[[image_path, query], ...]`` for ``gr.Examples``. (The embedded default model is
    trained on this world, so these are the questions it knows.)
    """
    from keyseg.data.shapes import ShapesDataset

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset("val")
    wanted = list(EXAMPLE_DIFFICULTIES[:count])
    found: dict[str, list[str]] = {}
    for index in range(len(dataset)):
        record = dataset[index]
        for referent in record.referents:
            if referent.difficulty in wanted and referent.difficulty not in found:
                path = directory / f"shapes_val_{index}.png"
                if not path.is_file():
                    record.image.save(path)
                found[referent.difficulty] = [str(path), referent.text]
        if len(found) == len(wanted):
            break
    return [found[d] for d in wanted if d in found]


def _keyword_line(result) -> str:
    if result.keyword is None and not result.keyword_neighbours:
        return "(no [KEY] in the answer)"
    near = ", ".join(f"{t} ({s:.2f})" for t, s in
                     (result.keyword_neighbours[0] if result.keyword_neighbours else []))
    return f"{result.keyword or '-'}" + (f"   nearest words: {near}" if near else "")


def build_demo(pipeline, examples_dir: str | Path | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, untrained: bool = False,
               embedded_default: bool = False):
    """The Gradio ``Blocks`` app for ``pipeline`` (not launched).

    Args:
        pipeline: a :class:`~keyseg.pipeline.KeySegPipeline` shared by all sessions (the
            queue runs one request at a time).
        examples_dir: where example images are written (a temp dir if None).
        max_pixels: uploads larger than this (width * height) are refused politely.
        untrained: show a banner saying the model is the random tiny one.
        embedded_default: show a banner saying the model knows only the shapes world.
    """
    import gradio as gr

    from keyseg.data.images import load_image
    from keyseg.errors import KeySegError
    from keyseg.tokens import Turn
    from keyseg.visualize import overlay_masks

    examples_dir = Path(examples_dir or tempfile.mkdtemp(prefix="keyseg-demo-"))

    def respond(image_path: str | None, query: str, chat: list[dict[str, Any]] | None,
                session: dict[str, Any] | None):
        if not image_path:
            raise gr.Error("Please upload an image first.")
        if not query or not query.strip():
            raise gr.Error("Please type a question about the image.")
        try:
            image = load_image(image_path, max_pixels=max_pixels)
        except KeySegError as error:
            text = str(error)
            if "over the limit" in text:
                text = (f"This image is too large: please upload one under "
                        f"{max_pixels / 1e6:.0f} megapixels.")
            elif "decode" in text or "not a readable" in text:
                text = "This file could not be read as an image (damaged or not an image)."
            raise gr.Error(text) from error
        key = pipeline.image_key(image)
        session = session if session and session.get("image") == key else {"image": key,
                                                                            "turns": []}
        if not session["turns"]:
            chat = []
        history = [Turn(q, a) for q, a in session["turns"]]
        try:
            result = pipeline(image, query, history=history)
        except KeySegError as error:
            raise gr.Error(str(error)) from error
        session["turns"].append((pipeline.format_question(query), result.answer))
        answer = result.text or result.answer
        if result.message:
            answer = f"{answer}\n({result.message})"
        chat = [*(chat or []), {"role": "user", "content": query},
                {"role": "assistant", "content": answer}]
        return (overlay_masks(image, result.masks), answer, _keyword_line(result), chat,
                session, "")

    def clear():
        return None, "", "", [], None, ""

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    with gr.Blocks(title="KeySeg demo", analytics_enabled=False) as demo:
        demo.keyseg_theme = theme  # gradio 6 takes the theme at launch()
        gr.Markdown("## KeySeg — ask about an image, get an answer, a keyword and masks")
        if untrained:
            gr.Markdown("**Untrained random model**: answers and masks are meaningless. "
                        "Start with `keyseg demo --checkpoint DIR` for a trained model.")
        elif embedded_default:
            gr.Markdown("**Embedded default model**: trained only on a synthetic world of "
                        "coloured shapes (try the examples); on real photographs its answers "
                        "are meaningless. Start with `keyseg demo --checkpoint DIR` (or a Hub "
                        "id) for real images.", elem_id="embedded-default-note")
        session = gr.State(None)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload"], label="Image",
                                 elem_id=IDS["image"])
                query = gr.Textbox(label="Question", placeholder="What would you use to eat "
                                   "soup?", lines=1, elem_id=IDS["query"])
                with gr.Row():
                    submit = gr.Button("Ask", variant="primary", elem_id=IDS["submit"])
                    reset = gr.Button("New conversation", elem_id=IDS["clear"])
            with gr.Column():
                overlay = gr.Image(label="Overlay (one colour per mask)", type="pil",
                                   format="png", interactive=False, elem_id=IDS["overlay"])
                answer = gr.Textbox(label="Answer", interactive=False, elem_id=IDS["answer"])
                keyword = gr.Textbox(label="Keyword", interactive=False,
                                     elem_id=IDS["keyword"])
        chat = gr.Chatbot(label="Conversation", height=260, elem_id=IDS["chat"])
        examples = example_inputs(examples_dir)
        if examples:
            gr.Examples(examples=examples, inputs=[image, query], cache_examples=False,
                        label="Examples (shapes world, indirect questions)")
        outputs = [overlay, answer, keyword, chat, session, query]
        submit.click(respond, [image, query, chat, session], outputs)
        query.submit(respond, [image, query, chat, session], outputs)
        reset.click(clear, None, [overlay, answer, keyword, chat, session, query],
                    queue=False)
    demo.keyseg_allowed_paths = [str(examples_dir)]
    return demo


def launch(pipeline, host: str = "127.0.0.1", port: int = 7860, *,
           max_pixels: int = DEFAULT_MAX_PIXELS, max_file_size: str = DEFAULT_MAX_FILE_SIZE,
           untrained: bool = False, embedded_default: bool = False,
           queue_size: int = 32) -> None:
    """Serve the demo (blocks until interrupted); requests queue, one runs at a time."""
    demo = build_demo(pipeline, max_pixels=max_pixels, untrained=untrained,
                      embedded_default=embedded_default)
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    print(f"KeySeg demo on http://{host}:{port}  (Ctrl+C to stop)", flush=True)
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=True,
        quiet=True,
        ssr_mode=False,
        max_file_size=max_file_size,
        allowed_paths=demo.keyseg_allowed_paths,
        theme=demo.keyseg_theme,
        footer_links=[],
    )
