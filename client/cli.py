"""`quickstep`: generate images, list models, check health and benchmark a Quickstep server."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image

from .errors import QuickstepError
from .retry import RetryPolicy
from .sdk import Client, GenerateResult, default_url

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Talk to a Quickstep server (URL from --url, QUICKSTEP_URL or http://127.0.0.1:8000).")

UrlOpt = Annotated[str | None, typer.Option("--url", help="server URL [env QUICKSTEP_URL, default "
                                            "http://127.0.0.1:8000]", show_default=False)]
KeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="QUICKSTEP_API_KEY", show_envvar=True,
                                            help="API key (sent as Authorization: Bearer)")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.001, help="request timeout in seconds")]
RetriesOpt = Annotated[int, typer.Option("--retries", min=0, help="retries on 429/503/connection errors")]


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _client(url: str | None, api_key: str | None, timeout: float, retries: int = 3) -> Client:
    try:
        return Client(url or default_url(), api_key=api_key, timeout=timeout, retry=RetryPolicy(max_retries=retries))
    except ValueError as e:
        raise CliError(str(e)) from None


def make_grid(images: Sequence[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (same size) row-major into a near-square grid with `pad` pixels of black between them."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    mode = "RGB" if any(im.mode not in ("L", "1") for im in images) else "L"
    grid = Image.new(mode, (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad))
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid.paste(im.convert(mode), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def write_generation(result: GenerateResult, out_dir: Path, url: str,
                     class_label: int | None) -> list[Path]:
    """out/000.<ext> + out/000.json (seed, index, model, steps, ...) per image; returns the image paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for im in result.images:
        ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(im.mime, "bin")
        path = out_dir / f"{im.index:03d}.{ext}"
        im.save(path)
        meta = {"file": path.name, "seed": result.seed, "index": im.index, "model": result.model,
                "steps": result.steps, "class_label": im.class_label if im.class_label is not None else class_label,
                "mime": im.mime, "width": im.image.width, "height": im.image.height,
                "latency_ms": result.latency_ms, "url": url,
                "noise": f"numpy.random.default_rng([{result.seed}, {im.index}])"}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        paths.append(path)
    return paths


