"""The protocols clients already speak, against one real uvicorn on 127.0.0.1 with an API key: OpenAI's images API
through the `openai` SDK, the Open Inference Protocol v2 through `tritonclient.http` (JSON and binary tensors), and
the same pixels for the same seed on every API; every bad input is a 4xx in the API's own error shape."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from quickstep.serve.bundle import bundled_default

from .conftest import serve

KEY = "proto-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
DIGITS = "digits-direct-cm"  # the bundled model: class_names "0".."9", aliases "zero".."nine"
UNCOND = "tiny-consistency"


@pytest.fixture(scope="module")
def server(bundle_dir):
    with serve(bundle=[bundled_default(), bundle_dir], api_keys=[KEY], max_batch=8, max_wait_ms=2,
               max_images_per_request=8, max_body_bytes=65536) as s:
        yield s


def pixels(png: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, C]."""
    a = np.asarray(Image.open(io.BytesIO(png)))
    return a[..., None] if a.ndim == 2 else a


def native(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/generate", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def openai_client(server, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def triton_client(server):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=30)


def triton_infer(server, seeds, labels=None, steps=None, binary=False, model=DIGITS):
    import tritonclient.http as httpclient

    inputs = [httpclient.InferInput("seed", [len(seeds)], "INT64")]
    inputs[0].set_data_from_numpy(np.asarray(seeds, np.int64), binary_data=binary)
    if labels is not None:
        inputs.append(httpclient.InferInput("class_label", [len(labels)], "INT64"))
        inputs[-1].set_data_from_numpy(np.asarray(labels, np.int64), binary_data=binary)
    if steps is not None:
        inputs.append(httpclient.InferInput("steps", [1], "INT32"))
        inputs[-1].set_data_from_numpy(np.asarray([steps], np.int32), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("images", binary_data=binary)]
    # a copy: tritonclient writes Inference-Header-Content-Length into the dict it is given
    return triton_client(server).infer(model, inputs, outputs=outputs, headers=dict(AUTH))


# ----------------------------------------------------------------------------------------------- OpenAI SDK
def test_openai_sdk_images_generate_same_pixels_as_native(server):
    client = openai_client(server)
    res = client.images.generate(model=DIGITS, prompt="a handwritten seven", n=3, size="32x32",
                                 response_format="b64_json", extra_body={"seed": 5, "steps": 2})
    assert res.created > 0 and len(res.data) == 3 and res.size == "32x32" and res.output_format == "png"
    assert [d.revised_prompt for d in res.data] == ["7"] * 3
    ref = native(server, model=DIGITS, n=3, seed=5, steps=2, class_label=7, scale=2)
    for d, im in zip(res.data, ref["images"], strict=True):
        assert d.b64_json == im["b64"]  # byte-identical PNGs: same noise, same batcher, same encoder
        assert pixels(base64.b64decode(d.b64_json)).shape == (32, 32, 1)
    by_alias = client.images.generate(model=DIGITS, prompt="Seven!", extra_body={"seed": 5, "steps": 2})
    assert by_alias.data[0].b64_json != res.data[0].b64_json  # native size, so different PNG bytes ...
    assert np.array_equal(pixels(base64.b64decode(by_alias.data[0].b64_json)),
                          pixels(base64.b64decode(res.data[0].b64_json))[::2, ::2])  # ... of the same pixels


def test_openai_sdk_models_list_and_retrieve(server):
    client = openai_client(server)
    ids = [m.id for m in client.models.list()]
    assert ids == [DIGITS, UNCOND]
    m = client.models.retrieve(DIGITS)
    assert m.id == DIGITS and m.object == "model" and m.owned_by == "quickstep" and m.created > 0


def test_openai_sdk_errors_are_openai_shaped(server):
    import openai

    with pytest.raises(openai.AuthenticationError) as e:
        openai_client(server, key="wrong").images.generate(prompt="7")
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client(server).images.generate(model=DIGITS, prompt="a cat")
    assert e.value.body["param"] == "prompt" and "0, 1, 2" in e.value.body["message"]
    assert "seven" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        openai_client(server).images.generate(model="dall-e-3", prompt="7")
    assert "digits-direct-cm" in e.value.body["message"]


def test_empty_prompt_draws_the_class_from_the_seed(server):
    client = openai_client(server)
    a = client.images.generate(model=DIGITS, prompt="", n=4, extra_body={"seed": 11})
    b = client.images.generate(model=DIGITS, prompt="", n=4, extra_body={"seed": 11})
    assert [d.b64_json for d in a.data] == [d.b64_json for d in b.data]
    ref = native(server, model=DIGITS, n=4, seed=11)  # no class_label: drawn from the seed the same way
    assert [d.b64_json for d in a.data] == [im["b64"] for im in ref["images"]]
    assert [d.model_extra["class_label"] for d in a.data] == [im["class_label"] for im in ref["images"]]


def test_unconditional_model_ignores_the_prompt(server):
    res = openai_client(server).images.generate(model=UNCOND, prompt="anything at all", extra_body={"seed": 3})
    ref = native(server, model=UNCOND, seed=3)
    assert res.data[0].b64_json == ref["images"][0]["b64"] and res.data[0].revised_prompt is None


OPENAI_BAD = [  # (body or raw (content, content-type), status, words the message must contain, param)
    ({"model": "nope", "prompt": "7"}, 404, ["unknown model 'nope'", DIGITS], None),
    ({"model": DIGITS, "prompt": "a cat"}, 400, ["names no class", "0, 1, 2", "seven"], "prompt"),
    ({"model": DIGITS, "prompt": "three or four"}, 400, ["several classes", "3, 4"], "prompt"),
    ({"model": DIGITS, "prompt": "7", "n": 9}, 400, ["n:", "between 1 and 8"], "n"),
    ({"model": DIGITS, "prompt": "7", "n": 0}, 400, ["n:", "1 to 8"], "n"),
    ({"model": DIGITS, "prompt": "7", "size": "17x17"}, 400, ["size", "16x16", "32x32"], "size"),
    ({"model": DIGITS, "prompt": "7", "size": "1024x1024"}, 400, ["size", "256x256"], "size"),
    ({"model": DIGITS, "prompt": "7", "response_format": "url"}, 400, ["url", "b64_json"], "response_format"),
    ({"model": DIGITS, "prompt": "7", "quality": "hd"}, 400, ["quality: unknown field", "size"], "quality"),
    ({"model": DIGITS, "prompt": "7", "steps": 3}, 400, ["steps", "[1, 2]"], "steps"),
    ({"model": DIGITS, "prompt": "7", "class_label": 10}, 400, ["class_label", "0 and 9"], "class_label"),
    ({"model": UNCOND, "prompt": "7", "class_label": 1}, 400, ["unconditional"], "class_label"),
    ({"model": DIGITS, "prompt": 7}, 400, ["prompt", "string"], "prompt"),
    ({"model": DIGITS, "prompt": "7", "seed": -1}, 400, ["seed", "0 to"], "seed"),
    ((b"{not json", "application/json"), 400, ["not valid JSON"], None),
    ((b"prompt=7", "application/x-www-form-urlencoded"), 400, ["Content-Type must be application/json"],
     "Content-Type"),
]


@pytest.mark.parametrize("body,status,words,param", OPENAI_BAD)
def test_openai_bad_input_is_a_4xx_naming_the_problem(server, body, status, words, param):
    url = server.url + "/v1/images/generations"
    if isinstance(body, tuple):
        r = httpx.post(url, content=body[0], headers={**AUTH, "Content-Type": body[1]}, timeout=30)
    else:
        r = httpx.post(url, json=body, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param
    for w in words:
        assert w in err["message"], (w, err["message"])


# ----------------------------------------------------------------------------------------------- tritonclient
@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_infer_same_pixels_as_native(server, binary):
    seeds, labels = [21, 22, 23], [1, 4, 9]
    res = triton_infer(server, seeds, labels, steps=2, binary=binary)
    images = res.as_numpy("images")
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 1)
    out = res.get_output("images")
    assert ("binary_data_size" in (out.get("parameters") or {})) is binary
    for img, s, c in zip(images, seeds, labels, strict=True):
        ref = native(server, model=DIGITS, seed=s, class_label=c, steps=2)
        assert np.array_equal(img, pixels(base64.b64decode(ref["images"][0]["b64"])))


def test_tritonclient_labels_drawn_from_each_seed_and_default_steps(server):
    images = triton_infer(server, [7, 8]).as_numpy("images")
    for img, s in zip(images, [7, 8], strict=True):
        assert np.array_equal(img, pixels(base64.b64decode(native(server, model=DIGITS, seed=s)["images"][0]["b64"])))


def test_tritonclient_metadata_readiness_and_keys(server):
    from tritonclient.utils import InferenceServerException

    c = triton_client(server)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(DIGITS, headers=AUTH)
    meta = c.get_model_metadata(DIGITS, headers=AUTH)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("seed", "INT64", [-1]), ("class_label", "INT64", [-1]), ("steps", "INT32", [1])]
    assert meta["outputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 16, 16, 1]}]
    assert [t["name"] for t in c.get_model_metadata(UNCOND, headers=AUTH)["inputs"]] == ["seed", "steps"]
    assert c.get_server_metadata(headers=AUTH)["extensions"] == ["binary_tensor_data"]
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata(DIGITS)  # no key
    assert e.value.status() == "401" and "API key" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("nope", headers=AUTH)
    assert e.value.status() == "404" and DIGITS in e.value.message()


def _v2(server, body, model=DIGITS, headers=None, content=None):
    h = {**AUTH, **(headers or {})}
    url = f"{server.url}/v2/models/{model}/infer"
    if content is not None:
        return httpx.post(url, content=content, headers=h, timeout=30)
    return httpx.post(url, json=body, headers=h, timeout=30)


def _seed(data=(1,), shape=None, datatype="INT64", name="seed"):
    return {"name": name, "shape": shape or [len(data)], "datatype": datatype, "data": list(data)}


def _binary(shape: list[int], size: int, tail: int) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body: JSON header declaring `size` bytes for seed, then `tail` zero bytes."""
    head = json.dumps({"inputs": [{"name": "seed", "shape": shape, "datatype": "INT64",
                                   "parameters": {"binary_data_size": size}}]}).encode()
    return head + b"\0" * tail, {"Inference-Header-Content-Length": str(len(head))}


V2_BAD = [  # (body or raw content, extra headers, model, status, words)
    ({"inputs": [_seed()]}, {}, "nope", 404, ["unknown model 'nope'", DIGITS]),
    ({"inputs": [_seed(datatype="FP32")]}, {}, DIGITS, 400, ["'seed'", "FP32", "expected INT64"]),
    ({"inputs": [_seed((1, 2, 3, 4), shape=[2, 2])]}, {}, DIGITS, 400, ["'seed'", "[2, 2]", "[B]"]),
    ({"inputs": [_seed((1, 2), shape=[3])]}, {}, DIGITS, 400, ["'seed'", "3 elements", "2"]),
    ({"inputs": [_seed((3,), name="class_label")]}, {}, DIGITS, 400, ["'seed'", "required"]),
    ({"inputs": [_seed((1, 2)), _seed((3,), name="class_label")]}, {}, DIGITS, 400, ["1 labels for 2 seeds"]),
    ({"inputs": [_seed(), _seed((12,), name="class_label")]}, {}, DIGITS, 400, ["class_label", "0 and 9"]),
    ({"inputs": [_seed(), _seed((3,), name="class_label")]}, {}, UNCOND, 400, ["has no such input", "seed, steps"]),
    ({"inputs": [_seed(), _seed((3,), name="steps", datatype="INT32")]}, {}, DIGITS, 400, ["steps", "[1, 2]"]),
    ({"inputs": [_seed(), _seed((1,), name="steps")]}, {}, DIGITS, 400, ["'steps'", "expected INT32"]),
    ({"inputs": [_seed(), _seed(name="noise", datatype="FP32")]}, {}, DIGITS, 400, ["'noise'", "seed, class_label"]),
    ({"inputs": [_seed(range(9))]}, {}, DIGITS, 400, ["seed", "between 1 and 8"]),
    ({"inputs": [_seed((-5,))]}, {}, DIGITS, 400, ["seed", "from 0 to"]),
    ({"inputs": [_seed((1.5,))]}, {}, DIGITS, 400, ["'seed'", "integers"]),
    ({"inputs": [_seed()], "outputs": [{"name": "latents"}]}, {}, DIGITS, 400, ["'latents'", "'images'"]),
    ({"inputs": [_seed()], "parameters": {"sequence_id": 3}}, {}, DIGITS, 400, ["sequence_id", "binary_data_output"]),
    ({"inputs": [_seed()], "parameters": {"timeout": 0}}, {}, DIGITS, 400, ["timeout", "microseconds"]),
    ({"inputs": [{"name": "seed", "shape": [1], "datatype": "INT64"}]}, {}, DIGITS, 400, ["no data"]),
    ({"inputs": [{"name": "seed", "shape": [1], "datatype": "INT64", "data": [1],
                  "parameters": {"binary_data_size": 8}}]}, {}, DIGITS, 400, ["both data and"]),
    ({"inputs": [_seed(datatype="INT65")]}, {}, DIGITS, 400, ["datatype"]),
    ({"inputs": "seed"}, {}, DIGITS, 400, ["inputs"]),
    (b"{not json", {"Content-Type": "application/json"}, DIGITS, 400, ["not valid JSON"]),
    (b"<xml/>", {"Content-Type": "text/xml"}, DIGITS, 415, ["Content-Type", "application/json"]),
    (b"\x1f\x8b", {"Content-Encoding": "gzip"}, DIGITS, 415, ["Content-Encoding 'gzip'", "uncompressed"]),
    (b'{"inputs": []}' + b"\0" * 8, {"Inference-Header-Content-Length": "99"}, DIGITS, 400,
     ["Inference-Header-Content-Length", "22 bytes"]),
    (*_binary([2], 16, 8), DIGITS, 400, ["8 binary bytes", "16 expected"]),
    (*_binary([1], 16, 16), DIGITS, 400, ["binary_data_size 16", "8 bytes"]),
    (*_binary([1], 8, 16), DIGITS, 400, ["8 bytes after the JSON header"]),
]


@pytest.mark.parametrize("body,headers,model,status,words", V2_BAD)
def test_v2_bad_input_is_a_4xx_naming_the_problem(server, body, headers, model, status, words):
    if isinstance(body, bytes):
        r = _v2(server, None, model, headers, content=body)
    else:
        r = _v2(server, body, model, headers)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error"} and isinstance(err["error"], str)
    for w in words:
        assert w in err["error"], (w, err["error"])


def test_v2_json_without_tritonclient_and_request_id(server):
    r = _v2(server, {"id": "req-1", "inputs": [_seed((5,)), _seed((2,), name="class_label")]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == DIGITS
    out = body["outputs"][0]
    img = np.asarray(out["data"], np.uint8).reshape(out["shape"])[0]
    assert np.array_equal(img, pixels(base64.b64decode(native(server, model=DIGITS, seed=5, class_label=2)
                                                       ["images"][0]["b64"])))


# ----------------------------------------------------------------------------------------------- one engine
def test_same_seed_same_pixels_on_every_api(server):
    ref = pixels(base64.b64decode(native(server, model=DIGITS, seed=424242, class_label=3)["images"][0]["b64"]))
    oa = openai_client(server).images.generate(model=DIGITS, prompt="three", extra_body={"seed": 424242})
    v2 = triton_infer(server, [424242], [3], binary=True).as_numpy("images")[0]
    assert np.array_equal(pixels(base64.b64decode(oa.data[0].b64_json)), ref) and np.array_equal(v2, ref)


@pytest.mark.parametrize("value", ["5e-324", "0", "-1", "1.5", "soon", "30001", "99999999999999999999"])
def test_timeout_header_validated_on_every_api(server, value):
    h = {**AUTH, "X-Timeout-Ms": value}
    for url, body in (("/v1/generate", {}), ("/v1/images/generations", {"prompt": "1"}),
                      (f"/v2/models/{DIGITS}/infer", {"inputs": [_seed()]})):
        r = httpx.post(server.url + url, json=body, headers=h, timeout=30)
        assert r.status_code == 422, (url, value, r.text)
        msg = json.dumps(r.json())
        assert "X-Timeout-Ms" in msg and "from 1 to 30000" in msg, msg
    assert httpx.post(server.url + "/v1/generate", json={}, headers={**AUTH, "X-Timeout-Ms": "30000"},
                      timeout=30).status_code == 200


def test_dependency_overrides_swap_the_settings(server):
    """Routes take typed dependencies: overriding get_settings changes the deadline limit the routes enforce."""
    from quickstep.serve.deps import get_settings

    app = server.app
    short = app.state.settings.model_copy(update={"timeout_s": 0.25})
    app.dependency_overrides[get_settings] = lambda: short
    try:
        r = httpx.post(server.url + "/v1/generate", json={}, headers={**AUTH, "X-Timeout-Ms": "1000"}, timeout=30)
        assert r.status_code == 422 and "from 1 to 250" in r.json()["error"]["message"]
    finally:
        app.dependency_overrides.clear()
    assert httpx.post(server.url + "/v1/generate", json={}, headers={**AUTH, "X-Timeout-Ms": "1000"},
                      timeout=30).status_code == 200


def test_metrics_carry_the_api_label(server):
    from .test_http import metric_samples

    native(server, model=DIGITS, seed=1)
    openai_client(server).images.generate(model=DIGITS, prompt="1")
    triton_infer(server, [1])
    httpx.post(server.url + "/v1/images/generations", json={"prompt": "a cat"}, headers=AUTH, timeout=30)
    samples = metric_samples(server, headers=AUTH)["quickstep_requests_total"]
    seen = {(s.labels["api"], s.labels["route"], s.labels["status"]) for s in samples}
    assert {("quickstep", "/v1/generate", "200"), ("openai", "/v1/images/generations", "200"),
            ("openai", "/v1/images/generations", "400"), ("v2", "/v2/models/{name}/infer", "200")} <= seen
    lat = metric_samples(server, headers=AUTH)["quickstep_request_latency_seconds_count"]
    assert {s.labels["api"] for s in lat} >= {"quickstep", "openai", "v2"}


def test_triton_layout_models_match_the_exported_repository(server, tmp_path):
    """NAME_{k}step answers like the model of that name in the Triton repository `quickstep-export triton` writes
    (same inputs, datatypes and dims as its config.pbtxt; output images): one tritonclient script works against
    both. Fed the noise of seed s, it gives the pixels of the seed model for s."""
    import tritonclient.http as httpclient
    from quickstep.export.triton import model_config_message, parse_model_config, write_triton_repository
    from quickstep.serve.service import draw_noise

    repo = write_triton_repository(bundled_default(), tmp_path / "repo")
    names = model_config_message().DESCRIPTOR.file.pool.FindEnumTypeByName("inference.DataType").values_by_number
    c = triton_client(server)
    served = [n for n in repo if not n.endswith("_denoiser")]
    assert served == ["digits-direct-cm_1step", "digits-direct-cm_2step"]
    for name in served:
        cfg = parse_model_config((repo[name] / "config.pbtxt").read_text())
        meta = c.get_model_metadata(name, headers=dict(AUTH))
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
            (i.name, names[i.data_type].name.removeprefix("TYPE_"), [-1, *i.dims]) for i in cfg.input]
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
            (o.name, names[o.data_type].name.removeprefix("TYPE_"), [-1, *o.dims]) for o in cfg.output]
    noise, noise2 = draw_noise(31, 1, (1, 16, 16), 2)
    inputs = []
    for tname, arr, dt in (("noise", noise, "FP32"), ("noise2", noise2, "FP32"),
                           ("class_labels", np.array([[7]], np.int64), "INT64")):
        inputs.append(httpclient.InferInput(tname, list(arr.shape), dt))
        inputs[-1].set_data_from_numpy(arr, binary_data=True)
    raw = c.infer("digits-direct-cm_2step", inputs, headers=dict(AUTH)).as_numpy("images")
    assert np.array_equal(raw, triton_infer(server, [31], [7], steps=2).as_numpy("images"))
    r = _v2(server, {"inputs": [{"name": "noise", "shape": [1, 1, 16, 16], "datatype": "FP32",
                                 "data": noise.ravel().tolist()}]}, model="digits-direct-cm_1step")
    assert r.status_code == 400 and "class_labels" in r.json()["error"] and "required" in r.json()["error"]
    r = _v2(server, {"inputs": [{"name": "noise", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64},
                                {"name": "class_labels", "shape": [1, 1], "datatype": "INT64", "data": [1]}]},
            model="digits-direct-cm_1step")
    assert r.status_code == 400 and "[B, 1, 16, 16]" in r.json()["error"]
    r = _v2(server, {"inputs": [_seed()]}, model="digits-direct-cm_3step")
    assert r.status_code == 404 and "digits-direct-cm_2step" in r.json()["error"]


def test_cors_preflight_admits_the_protocol_headers(bundle_dir):
    """With CORS on, a browser may send X-Timeout-Ms and the v2 binary header, and read them back."""
    import asyncio

    from quickstep.serve.app import create_app
    from quickstep.serve.settings import ServeSettings

    app = create_app(ServeSettings(bundle=[bundle_dir], cors_origins=["http://app.example"], ui=False))

    async def preflight() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.options(f"/v2/models/{UNCOND}/infer", headers={
                "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-timeout-ms, inference-header-content-length, authorization"})

    r = asyncio.run(preflight())
    assert r.status_code == 200, r.text
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "x-timeout-ms" in allowed and "inference-header-content-length" in allowed


def test_body_limit_applies_to_every_api_in_its_own_shape(server):
    big = b"x" * 70_000  # over this server's 65536-byte limit
    r = httpx.post(server.url + "/v1/images/generations", content=big, headers={**AUTH, "Content-Type":
                                                                                  "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert "65536" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v2/models/{DIGITS}/infer", content=big, headers=AUTH, timeout=30)
    assert r.status_code == 413 and "65536" in r.json()["error"]
    r = httpx.post(server.url + "/v1/generate", content=big, headers=AUTH, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_tritonclient_model_version_1(server):
    """tritonclient's model_version="1" uses the /versions/1/ routes; any other version is a 404."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    c = triton_client(server)
    assert c.get_model_metadata(DIGITS, model_version="1", headers=dict(AUTH))["name"] == DIGITS
    assert c.is_model_ready(DIGITS, model_version="1", headers=dict(AUTH))
    seed = httpclient.InferInput("seed", [1], "INT64")
    seed.set_data_from_numpy(np.array([9], np.int64))
    res = c.infer(DIGITS, [seed], model_version="1", headers=dict(AUTH))
    assert np.array_equal(res.as_numpy("images"), triton_infer(server, [9]).as_numpy("images"))
    with pytest.raises(InferenceServerException) as e:
        c.infer(DIGITS, [seed], model_version="2", headers=dict(AUTH))
    assert e.value.status() == "404" and "only version is '1'" in e.value.message()
