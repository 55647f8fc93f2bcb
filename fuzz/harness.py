"""The app under test, the settings every fuzz property uses, and the count of requests exercised.

`exchange(request, script)` is one whole request: `App.handle`, then the fake engine drives the
call to its end. Each exchange bumps `EXERCISED`, which the tests assert against the example
count and the session summary prints, so "at least N requests" is a checked figure.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter

from hypothesis import HealthCheck, assume, settings

from fuzz.engine_driver import EngineScript, FakeEngine, Transcript
from fuzz.known_bugs import known_bug
from fuzz.oracle import Expectations
from fuzz.strategies import FuzzRequest, Profile
from protocol import App, AppConfig
from protocol.model import ServedModel
from protocol.testing import tiny_pooling_model, tiny_served_model

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
IN_CI = os.environ.get("CI", "").lower() == "true"

EXERCISED: Counter[str] = Counter()  # requests run, by generator family ("valid", "almost", "garbage", ...)
STATUSES: Counter[int] = Counter()  # status codes answered

API_KEY = "sk-test"


def fuzz_settings(max_examples: int = EXAMPLES) -> settings:
    """Hypothesis settings for a property: no deadline, reproducible under CI=true."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=IN_CI,
        database=None if IN_CI else settings.default.database,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


MODEL = tiny_served_model()
PROFILE = Profile(
    model_names=tuple(MODEL.names),
    vocab_size=MODEL.tokenizer.vocab_size,
    max_model_len=MODEL.max_model_len,
)
EXPECTATIONS = Expectations(served_name=MODEL.name, tokenizer=MODEL.tokenizer)
ENGINE = FakeEngine(
    vocab_size=MODEL.tokenizer.vocab_size,
    special_ids=MODEL.tokenizer.all_special_ids,
    eos_ids=MODEL.tokenizer.eos_token_ids,
)


def make_app(config: AppConfig | None = None) -> App:
    """A fresh app (fresh id counter) serving the tiny byte-level model, with a fixed clock."""
    ids = itertools.count(1)
    return App(config or AppConfig(), [MODEL], clock=lambda: 1_700_000_000.0, new_id=lambda: f"fz{next(ids)}")


APP = make_app()
APP_WITH_KEY = make_app(AppConfig(api_keys=[API_KEY]))
# Every response-shaping server option turned on: forced usage, cached-token details, token-id
# logprob strings, X-Request-Id headers, and a max_logprobs inside the generated range.
OPTIONS_CONFIG = AppConfig(
    enable_force_include_usage=True,
    enable_prompt_tokens_details=True,
    return_tokens_as_token_ids=True,
    enable_request_id_headers=True,
    max_logprobs=4,
)
APP_WITH_OPTIONS = make_app(OPTIONS_CONFIG)
EXPECTATIONS_WITH_OPTIONS = Expectations(
    served_name=MODEL.name, tokenizer=MODEL.tokenizer, force_include_usage=True, request_id_headers=True
)


# The pooling endpoints run against a server of four models: the generative one (first, so a
# request without `model` must find the model that serves its API), an embedding model with
# Matryoshka sizes, a cross-encoder with labels, and a per-token model.
POOLING_MODELS: tuple[ServedModel, ...] = (
    MODEL,
    tiny_pooling_model(
        ("embed",), name="tiny-embed", max_model_len=48, is_matryoshka=True, matryoshka_dimensions=(2, 4, 8)
    ),
    tiny_pooling_model(
        ("classify", "score"), name="tiny-cross", max_model_len=48, id2label={0: "no", 1: "yes", 2: "maybe"}
    ),
    tiny_pooling_model(
        ("embed", "token_embed", "token_classify"), name="tiny-tokens", max_model_len=48, is_matryoshka=True
    ),
)
POOLING_PROFILE = Profile(
    model_names=tuple(model.name for model in POOLING_MODELS),
    vocab_size=MODEL.tokenizer.vocab_size,
    max_model_len=48,
    max_text=12,
    model_tasks=tuple((model.name, tuple(sorted(model.tasks))) for model in POOLING_MODELS),
)


def make_pooling_app(config: AppConfig | None = None) -> App:
    ids = itertools.count(1)
    return App(
        config or AppConfig(),
        list(POOLING_MODELS),
        clock=lambda: 1_700_000_000.0,
        new_id=lambda: f"fp{next(ids)}",
    )


POOLING_APP = make_pooling_app()
POOLING_APP_WITH_OPTIONS = make_pooling_app(OPTIONS_CONFIG)
POOLING_EXPECTATIONS = Expectations(
    served_name=MODEL.name, tokenizer=MODEL.tokenizer, models={m.name: m for m in POOLING_MODELS}
)
POOLING_EXPECTATIONS_WITH_OPTIONS = Expectations(
    served_name=MODEL.name,
    tokenizer=MODEL.tokenizer,
    request_id_headers=True,
    models={m.name: m for m in POOLING_MODELS},
)


def phrases(request: FuzzRequest) -> list[list[int]]:
    """Token sequences worth having the fake model say: the request's stop strings and bad words."""
    body = request.json_body or {}
    texts: list[str] = []
    for key in ("stop", "bad_words"):
        value = body.get(key)
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        texts += [text for text in values if isinstance(text, str)]
    encoded = []
    for text in texts[:8]:
        try:
            encoded.append(MODEL.tokenizer.encode(text, add_special_tokens=False))
        except (UnicodeError, ValueError):
            continue
    return encoded


def exchange(request: FuzzRequest, script: EngineScript, app: App = APP) -> Transcript:
    """Run one request end to end inside a property; exceptions from the core propagate (a finding).

    Requests that would hit a bug already pinned in `fuzz/test_regressions.py` are skipped.
    """
    assume(known_bug(request) is None)
    return run_request(request, script, app)


def run_request(request: FuzzRequest, script: EngineScript = EngineScript(), app: App = APP) -> Transcript:
    """Run one request end to end (outside hypothesis too), counting it."""
    EXERCISED[request.family] += 1
    call = app.handle(request.method, request.path, request.headers, request.body)
    transcript = ENGINE.run(call, script, phrases(request))
    if transcript.status is not None:
        STATUSES[transcript.status] += 1
    return transcript