@app.command()
def generate(
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="number of images")] = 1,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="sampling steps (model default)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="seed (drawn by the server when omitted)")] = None,
    class_label: Annotated[int | None, typer.Option("--class", min=0, help="class label (conditional models)")] = None,
    model: Annotated[str | None, typer.Option("--model", help="model name (server default)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="png | jpeg | webp")] = "png",
    scale: Annotated[int, typer.Option("--scale", min=1, max=16, help="nearest-neighbour upscale")] = 1,
    out: Annotated[Path, typer.Option("-o", "--out", help="output directory")] = Path("out"),
    grid: Annotated[Path | None, typer.Option("--grid", help="grid image path [default: OUT/grid.png]")] = None,
    no_grid: Annotated[bool, typer.Option("--no-grid", help="do not write a grid")] = False,
    url: UrlOpt = None, api_key: KeyOpt = None, timeout: TimeoutOpt = 60.0, retries: RetriesOpt = 3,
) -> None:
    """Generate images into OUT/000.png ... with a sidecar OUT/000.json (seed, index) each, plus a grid."""
    with _client(url, api_key, timeout, retries) as c:
        result = c.generate(n=n, steps=steps, seed=seed, class_label=class_label, model=model, format=fmt,
                            scale=scale)
    paths = write_generation(result, out, c.url, class_label)
    msg = (f"{len(paths)} image(s) from {result.model} (steps={result.steps}, seed={result.seed}, "
           f"server {result.latency_ms:.1f} ms) -> {out}/")
    if not no_grid:
        grid_path = grid if grid is not None else out / "grid.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(result.pil_images).save(grid_path)
        msg += f", grid {grid_path}"
    typer.echo(msg)


@app.command()
def models(url: UrlOpt = None, api_key: KeyOpt = None, timeout: TimeoutOpt = 30.0,
           as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the served models."""
    with _client(url, api_key, timeout) as c:
        infos = c.models()
    if as_json:
        typer.echo(json.dumps([m.model_dump() for m in infos], indent=2))
        return
    rows = [(m.name, m.kind, m.backend, "x".join(map(str, m.image_shape)), str(m.num_classes),
             ",".join(map(str, m.steps_supported)), "yes" if m.ready else "no") for m in infos]
    head = ("name", "kind", "backend", "shape", "classes", "steps", "ready")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        typer.echo("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())


@app.command()
def health(url: UrlOpt = None, api_key: KeyOpt = None, timeout: TimeoutOpt = 10.0) -> None:
    """Liveness and readiness; exit status 0 when ready, 1 otherwise."""
    with _client(url, api_key, timeout, retries=0) as c:
        h = c.health()
    models_txt = ", ".join(f"{k}={'ready' if v else 'loading'}" for k, v in h.models.items()) or "-"
    typer.echo(f"{c.url}: live={'yes' if h.live else 'no'} ready={'yes' if h.ready else 'no'} "
               f"status={h.status} models: {models_txt}")
    if not h.ready:
        raise typer.Exit(1)


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CliError(f"--concurrency must be comma-separated positive integers like 1,8,32; got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise CliError(f"--concurrency must be comma-separated positive integers like 1,8,32; got {text!r}")
    return levels


@app.command()
def bench(
    url: UrlOpt = None, api_key: KeyOpt = None,
    concurrency: Annotated[str, typer.Option("--concurrency", help="comma-separated levels")] = "1,8,32",
    duration: Annotated[float, typer.Option("--duration", min=0.001, help="seconds per level")] = 20.0,
    max_requests: Annotated[int | None, typer.Option("--max-requests", min=1, help="request cap per level")] = None,
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="images per request")] = 1,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="sampling steps")] = 1,
    model: Annotated[str | None, typer.Option("--model", help="model name")] = None,
    class_label: Annotated[int | None, typer.Option("--class", min=0, help="class label")] = None,
    timeout: TimeoutOpt = 60.0,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="untimed requests first")] = 1,
    out: Annotated[Path, typer.Option("--out", help="JSON report; the histogram goes next to it (.png)")] = Path(
        "bench.json"),
) -> None:
    """Closed-loop load test: per level sent/succeeded/failed by status, req/s, img/s, p50/p95/p99 latency."""
    from .bench import BenchConfig, run_bench, write_report

    try:
        cfg = BenchConfig(url=(url or default_url()).rstrip("/"), concurrency=_levels(concurrency),
                          duration_s=duration, max_requests=max_requests, n=n, steps=steps, model=model,
                          class_label=class_label, api_key=api_key, timeout_s=timeout, warmup=warmup)
    except ValueError as e:
        raise CliError(str(e)) from None
    report = asyncio.run(run_bench(cfg))
    json_path, png_path = write_report(report, out)
    for lv in report["levels"]:
        p = lv["latency_ms"]
        lat = "no successes" if p["p50"] is None else f"p50 {p['p50']:.1f} p95 {p['p95']:.1f} p99 {p['p99']:.1f} ms"
        fails = ", ".join(f"{k}: {v}" for k, v in lv["failed_by_status"].items())
        typer.echo(f"c={lv['concurrency']:<4} sent {lv['sent']:<6} ok {lv['succeeded']:<6} failed {lv['failed']}"
                   f"{f' ({fails})' if fails else ''}  {lv['throughput_rps']:.1f} req/s "
                   f"{lv['images_per_s']:.1f} img/s  {lat}")
    typer.echo(f"wrote {json_path} and {png_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console script: one clear line on stderr and a non-zero exit for every failure, never a traceback."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="quickstep")
    except SystemExit as e:  # click's own exit: usage errors (2), --help (0), typer.Exit(code)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (QuickstepError, CliError) as e:
        typer.echo(f"quickstep: error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("quickstep: interrupted", err=True)
        return 130
    except (OSError, RuntimeError, ValueError) as e:
        typer.echo(f"quickstep: error: {type(e).__name__}: {e}", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
