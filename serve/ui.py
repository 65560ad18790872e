"""The Gradio demo mounted at /ui: model picker, steps, seed (+ randomise), class label, count, a result grid and
the measured latency.  Callbacks call the GenerationService in-process (no HTTP hop)."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI

from quickstep.artifacts import Quality

from .errors import ServeError
from .schemas import MAX_SEED, GenerateRequest
from .service import GenerationService, upscale_nearest

UI_PATH = "/ui"
DISPLAY_PX = 128
RANDOM_CLASS = "random"
INT32_MAX = 2**31 - 1
# Gradio's queue looks for work every 1 ms while idle on Linux (`Queue.sleep_when_free = 0.001`; 0.05 on Windows)
# and for progress every 10 ms, so an idle server with the UI woke ~1,800 times a second (~2% of a core per
# replica; strace -c -f: epoll_pwait with 0/1 ms timeouts). Gradio's own Windows intervals instead: a UI job
# waits at most 50 ms longer to start, the idle server wakes ~30 times a second. The HTTP API is not affected.
UI_IDLE_POLL_S = 0.05
UI_PROGRESS_POLL_S = 0.1


def _import_gradio() -> Any:
    try:
        import gradio as gr
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the web demo needs gradio: pip install 'quickstep[serve]' (or run with --no-ui)") from e
    return gr


def _class_choices(num_classes: int, names: list[str] | None = None) -> list[Any]:
    """The class dropdown: 'random', then each class as its index, shown with its name when the bundle has names."""
    if names:
        return [RANDOM_CLASS] + [(str(i) if names[i] == str(i) else f"{i}: {names[i]}", str(i))
                                 for i in range(num_classes)]
    return [RANDOM_CLASS] + [str(i) for i in range(num_classes)]


def _num(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def quality_markdown(quality: Quality | None, backend: str) -> str:
    """The manifest's quality section (written by `quickstep-export report`) for the serving backend, as Markdown:
    FD, class accuracy and batch-1 latency per step count, flags, and the teacher's FD."""
    if quality is None:
        return "*No quality report in this bundle (`quickstep-export report BUNDLE --out DIR` adds one).*"
    per = quality.entries(backend)
    if not per:
        measured = ", ".join(sorted(quality.backends)) or "none"
        return f"*Quality not measured on backend `{backend}` (measured: {measured}).*"
    lines = [f"**Quality as served** ({backend}, n={quality.n if quality.n is not None else '?'}, "
             f"vs {quality.data or 'held-out data'})",
             "", "| steps | FD | class acc | ms @b1 | flagged |", "|---|---|---|---|---|"]
    for steps, e in sorted(per.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        lines.append(f"| {steps} | {_num(e.fd)} | {_num(e.class_accuracy, 3)} | {_num(e.latency_at(1), 3)} | "
                     f"{'**yes**' if e.flagged else 'no'} |")
    t = quality.teacher
    if t is not None:
        lines += ["", f"Teacher ({t.nfe if t.nfe is not None else '?'} NFE): FD {_num(t.fd)}"]
    return "\n".join(lines)


def build_ui(service: GenerationService) -> Any:
    """gr.Blocks whose `generate` event (api_name='generate') returns (images, seed, latency text)."""
    gr = _import_gradio()
    names = list(service.models)
    first = service.resolve(None).bundle

    async def generate(model: str, steps: str, seed: float | None, randomize: bool, class_label: str,
                       n: float) -> tuple[list[Any], int, str]:
        """Run one request through the service; errors become gr.Error with the service's message."""
        from PIL import Image

        use_seed = secrets.randbelow(INT32_MAX + 1) if randomize or seed is None else int(seed)
        label = None if class_label in (None, "", RANDOM_CLASS) else int(class_label)
        try:
            req = GenerateRequest(model=model, n=int(n), steps=int(steps), seed=max(0, min(use_seed, MAX_SEED)),
                                  class_label=label)
            res = await service.generate(req)
        except ServeError as e:
            raise gr.Error(e.message) from e
        except ValueError as e:  # pydantic validation of the UI's own inputs
            raise gr.Error(str(e)) from e
        h = res.images.shape[1]
        up = upscale_nearest(res.images, max(1, DISPLAY_PX // max(1, h)))
        imgs = [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in up]
        cn = service.resolve(res.model).bundle.class_names
        caption = ([f"class {c}" + (f" ({cn[c]})" if cn else "") for c in res.class_labels] if res.class_labels
                   else [None] * len(imgs))
        gallery = [(im, c) if c else im for im, c in zip(imgs, caption, strict=True)]
        text = f"{res.latency_ms:.1f} ms for {len(imgs)} image(s), {res.steps} step(s), model {res.model}"
        return gallery, res.seed, text

    def quality_text(model: str) -> str:
        rt = service.resolve(model)
        return quality_markdown(rt.bundle.quality, rt.backend.name)

    def on_model(model: str) -> tuple[Any, Any, str]:
        b = service.resolve(model).bundle
        return (gr.Dropdown(choices=[str(s) for s in b.steps_supported], value=str(b.default_steps)),
                gr.Dropdown(choices=_class_choices(b.num_classes, b.class_names), value=RANDOM_CLASS,
                            interactive=b.num_classes > 0), quality_text(model))

    with gr.Blocks(title="Quickstep") as demo:
        gr.Markdown("# Quickstep\n1-2 step consistency generators, served by the same micro-batched service as "
                    "`POST /v1/generate`.")
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(choices=names, value=first.name, label="Model")
                quality = gr.Markdown(quality_text(first.name), elem_id="quality")
                steps = gr.Dropdown(choices=[str(s) for s in first.steps_supported], value=str(first.default_steps),
                                    label="Steps")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    randomize = gr.Checkbox(value=True, label="Randomise seed")
                class_label = gr.Dropdown(choices=_class_choices(first.num_classes, first.class_names), value=RANDOM_CLASS,
                                          label="Class label", interactive=first.num_classes > 0)
                n = gr.Slider(1, service.max_n(), value=min(4, service.max_n()), step=1, label="Number of images")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Result", columns=4, format="png", height="auto")
                latency = gr.Textbox(label="Latency", interactive=False)
        model.change(on_model, inputs=[model], outputs=[steps, class_label, quality], api_name=False)
        button.click(generate, inputs=[model, steps, seed, randomize, class_label, n],
                     outputs=[gallery, seed, latency], api_name="generate")
    demo.queue(default_concurrency_limit=None, max_size=service.settings.max_queue)
    return demo


def mount_ui(app: FastAPI, service: GenerationService) -> FastAPI:
    """Mount the demo at /ui (gr.mount_gradio_app; its queue starts inside the app's lifespan), with the queue's
    idle polling slowed to UI_IDLE_POLL_S / UI_PROGRESS_POLL_S."""
    gr = _import_gradio()
    blocks = build_ui(service)
    queue = getattr(blocks, "_queue", None)  # Gradio's private queue object; left alone if it changes shape
    for attr, floor in (("sleep_when_free", UI_IDLE_POLL_S), ("progress_update_sleep_when_free", UI_PROGRESS_POLL_S)):
        if isinstance(getattr(queue, attr, None), float):
            setattr(queue, attr, max(getattr(queue, attr), floor))
    return gr.mount_gradio_app(app, blocks, path=UI_PATH, footer_links=["api"], run_history=False, ssr_mode=False)
