"""LoRA adapters as the API shows them: listed under their base, named in `model`, loaded and
unloaded at run time (vLLM's routes, answers and errors)."""

from __future__ import annotations

import json

from protocol import Body, EndResponse, Generate, StartResponse, Submit, Tokens
from protocol.engine_api import AdapterLoaded, AdapterUnloaded, Failed, LoadAdapter, UnloadAdapter
from protocol.testing import EOS_ID, tiny_served_model
from tests.protocol.test_app import JSON, error_of, make_app, respond

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def lora_app(**config):
    base = tiny_served_model()
    base.lora_enabled = True
    base.lora_modules = {"sql": "/adapters/sql"}
    return make_app([base], **config), base


def finish(call, outputs):
    start, *bodies, end = outputs
    assert isinstance(start, StartResponse) and isinstance(end, EndResponse) and call.finished
    return start.status, dict(start.headers), b"".join(b.data for b in bodies if isinstance(b, Body))


def test_adapters_are_listed_under_their_base():
    app, _ = lora_app()
    status, _, body = respond(app, "GET", "/v1/models")
    cards = json.loads(body)["data"]
    assert [(c["id"], c["parent"], c["root"]) for c in cards] == [
        ("tiny-byte-model", None, "tiny-byte-model"),
        ("sql", "tiny-byte-model", "/adapters/sql"),
    ]
    assert cards[1]["max_model_len"] is None  # as vLLM's adapter cards
    status, _, body = respond(app, "GET", "/v1/models/sql")
    assert status == 200 and json.loads(body)["parent"] == "tiny-byte-model"


def test_a_request_naming_an_adapter_runs_it_on_the_base_engine_and_answers_in_its_name():
    app, _ = lora_app()
    call = app.handle("POST", "/v1/chat/completions", [JSON], json.dumps({**CHAT, "model": "sql"}).encode())
    (submit,) = call.start()
    (generate,) = submit.commands
    assert isinstance(generate, Generate) and generate.lora_name == "sql"
    assert call.model == "tiny-byte-model"  # the engine it goes to
    status, _, body = finish(call, call.feed([Tokens(generate.request_id, 0, (104, EOS_ID), 5, finish_reason="stop")]))
    assert status == 200 and json.loads(body)["model"] == "sql"
    plain = app.handle("POST", "/v1/chat/completions", [JSON], json.dumps({**CHAT, "model": "tiny-byte-model"}).encode())
    assert plain.start()[0].commands[0].lora_name is None
    assert error_of(respond(app, "POST", "/v1/chat/completions", {**CHAT, "model": "nope"}))[0] == 404


def test_runtime_updates_are_absent_unless_allowed():
    app, _ = lora_app()
    body = {"lora_name": "x", "lora_path": "/x"}
    assert respond(app, "POST", "/v1/load_lora_adapter", body)[0] == 404
    assert respond(app, "POST", "/v1/unload_lora_adapter", {"lora_name": "sql"})[0] == 404


def test_load_use_unload_through_the_api():
    app, base = lora_app(allow_runtime_lora_updating=True)
    call = app.handle("POST", "/v1/load_lora_adapter", [JSON], json.dumps({"lora_name": "chat", "lora_path": "/a/chat"}).encode())
    (submit,) = call.start()
    (load,) = submit.commands
    assert isinstance(load, LoadAdapter) and (load.name, load.path) == ("chat", "/a/chat")
    assert "chat" not in base.lora_modules  # not before the engine has it
    status, headers, body = finish(call, call.feed([AdapterLoaded(load.request_id, "chat", "/a/chat")]))
    assert (status, body) == (200, b"Success: LoRA adapter 'chat' added successfully.")
    assert headers[b"content-type"].startswith(b"text/plain")
    assert base.lora_modules == {"sql": "/adapters/sql", "chat": "/a/chat"}
    again = respond(app, "POST", "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "/b"})
    assert error_of(again) == (400, {"message": "The lora adapter 'chat' has already been loaded.",
                                     "type": "InvalidUserInput", "param": None, "code": 400})
    call = app.handle("POST", "/v1/unload_lora_adapter", [JSON], json.dumps({"lora_name": "chat"}).encode())
    (submit,) = call.start()
    (unload,) = submit.commands
    assert isinstance(unload, UnloadAdapter) and "chat" not in base.lora_modules  # no new request routes to it
    status, _, body = finish(call, call.feed([AdapterUnloaded(unload.request_id, "chat")]))
    assert (status, body) == (200, b"Success: LoRA adapter 'chat' removed successfully.")
    missing = respond(app, "POST", "/v1/unload_lora_adapter", {"lora_name": "chat"})
    assert error_of(missing) == (404, {"message": "The lora adapter 'chat' cannot be found.",
                                       "type": "NotFoundError", "param": None, "code": 404})
    assert error_of(respond(app, "POST", "/v1/chat/completions", {**CHAT, "model": "chat"}))[0] == 404


def test_load_errors_and_a_client_leaving_mid_load():
    app, base = lora_app(allow_runtime_lora_updating=True)
    status, error = error_of(respond(app, "POST", "/v1/load_lora_adapter", {"lora_name": "x"}))
    assert (status, error["message"]) == (400, "Both 'lora_name' and 'lora_path' must be provided.")
    status, error = error_of(respond(app, "POST", "/v1/unload_lora_adapter", {}))
    assert (status, error["message"]) == (400, "'lora_name' needs to be provided to unload a LoRA adapter.")
    call = app.handle("POST", "/v1/load_lora_adapter", [JSON], json.dumps({"lora_name": "bad", "lora_path": "/b"}).encode())
    (load,) = call.start()[0].commands
    status, _, body = finish(call, call.feed([Failed(load.request_id, 400, "no LoRA adapter at '/b'")]))
    assert (status, json.loads(body)["error"]["message"]) == (400, "no LoRA adapter at '/b'")
    assert "bad" not in base.lora_modules
    call = app.handle("POST", "/v1/load_lora_adapter", [JSON], json.dumps({"lora_name": "gone", "lora_path": "/g"}).encode())
    call.start()
    (undo,) = call.disconnected()
    assert isinstance(undo, UnloadAdapter) and undo.name == "gone"  # the engine may load it after all
    plain, _ = lora_app(allow_runtime_lora_updating=True)
    plain.models[0].lora_enabled = False
    status, error = error_of(respond(plain, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"}))
    assert status == 400 and "--enable-lora" in error["message"]
    assert isinstance(submit_of(app), Submit)


def submit_of(app):
    return app.handle("POST", "/v1/chat/completions", [JSON], json.dumps({**CHAT, "model": "sql"}).encode()).start()[0]
