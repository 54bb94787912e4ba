"""`vlm serve`: the official `openai` client against a server on loopback, with the real Assistant on a tiny random
exported model (tests/tiny_models.py: `tiny_export`).

One server (uvicorn on a thread of this process, a free port) serves the whole module: an API key, a folder that
local image paths may come from, a small image-size limit (so an oversized image is cheap to send), a gather
window the batching test does not rely on (it holds the scheduler instead).
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import uvicorn
from openai import OpenAI
from PIL import Image
from tiny_models import tiny_export
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)
from typer.testing import CliRunner

import vlm
from vlm.messages import ImagePolicy, parse_messages
from vlm.models.sampling import Sampling
from vlm.serve.app import create_app
from vlm.serve.background import BackgroundServer
from vlm.serve.scheduler import BatchScheduler

API_KEY = "test-key"
MAX_IMAGE_BYTES = 64 << 10
QUESTION = "how many objects are there?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("allowed")
    picture("blue").save(folder / "blue.png")
    return folder


@pytest.fixture(scope="module")
def assistant(model_dir):
    return vlm.load(model_dir)


@pytest.fixture(scope="module")
def policy(images_dir) -> ImagePolicy:
    return ImagePolicy(max_bytes=MAX_IMAGE_BYTES, allowed_dir=images_dir)


@pytest.fixture(scope="module")
def scheduler(assistant) -> BatchScheduler:
    return BatchScheduler(assistant, max_batch=4, gather_s=0.01)


@pytest.fixture(scope="module")
def server(scheduler, model_dir, policy):
    running = BackgroundServer(create_app(scheduler, model_dir.name, API_KEY, policy))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(api_key=API_KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=60)


def picture(colour: str, size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    image.paste(colour, (8, 8, size - 8, size - 8))
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, image_url: str | None = None) -> dict:
    if image_url is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


def expected(assistant, policy, messages: list[dict], max_tokens: int) -> str:
    """The library's own greedy reply to the same messages (what the server must answer)."""
    return assistant.chat(messages, Sampling(max_tokens=max_tokens), policy)


def prompt_tokens(assistant, policy, messages: list[dict]) -> int:
    return assistant.count_prompt_tokens(parse_messages(messages, policy))


