"""The Serve app over real HTTP: a real local Serve app (tiny model, CPU) with its caches on the real S3 server.

The session's auth app (``auth_api``, see serve_fixtures): auth on (every client here sends the token), an LRU
of 2 subjects on its one replica, a small upload limit and a small queue, so that each contract of the API can be
reached: errors case by case, auth, the LRU, batches that mix subjects, concurrency, overload (503) and timeouts
(504). Routing by subject across replicas runs on the app with two generator replicas (``open_api``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from dreamcache import storage
from serve_fixtures import AUTH_LRU_SLOTS as LRU_SLOTS
from serve_fixtures import AUTH_MAX_UPLOAD as MAX_UPLOAD
from serve_fixtures import DEFAULT_ROUTING, OPEN_REPLICAS, OTHER_ROUTING, Api, reference_png

def generator_stats(api: Api) -> dict:
    """Counters of the app's generator replica (the auth app has one)."""
    from ray import serve

    return serve.get_deployment_handle("Generator", api.name).stats.remote().result(timeout_s=60)


def register(client: httpx.Client, subject_id: str, *pngs: bytes) -> httpx.Response:
    files = [("images", (f"ref{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    return client.post("/v1/subjects", data={"subject_id": subject_id}, files=files)


def generate(client: httpx.Client, subject_id: str, **params) -> httpx.Response:
    body = {"subject_id": subject_id, "prompt": "a photo on a beach", "steps": 2, "seed": 1, **params}
    return client.post("/v1/generate", json=body)


def grid_body(subject_ids: list[str], **params) -> dict:
    return {"subject_ids": subject_ids, "prompts": [{"prompt": "a photo on a beach"}], "steps": 2, "seeds": [1],
            **params}


def grid_lines(client: httpx.Client, body: dict) -> list[dict]:
    """POST /v1/grids, read as the stream it is: one JSON object per line."""
    with client.stream("POST", "/v1/grids", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.iter_lines() if line]


def sse_events(response: httpx.Response):
    """(event, data) of a server-sent event stream, as they arrive."""
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: "):])


def all_generator_stats(api: Api) -> list[dict]:
    from ray import serve

    return serve.get_deployment_handle("Generator", api.name).broadcast("stats").results(timeout_s=60)


def pixels(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB")).astype(np.int16)


def field_of(response: httpx.Response) -> list[str]:
    """The fields a 422 names (the last element of each error's loc)."""
    return [str(error["loc"][-1]) for error in response.json()["detail"]]


# -- ops, docs, auth ------------------------------------------------------------------------------------------------
def test_healthz_and_the_page_are_open_and_openapi_lists_the_v1_routes(auth_api):
    with auth_api.client(token=None) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        page = anonymous.get("/")  # a browser loads the page without a header; the page then asks for the token
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert auth_api.token not in page.text
    with auth_api.client() as client:
        assert client.get("/docs").status_code == 200
        openapi = client.get("/openapi.json").json()
    assert {"/v1/subjects", "/v1/subjects/{subject_id}", "/v1/generate", "/healthz"} <= set(openapi["paths"])
    # The documented limits are the enforced ones (the model behind the schema is the request validator).
    request = openapi["components"]["schemas"]["GenerateRequest"]["properties"]
    assert (request["num_images"]["minimum"], request["num_images"]["maximum"]) == (1, 8)
    assert (request["steps"]["minimum"], request["steps"]["maximum"]) == (1, 150)


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_every_route_but_healthz_and_the_page_needs_the_bearer_token(auth_api, token):
    with auth_api.client(token=token) as client:
        calls = [client.get("/docs"), client.get("/openapi.json"),
                 client.get("/v1/subjects/anything"), generate(client, "anything"),
                 register(client, "anything", reference_png(0)),
                 client.get("/v1/subjects"), client.delete("/v1/subjects/anything"),
                 client.post("/v1/grids", json=grid_body(["anything"])),
                 client.post("/v1/generate", json={"subject_id": "anything", "prompt": "x"},
                             headers={"Accept": "text/event-stream"})]
        assert [r.status_code for r in calls] == [401] * len(calls)
        assert all(r.headers["www-authenticate"] == "Bearer" for r in calls)
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200


# -- subjects ---------------------------------------------------------------------------------------------------------
def test_register_subject_then_same_images_again_is_200_without_recomputing(auth_api):
    reference = reference_png(11)
    with auth_api.client() as client:
        created = register(client, "dog-11", reference)
        assert created.status_code == 201, created.text
        meta = created.json()
        assert meta["subject_id"] == "dog-11" and meta["num_references"] == 1
        assert meta["cache_uri"] == f"{auth_api.caches}/dog-11.safetensors" and storage.exists(meta["cache_uri"])
        computed = generator_stats(auth_api)["subjects_created"]

        again = register(client, "dog-11", reference)
        assert again.status_code == 200 and again.json()["source_hashes"] == meta["source_hashes"]
        assert generator_stats(auth_api)["subjects_created"] == computed  # nothing was recomputed

        fetched = client.get("/v1/subjects/dog-11")
        assert fetched.status_code == 200 and fetched.json()["source_hashes"] == meta["source_hashes"]

        taken = register(client, "dog-11", reference_png(12))  # same id, other images
        assert taken.status_code == 409 and taken.json()["field"] == "subject_id"


def test_register_multi_reference_subject_and_from_image_uris(auth_api):
    with auth_api.client() as client:
        multi = register(client, "cat-multi", reference_png(21), reference_png(22))
        assert multi.status_code == 201 and multi.json()["num_references"] == 2
        # A subject no replica holds: its metadata comes from the stored file's header alone.
        blob = storage.read_bytes(multi.json()["cache_uri"])
        storage.write_bytes(f"{auth_api.caches}/cat-copied.safetensors", blob)
        copied = client.get("/v1/subjects/cat-copied")
        assert copied.status_code == 200, copied.text
        assert (copied.json()["num_references"], copied.json()["bytes"]) == (2, len(blob))
        assert copied.json()["source_hashes"] == multi.json()["source_hashes"]
        storage.write_bytes(f"{auth_api.caches}/cat-broken.safetensors", b"not a cache")
        assert client.get("/v1/subjects/cat-broken").status_code == 409

        uri = f"{auth_api.uploads}/cat.png"
        storage.write_bytes(uri, reference_png(23))
        from_uri = client.post("/v1/subjects", json={"subject_id": "cat-uri", "image_uris": [uri]})
        assert from_uri.status_code == 201, from_uri.text
        assert from_uri.json()["num_references"] == 1

        for bad_uri in ("/etc/passwd", f"{auth_api.uploads}/../caches/cat-multi.safetensors", f"{auth_api.caches}/x.png",
                        f"{auth_api.uploads}/missing.png", "http://example.com/a.png"):
            refused = client.post("/v1/subjects", json={"subject_id": "cat-bad", "image_uris": [bad_uri]})
            assert refused.status_code == 422, (bad_uri, refused.text)
            assert field_of(refused) == ["0"] and refused.json()["detail"][0]["loc"][1] == "image_uris"
        assert client.get("/v1/subjects/cat-bad").status_code == 404


def test_upload_errors_get_their_status_and_name_the_field(auth_api):
    truncated = reference_png(31)[:200]
    big = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > MAX_UPLOAD
    with auth_api.client() as client:
        not_image = register(client, "x-text", b"this is not an image at all")
        assert not_image.status_code == 415 and not_image.json()["field"] == "images.0"
        assert register(client, "x-trunc", truncated).status_code == 422
        too_big = register(client, "x-big", buffer.getvalue())
        assert too_big.status_code == 413 and too_big.json()["field"] == "images.0"
        # A body over the whole-request limit is refused from its Content-Length, before it is read.
        huge = client.post("/v1/subjects", content=b"0" * (4 * MAX_UPLOAD + 70_000),
                           headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert huge.status_code == 413
        for unsafe in ("../etc", "a/b", ".hidden", "", "x" * 129, "naïve"):
            refused = register(client, unsafe, reference_png(32))
            assert refused.status_code == 422 and field_of(refused) == ["subject_id"], unsafe
        assert field_of(client.post("/v1/subjects", data={"subject_id": "no-images"})) == ["images"]
        too_many = register(client, "x-many", *(reference_png(40 + i) for i in range(4)))
        assert too_many.status_code == 422
        assert client.post("/v1/subjects", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
        garbage = client.post("/v1/subjects", content=b"--x\r\nnot a part", headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert garbage.status_code == 422, garbage.text
        bad_path = client.get("/v1/subjects/.hidden")
        assert bad_path.status_code == 422 and bad_path.json()["detail"][0]["loc"] == ["path", "subject_id"]
        assert client.get("/v1/subjects/never-registered").status_code == 404
        for subject in ("x-text", "x-trunc", "x-big", "x-many"):  # nothing was stored for a refused upload
            assert not storage.exists(f"{auth_api.caches}/{subject}.safetensors")


# -- generation -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, field", [
    ({"num_images": 0}, "num_images"), ({"num_images": 9}, "num_images"),
    ({"steps": 0}, "steps"), ({"steps": 151}, "steps"),
    ({"guidance_scale": -1}, "guidance_scale"), ({"guidance_scale": 30.5}, "guidance_scale"),
    ({"image_guidance_scale": 31}, "image_guidance_scale"), ({"guidance": "average"}, "guidance"),
    ({"height": 60}, "height"), ({"width": 8}, "width"), ({"height": 4096}, "height"),
    ({"seed": -1}, "seed"), ({"prompt": ""}, "prompt"), ({"prompt": None}, "prompt"), ({"colour": "red"}, "colour"),
    ({"subject_id": "../secrets"}, "subject_id"), ({"subject_id": "a b"}, "subject_id"),
])
def test_generate_out_of_range_input_is_422_naming_the_field(auth_api, change, field):
    body = {"subject_id": "dog-11", "prompt": "a photo", "steps": 2, **change}
    with auth_api.client() as client:
        response = client.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    assert field in field_of(response)


def test_generate_other_client_errors(auth_api):
    with auth_api.client() as client:
        assert generate(client, "nobody-registered-this").status_code == 404
        assert client.post("/v1/generate", content=b'{"subject_id": ', headers={"Content-Type": "application/json"}).status_code == 422
        assert field_of(client.post("/v1/generate", json={"prompt": "x"})) == ["subject_id"]
        several_png = client.post("/v1/generate", json={"subject_id": "dog-11", "prompt": "x", "num_images": 2},
                                  headers={"Accept": "image/png"})
        assert several_png.status_code == 406
        bad_timeout = client.post("/v1/generate", json={"subject_id": "dog-11", "prompt": "x"},
                                  headers={"X-DreamCache-Timeout": "soon"})
        assert bad_timeout.status_code == 422 and bad_timeout.json()["detail"][0]["loc"][0] == "header"


def test_generate_json_and_png_same_seed_same_image(auth_api):
    with auth_api.client() as client:
        assert register(client, "fox", reference_png(51)).status_code == 201
        first = generate(client, "fox", num_images=2, seed=123, height=128, width=64)
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["parameters"] | {"seed": 123, "num_images": 2, "height": 128, "width": 64} == body["parameters"]
        assert len(body["images"]) == 2 and body["images"][0] != body["images"][1]  # image i has seed + i
        assert pixels(body["images"][0]).shape == (128, 64, 3)

        second = generate(client, "fox", num_images=2, seed=123, height=128, width=64)
        assert second.json()["images"] == body["images"]
        assert generate(client, "fox", seed=124, height=128, width=64).json()["images"][0] != body["images"][0]

        # Bit-identical when computed the same way; a request sharing a UNet batch with others may differ by
        # rounding (the kernels' summation order depends on the batch size): compared with a tolerance below.
        single = generate(client, "fox", seed=123, height=128, width=64).json()["images"][0]
        png = client.post("/v1/generate", headers={"Accept": "image/png"}, json={
            "subject_id": "fox", "prompt": "a photo on a beach", "steps": 2, "seed": 123, "height": 128, "width": 64})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert base64.b64encode(png.content).decode() == single
        assert np.abs(pixels(single) - pixels(body["images"][0])).max() <= 2

        unseeded = client.post("/v1/generate", json={"subject_id": "fox", "prompt": "a cat", "steps": 2}).json()
        again = generate(client, "fox", prompt="a cat", seed=unseeded["parameters"]["seed"])
        assert again.json()["images"] == unseeded["images"]  # the seed a request got is enough to redo it


def subjects_sharing_a_replica(client: httpx.Client, prefix: str, first_seed: int) -> tuple[str, str]:
    """Two new subjects held by one replica (the one that cached each, named by its answer): at most three
    registrations on two replicas. A batch can only mix subjects that one replica serves."""
    holders: dict[str, list[str]] = {}
    for i in range(OPEN_REPLICAS + 1):
        subject = f"{prefix}-{'abc'[i]}"
        created = register(client, subject, reference_png(first_seed + i))
        assert created.status_code == 201, created.text
        holders.setdefault(created.headers[REPLICA], []).append(subject)
        pair = next((subjects for subjects in holders.values() if len(subjects) == 2), None)
        if pair:
            return pair[0], pair[1]
    raise AssertionError(f"no two subjects on one replica: {holders}")


# auth: the default routing on one replica; other: the other routing, on two (see serve_fixtures)
@pytest.mark.parametrize("app", ["auth", "other"])
def test_a_batch_mixes_subjects_each_sample_with_its_own_cache(app, serve_apps):
    # A strong image guidance makes the cache visible in the tiny model's pixels.
    params = {"image_guidance_scale": 30.0, "steps": 3, "prompt": "a toy"}
    api = serve_apps.api(app)
    with api.client() as client:
        pair = subjects_sharing_a_replica(client, "mix", 61)
        alone = {s: pixels(generate(client, s, seed=7, **params).json()["images"][0]) for s in pair}

        jobs = [(s, seed) for seed in (7, 8, 9, 10) for s in pair]
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(lambda job: generate(client, job[0], seed=job[1], **params), jobs))
    assert [r.status_code for r in responses] == [200] * len(jobs)
    bodies = [r.json() for r in responses]
    # Serve would split a batch by multiplexed id: serve_batching.outside_request is what mixes them under the
    # multiplexed routing; under subject affinity there is no such id.
    assert max(b["server"]["batch_subjects"] for b in bodies) >= 2, [b["server"] for b in bodies]
    for (subject, seed), body in zip(jobs, bodies):
        if seed == 7:  # same seed and parameters as alone: the same image, up to batch-size rounding
            other = pair[1] if subject == pair[0] else pair[0]
            own = np.abs(pixels(body["images"][0]) - alone[subject])
            assert own.max() <= 2
            assert own.mean() < np.abs(pixels(body["images"][0]) - alone[other]).mean() / 4


def test_lru_with_more_subjects_than_slots(auth_api):
    subjects = [f"lru-{i}" for i in range(LRU_SLOTS + 1)]
    with auth_api.client() as client:
        for i, subject in enumerate(subjects):
            assert register(client, subject, reference_png(70 + i)).status_code == 201
        stats = generator_stats(auth_api)
        assert subjects[0] not in stats["resident"] and set(subjects[1:]) <= set(stats["resident"])
        assert len(stats["resident"]) == LRU_SLOTS

        reloaded = generate(client, subjects[0]).json()
        assert reloaded["server"]["cache"] == "loaded"  # read back from the store
        assert generate(client, subjects[0]).json()["server"]["cache"] == "hit"
        after = generator_stats(auth_api)
    assert after["loads"] > stats["loads"] and after["evictions"] > stats["evictions"]
    assert len(after["resident"]) == LRU_SLOTS and subjects[0] in after["resident"]


def test_concurrent_requests_for_several_subjects(auth_api):
    with auth_api.client() as client:
        jobs = [("fox", 1), ("mix-a", 2), ("lru-0", 3), ("fox", 4), ("mix-b", 5), ("cat-uri", 6)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(lambda job: generate(client, job[0], seed=job[1], num_images=1), jobs))
    assert [r.status_code for r in responses] == [200] * len(jobs), [r.text[:200] for r in responses]
    assert [r.json()["subject_id"] for r in responses] == [s for s, _ in jobs]


# -- routing across replicas ------------------------------------------------------------------------------------------
REPLICA = "x-dreamcache-replica"


def wait_until_routed(client: httpx.Client, subject_id: str, holder: str, streak: int = 20,
                      timeout: float = 60) -> None:
    """Until the ingress's router knows that ``holder`` holds the subject: GET /v1/subjects/{id} (routed by subject
    like a generate, but it loads nothing) answered from ``holder`` ``streak`` times in a row.

    Replicas report the subjects they hold every 0.1 s, through the controller; until a report reaches the router,
    it sends the subject's requests to a replica holding the fewest subjects it knows of, which may be the holder
    by chance (a streak of 20 such chances: one in a million) or by rule (the replica that got the subject for
    holding the fewest still does, until another report arrives); the wait starts 1 s after the registration,
    ten times the report period, so that the last report is in. (Under subject affinity the router needs no
    report: the subject's home is a hash, and the first answer already comes from it.)"""
    time.sleep(1.0)
    deadline, run = time.monotonic() + timeout, 0
    while run < streak:
        assert time.monotonic() < deadline, f"requests for {subject_id} never settled on replica {holder}"
        answer = client.get(f"/v1/subjects/{subject_id}")
        assert answer.status_code == 200, answer.text
        run = run + 1 if answer.headers[REPLICA] == holder else 0


def subjects_on_every_replica(client: httpx.Client, prefix: str, first_seed: int) -> dict[str, str]:
    """New subjects until every replica holds one; each registration is waited on until the router sends the
    subject's requests to its holder. Returned: the first subject of each replica, with that replica (one subject
    each, so that the tests' concurrent requests load the replicas evenly: the affinity router gives way to load).

    Multiplexed routing sends a new subject to a replica holding the fewest subjects, so ``OPEN_REPLICAS + 1``
    registrations cover both replicas whatever earlier tests left there; subject affinity sends it to its home by
    hashing, so each registration covers the other replica with probability 1/2: twelve leave a chance of 1/2048
    of never doing so."""
    holders: dict[str, str] = {}
    for i in range(12):
        subject = f"{prefix}-{i}"
        created = register(client, subject, reference_png(first_seed + i))
        assert created.status_code == 201, created.text
        holders[subject] = created.headers[REPLICA]
        wait_until_routed(client, subject, holders[subject])
        if len(set(holders.values())) == OPEN_REPLICAS:
            firsts = {holder: subject for subject, holder in reversed(holders.items())}
            return {subject: holder for holder, subject in firsts.items()}
    raise AssertionError(f"12 subjects did not cover {OPEN_REPLICAS} replicas: {holders}")


@pytest.mark.parametrize("app", ["open", "other"])  # both routings (see serve_fixtures)
def test_requests_for_a_subject_go_to_the_replica_that_holds_its_cache(app, serve_apps):
    """Two generator replicas. New subjects cover both replicas (see subjects_on_every_replica), and every later
    request for a subject, one after another or concurrent, goes to the replica that holds its cache (a hit)."""
    tag = uuid.uuid4().hex[:6]
    with serve_apps.api(app).client() as client:
        holders = subjects_on_every_replica(client, f"route-{tag}", 90)
        for seed in (1, 2):
            for subject, holder in holders.items():
                answer = generate(client, subject, seed=seed, steps=1)
                assert answer.status_code == 200, answer.text
                server = answer.json()["server"]
                assert (server["replica"], answer.headers[REPLICA], server["cache"]) == (holder, holder, "hit")

        jobs = [subject for subject in holders for _ in range(2)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda subject: generate(client, subject, steps=1), jobs))
        assert [(a.status_code, a.json()["server"]["replica"], a.json()["server"]["cache"]) for a in answers] == \
            [(200, holders[subject], "hit") for subject in jobs]


def test_overload_answers_503_with_retry_after(auth_api):
    with auth_api.client() as client, ThreadPoolExecutor(31) as pool:
        # Keep the replica's device busy for a few seconds (the request is abandoned at its 3 s deadline)...
        busy = pool.submit(client.post, "/v1/generate", headers={"X-DreamCache-Timeout": "3"},
                           json={"subject_id": "fox", "prompt": "x", "steps": 150, "num_images": 8})
        time.sleep(0.8)
        # ...while a burst arrives: 7 more fit the replica (8 ongoing), 16 may queue, the rest must be refused.
        responses = list(pool.map(lambda i: generate(client, "fox", seed=i, steps=2), range(30)))
        assert busy.result().status_code == 504
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses
    assert all(r.headers["retry-after"].isdigit() for r in responses if r.status_code == 503)


def test_timeout_answers_504_and_stops_the_work(auth_api):
    before = generator_stats(auth_api)["abandoned"]
    with auth_api.client() as client:
        started = time.monotonic()
        slow = client.post("/v1/generate", headers={"X-DreamCache-Timeout": "1"},
                           json={"subject_id": "fox", "prompt": "x", "steps": 150, "num_images": 8, "seed": 1})
        assert slow.status_code == 504, slow.text
        assert time.monotonic() - started < 60
        # The replica stopped the abandoned batch between steps and serves the next request.
        assert generate(client, "fox").status_code == 200
    assert generator_stats(auth_api)["abandoned"] > before


# -- settings, config and CLI (no Ray needed) -------------------------------------------------------------------------
def test_settings_refuse_unknown_and_out_of_range_args():
    from pipelines.serve.settings import ServeSettings, SettingsError

    base = {"model": "m", "caches": "c"}
    with pytest.raises(SettingsError, match="unknown serve app argument"):
        ServeSettings.model_validate({**base, "max_batchsize": 8})
    with pytest.raises(SettingsError, match="max_batch_size"):
        ServeSettings.model_validate({**base, "max_batch_size": 4})
    with pytest.raises(SettingsError, match="caches"):
        ServeSettings.model_validate({"model": "m"})
    with pytest.raises(SettingsError, match="min_side"):
        ServeSettings.model_validate({**base, "min_side": 60})
    settings = ServeSettings.model_validate({**base, "autoscaling": {"min_replicas": 0, "max_replicas": 4}})
    options = settings.generator_options(cluster_has_gpus=True)
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4} and "num_replicas" not in options
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert ServeSettings.model_validate(settings.model_dump()) == settings


@pytest.mark.parametrize("bad, field", [
    ({"replicas": 0}, "replicas"), ({"replicas": True}, "replicas"), ({"dtype": "fp8"}, "dtype"),
    ({"request_timeout_s": 0}, "request_timeout_s"), ({"max_queued_requests": 0}, "max_queued_requests"),
    ({"model": " "}, "model"), ({"allowed_image_prefixes": "http://x/"}, "allowed_image_prefixes"),
    ({"min_side": 128, "max_side": 64}, "max_side"),
])
def test_a_bad_setting_is_one_line_naming_its_field(bad, field):
    from pipelines.serve.settings import ServeSettings, SettingsError

    with pytest.raises(SettingsError) as failed:
        ServeSettings.model_validate({"model": "m", "caches": "c", **bad})
    message = str(failed.value)
    assert message.startswith(f"'{field}': ") and "\n" not in message, message


def test_settings_are_frozen_and_refuse_unknown_keys_on_every_path():
    from pydantic import ValidationError

    from pipelines.serve.settings import ServeSettings

    settings = ServeSettings(model="m", caches="c")
    with pytest.raises(ValidationError, match="frozen"):
        settings.replicas = 2
    with pytest.raises(ValidationError, match="max_batchsize"):  # extra="forbid", not only in model_validate
        ServeSettings(model="m", caches="c", max_batchsize=8)


def test_serve_validates_the_yaml_args_through_the_builders_type_hint(monkeypatch):
    """What `serve run`/`serve deploy` do with the config's ``args``: Serve validates them into ServeSettings by
    build_app's type hint before calling it (a typo fails there, in one line), and the app is built from them."""
    from pathlib import Path

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what Serve's build calls

    import pipelines.serve.app as app_module
    from pipelines.serve.settings import ServeSettings, SettingsError

    config = yaml.safe_load((Path(__file__).parents[1] / "infra/serve/serve-config.yaml").read_text())
    (app,) = config["applications"]
    seen = []
    # The config names S3 objects and a mounted token: here only the validation of its args is under test.
    monkeypatch.setattr(app_module, "check_inputs", lambda settings, **_: seen.append(settings))
    monkeypatch.setattr(app_module, "resolve_api_token", lambda settings: None)
    with pytest.raises(SettingsError, match="unknown serve app argument.*max_batchsize") as failed:
        call_user_app_builder_with_args_if_necessary(app_module.build_app, {**app["args"], "max_batchsize": 8})
    assert all(entry.name != "build_app" for entry in failed.traceback), "Serve, not build_app, validated"
    built = call_user_app_builder_with_args_if_necessary(app_module.build_app, dict(app["args"]))
    assert seen == [ServeSettings.model_validate(app["args"])]
    generator, settings = built._bound_deployment.init_args
    assert settings == seen[0] and settings.allowed_image_prefixes == ("s3://dreamcache-uploads/",)


def test_routing_setting_names_the_router_and_the_fixtures_cover_both():
    from ray.serve.config import RequestRouterConfig

    from pipelines.serve.routing import SubjectAffinityRouter
    from pipelines.serve.settings import ROUTINGS, ServeSettings, SettingsError

    base = {"model": "m", "caches": "c"}
    assert len(ROUTINGS) == 2  # the fixtures run the default and the one other (serve_fixtures.OTHER_ROUTING)
    with pytest.raises(SettingsError, match="routing"):
        ServeSettings.model_validate({**base, "routing": "random"})
    assert "request_router_config" not in ServeSettings.model_validate({**base, "routing": "multiplexed"}) \
        .generator_options(cluster_has_gpus=False)
    config = ServeSettings.model_validate({**base, "routing": "subject_affinity", "max_batch_size": 16}) \
        .generator_options(cluster_has_gpus=False)["request_router_config"]
    router = SubjectAffinityRouter
    assert isinstance(config, RequestRouterConfig)
    assert config.request_router_class == f"{router.__module__}.{router.__qualname__}"
    assert config.request_router_kwargs == {"imbalance_slack": 16}


def test_affinity_preference_is_a_stable_home_that_gives_way_to_load():
    from pipelines.serve.routing import preference, rendezvous_order, routing_key
    from pipelines.serve.schema import GenerateJob

    replicas = ["r1", "r2", "r3"]
    subjects = [f"s{i}" for i in range(3000)]
    homes = {s: rendezvous_order(s, replicas)[0] for s in subjects}
    assert all(rendezvous_order(s, list(reversed(replicas)))[0] == homes[s] for s in subjects[:100])  # no order
    share = {r: sum(h == r for h in homes.values()) / len(subjects) for r in replicas}
    assert all(0.30 < v < 0.37 for v in share.values()), share
    # A replica leaving moves only the subjects it was home to.
    after = {s: rendezvous_order(s, ["r1", "r2"])[0] for s in subjects}
    assert all(after[s] == homes[s] for s in subjects if homes[s] != "r3")

    subject = "s0"
    home, second, third = rendezvous_order(subject, replicas)
    idle = dict.fromkeys(replicas, 0)
    assert preference(subject, idle, slack=8) == [home, second, third]
    assert preference(subject, dict.fromkeys(replicas, None), slack=8)[0] == home  # nothing known: the home
    assert preference(subject, {**idle, home: 8}, slack=8)[0] == home  # within one batch: affinity wins
    assert preference(subject, {**idle, home: 9}, slack=8) == [second, third, home]  # beyond: load wins
    assert preference(subject, {home: 9, second: None, third: 0}, slack=8) == [second, third, home]

    job = GenerateJob(subject, "p", None, 1, 2, 7.5, 0.4, "compositional", 0, 64, 64, deadline=0.0)
    assert [routing_key(a) for a in ([job], ("s1", []), (), (3,))] == [subject, "s1", None, None]


def test_subject_lru_shares_a_load_and_evicts_the_least_recently_used():
    from pipelines.serve.generator import ResidentCache, SubjectLRU

    loads: list[str] = []
    evicted: list[str] = []

    async def load(subject_id: str) -> ResidentCache:
        loads.append(subject_id)
        await asyncio.sleep(0.05)
        return ResidentCache(subject_id, object(), evicted.append)  # type: ignore[arg-type]

    async def scenario() -> None:
        lru = SubjectLRU(load, capacity=2)
        first = await asyncio.gather(*(lru("a") for _ in range(3)))  # concurrent misses: one load
        assert loads == ["a"] and all(entry is first[0] for entry in first)
        waiter = asyncio.ensure_future(lru("b"))
        await asyncio.sleep(0)
        waiter.cancel()  # a caller that goes away does not cancel the load the others wait on
        assert (await lru("b")).subject_id == "b" and loads == ["a", "b"]
        await lru("a")  # a is now the most recent: c evicts b
        await lru("c")
        assert evicted == ["b"] and loads == ["a", "b", "c"]
        assert (await lru("a")).cache is not None and loads == ["a", "b", "c"]
        held = await lru("c")
        assert lru.discard("c") and not lru.discard("c") and held.cache is None  # a deleted subject: slot freed,
        assert evicted == ["b"]  # and not reported as an eviction
        await lru("b")  # fits beside a again: nothing evicted
        assert evicted == ["b"] and loads == ["a", "b", "c", "b"]

    asyncio.run(scenario())


def test_api_token_from_file_or_environment(tmp_path):
    from pipelines.serve.settings import ServeSettings, SettingsError, resolve_api_token

    settings = ServeSettings(model="m", caches="c")
    assert resolve_api_token(settings, {}) is None
    assert resolve_api_token(settings, {"DREAMCACHE_API_TOKEN": " t1 "}) == "t1"
    token_file = tmp_path / "token"
    token_file.write_text("t2\n")
    assert resolve_api_token(settings, {"DREAMCACHE_API_TOKEN": "t1", "DREAMCACHE_API_TOKEN_FILE": str(token_file)}) == "t2"
    with pytest.raises(SettingsError, match="cannot read"):
        resolve_api_token(settings, {"DREAMCACHE_API_TOKEN_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match="empty"):
        resolve_api_token(ServeSettings(model="m", caches="c", api_token_file=str(tmp_path / "empty")), {})


def test_serve_config_is_a_valid_serve_deploy_config():
    from pathlib import Path

    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve.settings import ServeSettings

    config = yaml.safe_load((Path(__file__).parents[1] / "infra/serve/serve-config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "pipelines.serve:build_app"
    settings = ServeSettings.model_validate(app["args"])
    assert settings.gpus_per_replica == 1 and settings.autoscaling["max_replicas"] >= 1


def test_cli_serve_flags_are_the_settings_fields():
    """`dreamcache serve`'s flags are ServeSettings' fields (one declaration): each flag reaches its field typed,
    every default is the model's, and a field added to the model is a flag without more code."""
    from dreamcache.cli import build_parser
    from pipelines.cli import add_ray_commands, serve_app_args
    from pipelines.serve.settings import ServeSettings

    parser = build_parser(add_ray_commands)
    given = {"model": "m", "caches": "s3://b/c", "adapter": "a", "replicas": 2, "cpus_per_replica": 0.25,
             "autoscaling": {"min_replicas": 1, "max_replicas": 3}, "cache_prompt": "a photo", "dtype": "fp16",
             "allowed_image_prefixes": ("s3://b/up/", "s3://b/in/"), "request_timeout_s": 9.5, "max_side": 128}
    argv = ["serve", "--port", "9000", "--autoscaling", json.dumps(given["autoscaling"]),
            "--allowed-image-prefixes", ",".join(given["allowed_image_prefixes"]), "--request-timeout", "9.5"]
    argv += [x for k, v in given.items() if k not in ("autoscaling", "allowed_image_prefixes", "request_timeout_s")
             for x in ("--" + k.replace("_", "-"), str(v))]
    args = parser.parse_args(argv)
    assert ServeSettings.model_validate(serve_app_args(args)) == ServeSettings(**given)
    assert args.host == "127.0.0.1" and args.port == 9000
    defaults = serve_app_args(parser.parse_args(["serve", "--model", "m", "--caches", "c"]))
    assert ServeSettings.model_validate(defaults) == ServeSettings(model="m", caches="c")
    assert set(defaults) == set(ServeSettings.model_fields)


def test_accept_header_and_image_uri_rules():
    from pipelines.serve import prefers_png
    from pipelines.serve.schema import check_image_uri

    assert prefers_png("image/png") and prefers_png("image/*") and prefers_png("image/png, application/json;q=0.5")
    assert not prefers_png(None) and not prefers_png("*/*") and not prefers_png("application/json, image/png;q=0.2")
    allowed = ("s3://bucket/uploads/", "/data/refs")
    assert check_image_uri("s3://bucket/uploads/a.png", allowed) == "s3://bucket/uploads/a.png"
    assert check_image_uri("/data/refs/x/a.png", allowed) == "/data/refs/x/a.png"
    for bad in ("/data/refs/../secret.png", "/data/refs-other/a.png", "s3://bucket/uploads/../caches/a",
                "s3://bucket/other/a.png", "gs://bucket/uploads/a.png"):
        with pytest.raises(ValueError):
            check_image_uri(bad, allowed)
    with pytest.raises(ValueError, match="not accepted"):
        check_image_uri("s3://bucket/uploads/a.png", ())


def test_device_queue_merges_what_waits_while_the_device_is_busy():
    from pipelines.serve.batching import DeviceQueue

    calls: list[list[int]] = []

    async def scenario():
        release = asyncio.Event()

        async def run(items):
            calls.append(list(items))
            if len(calls) == 1:
                await release.wait()  # the device is busy with the first call
            if 13 in items:
                raise RuntimeError("bad batch")
            return [item * 10 for item in items]

        queue = DeviceQueue(run, max_size=4)
        first = asyncio.ensure_future(queue.submit([1]))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(queue.submit([n])) for n in (2, 3, 4, 5, 6)]
        gone = asyncio.ensure_future(queue.submit([7]))
        await asyncio.sleep(0)
        gone.cancel()
        release.set()
        assert await first == [10]
        assert [await w for w in waiting] == [[20], [30], [40], [50], [60]]
        with pytest.raises(RuntimeError, match="bad batch"):
            await queue.submit([13, 14])
        assert await queue.submit([8, 9]) == [80, 90]  # the queue survives a failed call

    asyncio.run(scenario())
    assert calls[:3] == [[1], [2, 3, 4, 5], [6]]  # merged up to max_size; the cancelled 7 never ran
    assert calls[3:] == [[13, 14], [8, 9]]


def test_outside_request_drops_the_callers_context_and_is_cancelled_with_it():
    """The half of mixed batching that is plain Python: the enqueue sees none of the request's context variables
    (Serve's multiplexed id is one), and a cancelled request cancels it. The Serve half is checked by
    test_a_batch_mixes_subjects_each_sample_with_its_own_cache."""
    import contextvars

    from pipelines.serve.batching import outside_request

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

    async def read() -> str:
        return request_id.get()

    async def scenario():
        request_id.set("request-1")
        assert await outside_request(read()) == ""
        assert request_id.get() == "request-1"

        started, cancelled = asyncio.Event(), asyncio.Event()

        async def enqueued() -> None:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def handler() -> None:
            await outside_request(enqueued())

        request = asyncio.ensure_future(handler())
        await started.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert cancelled.is_set()

    asyncio.run(scenario())


# -- grids, subject management, event streams (issue 14) -------------------------------------------------------------
@pytest.mark.parametrize("app", ["open", "other"])  # both routings (see serve_fixtures)
def test_a_grid_over_two_replicas_streams_every_cell_once_each_as_generate_makes_it(app, serve_apps):
    """Subjects held by both replicas x 2 prompts x 2 seeds, plus a subject nobody registered: one NDJSON line per
    cell, every cell once; the cells ran on both replicas; the unknown subject failed its own cells only; a cell's
    image is POST /v1/generate's for the same parameters (up to the batch-size rounding of the existing tests)."""
    tag = uuid.uuid4().hex[:6]
    with serve_apps.api(app).client() as client:
        holders = subjects_on_every_replica(client, f"grid-{tag}", 150)
        subjects = [*holders, f"grid-{tag}-missing"]
        prompts = [{"prompt": "a photo on a beach"},
                   {"prompt": "a toy in the snow", "negative_prompt": "blurry", "image_guidance_scale": 2.0}]
        body = {"subject_ids": subjects, "prompts": prompts, "seeds": [5, 6], "steps": 2}
        lines = grid_lines(client, body)
        cells = [(line["subject_id"], line["prompt_index"], line["seed"]) for line in lines]
        assert sorted(cells) == sorted((s, p, seed) for s in subjects for p in range(2) for seed in (5, 6))
        for line in lines:
            if line["subject_id"] in holders:
                assert "png" in line and line["replica"] == holders[line["subject_id"]], line.get("error")
            else:
                assert line["error"]["status"] == 404 and "png" not in line
        assert {line["replica"] for line in lines if "png" in line} == set(holders.values())

        cell = next(line for line in lines if line["prompt_index"] == 1 and line["seed"] == 6 and "png" in line)
        alone = generate(client, cell["subject_id"], prompt="a toy in the snow", negative_prompt="blurry",
                         image_guidance_scale=2.0, seed=6, steps=2)
        assert alone.status_code == 200, alone.text
        assert np.abs(pixels(cell["png"]) - pixels(alone.json()["images"][0])).max() <= 2


def test_bad_grid_bodies_are_422_naming_the_field_and_too_large_grids_413(auth_api):
    with auth_api.client() as client:
        cases = [({"subject_ids": ["a"], "steps": 2}, "prompts"),
                 (grid_body([]), "subject_ids"),
                 (grid_body(["a"], seeds=[-1]), "0"),
                 (grid_body(["a"], prompts=[{"prompt": ""}]), "prompt"),
                 (grid_body(["a"], prompts=[{"prompt": "x", "guidance_scale": 99}]), "guidance_scale"),
                 (grid_body(["a"], num_images=2), "num_images"),
                 (grid_body(["ok", "../etc"]), "1"),
                 (grid_body(["a"], width=65), "width")]
        for body, field in cases:
            refused = client.post("/v1/grids", json=body)
            assert refused.status_code == 422, (body, refused.text)
            assert field in field_of(refused), (body, refused.json())
        assert client.post("/v1/grids", json=grid_body(["ok", "../etc"])).json()["detail"][0]["loc"][:2] == \
            ["body", "subject_ids"]
        for body in (grid_body([f"s{i}" for i in range(17)]),  # an axis over its limit
                     grid_body([f"s{i}" for i in range(16)], prompts=[{"prompt": f"p{i}"} for i in range(8)])):
            too_large = client.post("/v1/grids", json=body)
            assert too_large.status_code == 413, too_large.text
            assert "dreamcache generate-batch" in too_large.json()["detail"]
        schema = client.get("/openapi.json").json()
    grid = schema["components"]["schemas"]["GridRequest"]
    assert (grid["properties"]["subject_ids"]["maxItems"], grid["properties"]["prompts"]["maxItems"]) == (16, 8)
    assert grid["x-max-cells"] == 64 and "/v1/grids" in schema["paths"]


@pytest.mark.parametrize("app", ["auth", "open"])  # the store on S3, and on a local folder
def test_list_subjects_in_pages_and_delete_one_from_the_store_and_every_replica(app, serve_apps):
    api = serve_apps.api(app)
    tag = uuid.uuid4().hex[:6]
    mine = [f"list-{tag}-{i}" for i in range(3)]
    with api.client() as client:
        for i, subject in enumerate(mine):
            pngs = [reference_png(170 + i)] * (1 + (i == 0))
            assert register(client, subject, *pngs).status_code == 201
        listed, cursor, pages = [], None, 0
        while True:
            page = client.get("/v1/subjects", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200, page.text
            listed += page.json()["subjects"]
            pages += 1
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        ids = [entry["id"] for entry in listed]
        assert len(ids) == len(set(ids)) and pages >= 2 and set(mine) <= set(ids)
        entry = next(e for e in listed if e["id"] == mine[0])
        assert entry["references"] == 2 and entry["size"] > 1000 and entry["created"].endswith("+00:00")
        assert field_of(client.get("/v1/subjects", params={"limit": 0})) == ["limit"]
        assert field_of(client.get("/v1/subjects", params={"cursor": "../x"})) == ["cursor"]

        assert generate(client, mine[1]).status_code == 200  # resident on some replica
        deleted = client.delete(f"/v1/subjects/{mine[1]}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["replicas_cleared"] >= 1
        assert all(mine[1] not in stats["resident"] for stats in all_generator_stats(api))
        assert generate(client, mine[1]).status_code == 404
        assert client.get(f"/v1/subjects/{mine[1]}").status_code == 404
        assert mine[1] not in [e["id"] for e in client.get("/v1/subjects", params={"limit": 200}).json()["subjects"]]
        assert client.delete(f"/v1/subjects/{mine[1]}").status_code == 404  # nothing left to delete
        assert field_of(client.delete("/v1/subjects/bad..id")) == ["subject_id"]
        # The id is free again: registered with other images, it serves the new cache (its old LRU slot refilled).
        assert register(client, mine[1], reference_png(190)).status_code == 201
        again = generate(client, mine[1])
        assert again.status_code == 200, again.text


def test_an_event_stream_reports_each_step_then_the_image(auth_api):
    with auth_api.client() as client:
        assert register(client, "sse-fox", reference_png(180)).status_code == 201
        body = {"subject_id": "sse-fox", "prompt": "a photo on a beach", "steps": 3, "seed": 4}
        with client.stream("POST", "/v1/generate", json=body, headers={"Accept": "text/event-stream"}) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = list(sse_events(response))
        assert [e for e, _ in events] == ["progress"] * 4 + ["result"]
        assert [d["step"] for _, d in events[:-1]] == [0, 1, 2, 3] and events[0][1]["steps"] == 3
        plain = client.post("/v1/generate", json=body).json()
        assert np.abs(pixels(events[-1][1]["images"][0]) - pixels(plain["images"][0])).max() <= 2
        unknown = client.post("/v1/generate", json={**body, "subject_id": "sse-nobody"},
                              headers={"Accept": "text/event-stream"})
        assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/json"


def test_cancelling_an_event_stream_stops_the_work(auth_api):
    with auth_api.client() as client:
        assert register(client, "sse-cancel", reference_png(181)).status_code == 201
        before = generator_stats(auth_api)
        body = {"subject_id": "sse-cancel", "prompt": "x", "steps": 150, "num_images": 8, "seed": 1}
        with client.stream("POST", "/v1/generate", json=body, headers={"Accept": "text/event-stream"}) as response:
            for event, data in sse_events(response):
                if event == "progress" and data["step"] >= 2:
                    break  # leaving the block closes the connection
        deadline = time.monotonic() + 60
        while (stats := generator_stats(auth_api))["cancelled"] == before["cancelled"]:
            assert time.monotonic() < deadline, "the cancelled stream's batch kept running"
            time.sleep(0.2)
        assert stats["steps"] - before["steps"] < 150  # stopped between steps, long before its 150th
        assert generate(client, "sse-cancel").status_code == 200


# -- one image, four paths ------------------------------------------------------------------------------------------
def test_one_subject_prompt_and_seed_give_one_image_on_every_path(open_api, tiny_pipe, tiny_model_dir, tmp_path):
    """The Python API, `dreamcache generate`, the batch generation job and Serve, given the same cache, prompt,
    seed and settings, render the same image. Serve computes the cache from an upload; the other three read
    that file from Serve's store, so the cache is one object and only the generation paths are compared."""
    import torch

    from dreamcache.cli import main as cli_main
    from jobs.generate_batch import main as batch_main

    prompt, seed = "a toy on the beach", 5
    settings = {"steps": 3, "guidance_scale": 7.5, "image_guidance_scale": 3.0, "guidance": "compositional",
                "height": 64, "width": 64}
    with open_api.client() as client:
        assert register(client, "fourway", reference_png(190)).status_code == 201
        served = client.post("/v1/generate", headers={"Accept": "image/png"}, json={
            "subject_id": "fourway", "prompt": prompt, "seed": seed, **settings})
        assert served.status_code == 200, served.text
    images = {"serve": np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB"))}
    cache_uri = f"{open_api.caches}/fourway.safetensors"

    cache = tiny_pipe.load_cache(cache_uri)
    call = {("num_inference_steps" if k == "steps" else k): v for k, v in settings.items()}

    def api_image(image_seed: int) -> np.ndarray:
        image = tiny_pipe(prompt, cache, generator=torch.Generator().manual_seed(image_seed), **call).images[0]
        return np.asarray(image.convert("RGB"))

    images["api"] = api_image(seed)

    model = ["--model", str(tiny_model_dir), "--adapter", str(tiny_model_dir / "adapter.safetensors")]
    flags = [part for k, v in settings.items() for part in ("--" + k.replace("_", "-"), str(v))]
    assert cli_main(["generate", *model, "--cache", cache_uri, "--prompt", prompt, "--seed", str(seed),
                     "--out", str(tmp_path / "cli"), *flags]) == 0
    (cli_png,) = (tmp_path / "cli").glob("*.png")
    images["cli"] = np.asarray(Image.open(cli_png).convert("RGB"))

    (tmp_path / "prompts.txt").write_text(prompt + "\n")
    assert batch_main([*model, "--caches", open_api.caches, "--subjects", "fourway", "--prompts",
                       str(tmp_path / "prompts.txt"), "--seeds", str(seed), "--out", str(tmp_path / "batch"),
                       "--batch-size", "1", "--contact-sheet", "none", "-q", *flags]) == 0
    (batch_png,) = (tmp_path / "batch" / "fourway").glob("*.png")
    images["batch job"] = np.asarray(Image.open(batch_png).convert("RGB"))

    reference = images["api"].astype(np.int16)
    assert reference.std() > 1  # an image, not a blank: equal blanks would prove nothing
    for path, image in images.items():
        assert image.shape == reference.shape, path
        assert np.abs(image.astype(np.int16) - reference).max() == 0, f"{path} differs from the Python API's image"
    # The seed decides the image: another seed through the API gives another one.
    assert np.abs(api_image(seed + 1).astype(np.int16) - reference).max() > 0


def test_the_metrics_export_serves_every_series_the_dashboard_queries(open_api):
    """What Prometheus scrapes (Ray's metrics export on this node, the port infra/monitoring/prometheus.yml and
    the PodMonitor name), parsed as Prometheus parses it: after one generate request every series the Grafana
    dashboard queries is there, under the app's name, with the latency's route and status labels. A metric
    renamed in code or dashboard, or a suffix that Ray's exporter writes otherwise (``_total``, ``_bucket``),
    fails here; tests/test_infra.py only compares the two files."""
    import re
    from pathlib import Path

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.serve import metrics

    with open_api.client() as client:
        assert register(client, "scraped", reference_png(230)).status_code in (200, 201)
        response = client.post("/v1/generate", json={"subject_id": "scraped", "prompt": "p", "steps": 2})
        assert response.status_code == 200, response.text
    dashboard = (Path(__file__).parents[1] / "infra/monitoring/grafana-dashboard.json").read_text()
    # Stopped batches are counted only once a batch stops (the cancel tests do); the rest follows one request.
    wanted = {name for name in re.findall(r"ray_dreamcache_[a-z_]+", dashboard)
              if not name.startswith(f"ray_{metrics.STOPPED}")}
    assert len(wanted) >= 6, wanted
    (port,) = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}
    deadline = time.monotonic() + 90  # Ray's workers report to the node's agent every few seconds
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples
                   if s.labels.get("application") == open_api.name]
        missing = wanted - {s.name for s in samples}
        latency = [s for s in samples if s.name == f"ray_{metrics.REQUEST_LATENCY}_count"
                   and s.labels.get("route") == "POST /v1/generate" and s.labels.get("status") == "200"]
        if not missing and latency:
            break
        assert time.monotonic() < deadline, f"not exported after 90 s: {sorted(missing) or 'the latency labels'}"
        time.sleep(2)
    assert sum(s.value for s in samples if s.name == f"ray_{metrics.IMAGES}_total") >= 1
    assert latency[0].value >= 1
