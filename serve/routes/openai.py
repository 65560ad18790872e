"""POST /v1/images/generations: OpenAI's images API on the same service and batcher as /v1/generate.

The prompt names a class (manifest class_names / class_aliases), `size` picks the integer upscale, Quickstep's
`steps`, `seed` and `class_label` ride along as extra body fields (the openai SDK's `extra_body`).  Image k of a
request with seed s has the pixels of /v1/generate's image k for the same seed, class and steps.  Errors use
OpenAI's shape {"error": {message, type, param, code}}, 400 for bad input.
"""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..deps import ServiceDep, TimeoutDep
from ..errors import InvalidRequest
from ..schemas import GenerateRequest, ImageData, ImagesGenerateRequest, ImagesResponse, OpenAIErrorResponse
from ..service import class_for_prompt, class_names, image_sizes, scale_for_size
from .generate import disconnect_watch

router = APIRouter(tags=["openai"])
_ERRORS = {code: {"model": OpenAIErrorResponse} for code in (400, 401, 404, 413, 422, 429, 431, 503, 504)}


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
async def images_generations(body: ImagesGenerateRequest, request: Request, service: ServiceDep,
                             timeout_s: TimeoutDep) -> Response:
    """OpenAI-compatible image generation: {created, data: [{b64_json, revised_prompt}]} (+ seed, model, steps)."""
    if body.response_format == "url":
        raise InvalidRequest("response_format: 'url' is not supported: this server does not host generated images; "
                             "use 'b64_json'", param="response_format")
    b = service.resolve(body.model).bundle
    scale = scale_for_size(b, body.size)
    label = body.class_label if body.class_label is not None else class_for_prompt(b, body.prompt)
    req = GenerateRequest(model=b.name, n=body.n, steps=body.steps, seed=body.seed, class_label=label,
                          format=body.output_format, scale=scale)
    async with disconnect_watch(request) as gone:
        res = await service.generate(req, timeout_s=timeout_s, disconnected=gone.is_set)
    names = class_names(b)
    out = ImagesResponse(
        created=int(time.time()), output_format=body.output_format, size=image_sizes(b)[scale - 1], model=res.model,
        steps=res.steps, seed=res.seed,
        data=[ImageData(b64_json=base64.b64encode(data).decode("ascii"),
                        revised_prompt=None if res.class_labels is None else names[res.class_labels[i]],
                        class_label=None if res.class_labels is None else res.class_labels[i])
              for i, data in enumerate(res.encoded)])
    return Response(out.model_dump_json(), media_type="application/json")