def post(server, body: bytes | dict, key: str | None = API_KEY) -> tuple[int, dict]:
    """A raw POST to /v1/chat/completions: (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def health(server) -> dict:
    with urllib.request.urlopen(f"{server.url}/health", timeout=30) as response:
        return json.loads(response.read())


def assert_openai_error(status: int, body: dict, expected_status: int | tuple[int, ...] = 400) -> dict:
    allowed = (expected_status,) if isinstance(expected_status, int) else expected_status
    assert status in allowed, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


# ------------------------------------------------------------------------------------------------- replies


def test_reply_is_the_assistants_greedy_reply_with_usage(client, assistant, policy, model_dir) -> None:
    messages = [user(QUESTION)]
    reply = client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.model == model_dir.name and reply.id.startswith("chatcmpl-")
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == expected(assistant, policy, messages, 6)
    usage = reply.usage
    assert usage.prompt_tokens == prompt_tokens(assistant, policy, messages)
    assert 1 <= usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # max_completion_tokens is max_tokens' newer name
    short = client.chat.completions.create(model=model_dir.name, messages=messages, max_completion_tokens=1)
    assert short.usage.completion_tokens == 1


def test_streamed_reply_arrives_in_chunks_as_openai_streams_it(client, assistant, policy, model_dir) -> None:
    messages = [user("Describe the image.")]
    chunks = list(client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    *with_choices, last = chunks
    assert last.choices == [] and last.usage.completion_tokens >= 1  # include_usage: an extra, last chunk
    first, *content, final = with_choices
    assert first.choices[0].delta.role == "assistant"
    assert final.choices[0].finish_reason in ("stop", "length") and not final.choices[0].delta.content
    assert all(chunk.choices[0].finish_reason is None for chunk in [first, *content])
    assert len(content) > 1, "a reply of several tokens must stream in more than one content chunk"
    text = "".join(chunk.choices[0].delta.content for chunk in content)
    assert text == expected(assistant, policy, messages, 8)


def test_raw_stream_is_server_sent_events_ending_with_done(server, model_dir) -> None:
    body = {"model": model_dir.name, "messages": [user(QUESTION)], "max_tokens": 3, "stream": True}
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events[:-1])
    assert json.loads(events[0][len("data: "):])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_image_as_data_url_is_what_the_model_sees(client, assistant, policy, model_dir, images_dir) -> None:
    red = [user(QUESTION, data_url(picture("red")))]
    reply = client.chat.completions.create(model=model_dir.name, messages=red, max_tokens=5)
    assert reply.choices[0].message.content == expected(assistant, policy, red, 5)
    assert reply.usage.prompt_tokens == prompt_tokens(assistant, policy, red)
    # A file under --allow-images-from, by path, is the same image as its data URL.
    by_path = client.chat.completions.create(model=model_dir.name, max_tokens=5,
                                             messages=[user(QUESTION, str(images_dir / "blue.png"))])
    by_url = client.chat.completions.create(model=model_dir.name, max_tokens=5,
                                            messages=[user(QUESTION, data_url(picture("blue")))])
    assert by_path.choices[0].message.content == by_url.choices[0].message.content


def test_second_turn_answers_after_the_first(client, assistant, policy, model_dir) -> None:
    first = [user(QUESTION, data_url(picture("green")))]
    answer = client.chat.completions.create(model=model_dir.name, messages=first, max_tokens=4)
    reply = answer.choices[0].message.content
    follow_up = "what color is the star?"
    second = [*first, {"role": "assistant", "content": reply}, user(follow_up)]
    again = client.chat.completions.create(model=model_dir.name, messages=second, max_tokens=4)
    # The model received the whole conversation: the second prompt holds the first turn and its answer ...
    assert again.usage.prompt_tokens == prompt_tokens(assistant, policy, second)
    alone = [user(follow_up, data_url(picture("green")))]
    assert again.usage.prompt_tokens > prompt_tokens(assistant, policy, alone)
    # ... and its reply is the one that conversation gives, whatever the history changes about it.
    assert again.choices[0].message.content == expected(assistant, policy, second, 4)
    other = [*first, {"role": "assistant", "content": reply + " red red red"}, user(follow_up)]
    assert (client.chat.completions.create(model=model_dir.name, messages=other, max_tokens=4).usage.prompt_tokens
            > again.usage.prompt_tokens)


def test_sampling_parameters_reach_the_decoder(client, assistant, policy, model_dir) -> None:
    """stop, temperature / top_p with a seed, max_tokens: the server answers what the library answers with the
    same Sampling."""
    messages = [user("Describe the image.", data_url(picture("red")))]
    greedy = client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=10)
    words = greedy.choices[0].message.content.split()
    assert len(words) >= 3, "the test needs a reply of a few words"
    stop = words[2]
    cut = client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=10, stop=[stop, "zzz"])
    assert cut.choices[0].message.content == assistant.chat(messages, Sampling(max_tokens=10, stop=(stop, "zzz")),
                                                            policy)
    assert stop not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=10,
                                              temperature=1.5, top_p=0.9, seed=seed).choices[0].message.content
               for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1] == assistant.chat(messages, Sampling(10, 1.5, 0.9, (), 3), policy)
    assert len(set(sampled + [greedy.choices[0].message.content])) > 1  # sampling is not greedy decoding


# ------------------------------------------------------------------------------------------------ the API


def test_models_health_and_page(server, client, model_dir) -> None:
    assert [model.id for model in client.models.list()] == [model_dir.name]
    status = health(server)
    assert status["status"] == "ok" and status["model"] == model_dir.name and status["max_batch"] == 4
    with urllib.request.urlopen(f"{server.url}/", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/html") and b"<html" in response.read()


def test_api_key_is_required_on_every_v1_route(server, model_dir) -> None:
    client = OpenAI(api_key="wrong-key", base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=model_dir.name, messages=[user(QUESTION)], max_tokens=1)
    for key in (None, "wrong-key", f"{API_KEY}x"):  # no Authorization header at all, a wrong key, a longer one
        status, body = post(server, {"model": model_dir.name, "messages": [user(QUESTION)]}, key=key)
        assert assert_openai_error(status, body, 401)["type"] == "authentication_error"
    request = urllib.request.Request(f"{server.url}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as unauthorised:
        urllib.request.urlopen(request, timeout=30)
    assert unauthorised.value.code == 401
    assert health(server)["status"] == "ok"  # /health and the page stay open


def bad_requests(model_id: str, images_dir: Path) -> dict[str, tuple[bytes | dict, int | tuple[int, ...], str | None]]:
    """name: (request body, expected status, expected error param)."""
    good = {"model": model_id, "messages": [user(QUESTION)], "max_tokens": 2}
    undecodable = "data:image/png;base64," + base64.b64encode(b"these bytes are not a PNG").decode()
    noise = Image.frombytes("RGB", (160, 160), random.Random(0).randbytes(160 * 160 * 3))  # > MAX_IMAGE_BYTES as PNG
    outside = images_dir.parent / "secret.png"
    picture("black").save(outside)
    return {
        "malformed JSON": (b'{"model": "x", "messages": [', 400, None),
        "not an object": (b"[1, 2]", 400, None),
        "missing messages": ({"model": model_id}, 400, "messages"),
        "missing model": ({"messages": [user(QUESTION)]}, 400, "model"),
        "empty messages": ({**good, "messages": []}, 400, "messages"),
        "unknown model": ({**good, "model": "gpt-4o"}, 404, "model"),
        "undecodable image": ({**good, "messages": [user(QUESTION, undecodable)]}, 400, "messages"),
        "oversized image": ({**good, "messages": [user(QUESTION, data_url(noise))]}, 400, "messages"),
        "body over the limit": ({**good, "messages": [user(QUESTION, "data:image/png;base64," + "A" * (2 << 20))]},
                                413, None),
        "prompt over the context": ({**good, "messages": [user("red " * 400)]}, 400, "messages"),
        "path outside the folder": ({**good, "messages": [user(QUESTION, str(outside))]}, 400, "messages"),
        "path traversal": ({**good, "messages": [user(QUESTION, f"{images_dir}/../{outside.name}")]}, 400,
                           "messages"),
        "http image URL": ({**good, "messages": [user(QUESTION, "http://example.com/a.png")]}, 400, "messages"),
        "temperature a string": ({**good, "temperature": "hot"}, 400, "temperature"),
        "temperature out of range": ({**good, "temperature": 5}, 400, "temperature"),
        "max_tokens zero": ({**good, "max_tokens": 0}, 400, "max_tokens"),
        "stop a number": ({**good, "stop": 7}, 400, "stop"),
        "messages a string": ({**good, "messages": "hello"}, 400, "messages"),
        "content a number": ({**good, "messages": [{"role": "user", "content": 3}]}, 400, "messages"),
        "unknown role": ({**good, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
        "last message not the user's": ({**good, "messages": [user(QUESTION), {"role": "assistant",
                                                                               "content": "two"}]}, 400, "messages"),
        "n = 2": ({**good, "n": 2}, 400, "n"),
    }


def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, client, model_dir,
                                                                    images_dir) -> None:
    cases = bad_requests(model_dir.name, images_dir)
    for name, (body, status, param) in cases.items():
        error = assert_openai_error(*post(server, body), status)
        assert error["type"] == "invalid_request_error", name
        if param is not None:
            assert error["param"] == param, (name, error)
    # The openai client raises its usual exception on them, with the message.
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model=model_dir.name, messages=[user(QUESTION)], n=2)
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=[user(QUESTION)])
    # 50 more bad requests, then a good one is answered as before.
    bodies = list(cases.values())
    for index in range(50):
        body, status, _ = bodies[index % len(bodies)]
        assert_openai_error(*post(server, body), status)
    reply = client.chat.completions.create(model=model_dir.name, messages=[user(QUESTION)], max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1


# ------------------------------------------------------------------------------------------------ batching


def test_requests_that_arrive_together_decode_in_one_batch(server, client, scheduler, model_dir) -> None:
    """Five requests queued together on a scheduler of max_batch 4: a batch of four, then one."""
    questions = [QUESTION, "Describe the image.", "what color is the star?", "how many circles are there?",
                 "what shape is left of the square?"]
    before = health(server)
    scheduler.hold()  # the worker starts no batch until all are queued, however slow this machine is
    try:
        with ThreadPoolExecutor(len(questions)) as pool:
            replies = [pool.submit(client.chat.completions.create, model=model_dir.name, messages=[user(q)],
                                   max_tokens=4 + i) for i, q in enumerate(questions)]
            deadline = time.monotonic() + 60
            while health(server)["queued"] < len(questions):
                assert time.monotonic() < deadline, "the requests never reached the scheduler"
                time.sleep(0.02)
            scheduler.release()
            answers = [reply.result(timeout=60) for reply in replies]
    finally:
        scheduler.release()
    after = health(server)
    assert after["batches"] == before["batches"] + 2 and after["largest_batch"] == 4 == scheduler.max_batch
    assert after["requests"] == before["requests"] + len(questions) and after["queued"] == 0
    for i, answer in enumerate(answers):  # each got its own reply, within its own length limit
        assert 1 <= answer.usage.completion_tokens <= 4 + i
        assert answer.choices[0].finish_reason in ("stop", "length")


def test_cli_serves_an_exported_folder(model_dir, images_dir, monkeypatch) -> None:
    from vlm.cli import app

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda asgi, host, port, **kwargs: served.update(app=asgi, host=host,
                                                                                         port=port))
    result = CliRunner().invoke(app, ["serve", "--model", str(model_dir), "--port", "0", "--api-key", "k",
                                      "--allow-images-from", str(images_dir), "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    assert served["host"] == "127.0.0.1"  # loopback unless told otherwise
    running = BackgroundServer(served["app"])
    try:
        client = OpenAI(api_key="k", base_url=f"{running.url}/v1", max_retries=0)
        assert [model.id for model in client.models.list()] == [model_dir.name]
        reply = client.chat.completions.create(model=model_dir.name, max_tokens=2,
                                               messages=[user(QUESTION, str(images_dir / "blue.png"))])
        assert reply.usage.completion_tokens >= 1
    finally:
        running.stop()
