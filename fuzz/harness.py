"""The app under test, the settings every fuzz property uses, and the count of requests exercised.

`exchange(request, script)` is one whole request: `App.handle`, then the fake engine drives the
call to its end. Each exchange bumps `EXERCISED`, which the tests assert against the example
count and the session summary prints, so "at least N requests" is a checked figure; `MEDIA`
counts the requests that carried media parts, by status.

The vision apps serve `tiny_vision_model()` (images only, 4 positions each, an 8x8 crop) with its
own fake engine (its vocabulary holds the `<image>` token): one as the server starts by default,
one with every response option, `--limit-mm-per-prompt image=2`, `--enable-mm-embeds` (its model
takes 8-column image embeddings) and a chat template that loops over content parts (so images
reach the template as `{"type": "image"}` parts).
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Sequence

from hypothesis import HealthCheck, assume, settings

from fuzz.engine_driver import EngineScript, FakeEngine, Transcript
from fuzz.known_bugs import known_bug
from fuzz.oracle import Expectations, media_parts, request_json
from fuzz.strategies import FuzzRequest, Profile
from protocol import App, AppConfig
from protocol.media.fetch import FetchResult, MediaFetchFailed
from protocol.model import ServedModel
from protocol.testing import tiny_pooling_model, tiny_served_model, tiny_vision_model
from protocol.tokenizer import Tokenizer

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
IN_CI = os.environ.get("CI", "").lower() == "true"

EXERCISED: Counter[str] = Counter()  # requests run, by generator family ("valid", "almost", "garbage", ...)
STATUSES: Counter[int] = Counter()  # status codes answered
MEDIA: Counter[str] = Counter()  # status codes answered to requests with media parts ("left": none)
FETCHES: Counter[str] = Counter()  # media URLs the calls asked for, by what the fake runtime fed back

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


def make_app(config: AppConfig | None = None, model: ServedModel = MODEL) -> App:
    """A fresh app (fresh id counter) serving one tiny byte-level model, with a fixed clock."""
    ids = itertools.count(1)
    return App(config or AppConfig(), [model], clock=lambda: 1_700_000_000.0, new_id=lambda: f"fz{next(ids)}")


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


VISION_MODEL = tiny_vision_model()
assert VISION_MODEL.multimodal is not None
VISION_PROFILE = Profile(
    model_names=tuple(VISION_MODEL.names),
    vocab_size=VISION_MODEL.tokenizer.vocab_size,
    max_model_len=VISION_MODEL.max_model_len,
    media=True,
)
VISION_ENGINE = FakeEngine(
    vocab_size=VISION_MODEL.tokenizer.vocab_size,
    special_ids=VISION_MODEL.tokenizer.all_special_ids,
    eos_ids=VISION_MODEL.tokenizer.eos_token_ids,
)
# ChatML over a list of parts: images become the model's placeholder where they were.
PARTS_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_LIMITED_PROFILE = Profile(
    model_names=VISION_PROFILE.model_names,
    vocab_size=VISION_PROFILE.vocab_size,
    max_model_len=VISION_PROFILE.max_model_len,
    media=True,
    media_limit=2,
)
VISION_APP = make_app(model=VISION_MODEL)
VISION_EMBEDS_MODEL = tiny_vision_model(embeds_hidden_size=8)
VISION_OPTIONS_CONFIG = AppConfig(
    enable_force_include_usage=True,
    enable_prompt_tokens_details=True,
    return_tokens_as_token_ids=True,
    enable_request_id_headers=True,
    max_logprobs=4,
    limit_mm_per_prompt={"image": 2},
    chat_template=PARTS_TEMPLATE,
    enable_mm_embeds=True,
)
VISION_APP_WITH_OPTIONS = make_app(VISION_OPTIONS_CONFIG, VISION_EMBEDS_MODEL)
VISION_EXPECTATIONS = Expectations(
    served_name=VISION_MODEL.name, tokenizer=VISION_MODEL.tokenizer, multimodal=VISION_MODEL.multimodal
)
VISION_EXPECTATIONS_WITH_OPTIONS = Expectations(
    served_name=VISION_MODEL.name,
    tokenizer=VISION_MODEL.tokenizer,
    force_include_usage=True,
    request_id_headers=True,
    multimodal=VISION_EMBEDS_MODEL.multimodal,
    media_limit=2,
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


def phrases(request: FuzzRequest, tokenizer: Tokenizer = MODEL.tokenizer) -> list[list[int]]:
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
            encoded.append(tokenizer.encode(text, add_special_tokens=False))
        except (UnicodeError, ValueError):
            continue
    return encoded


def engine_for(app: App) -> FakeEngine:
    """The fake engine whose vocabulary is the app's models' (the vision apps' holds `<image>`)."""
    return VISION_ENGINE if app in (VISION_APP, VISION_APP_WITH_OPTIONS) else ENGINE


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
    engine = engine_for(app)
    tokenizer = VISION_MODEL.tokenizer if engine is VISION_ENGINE else MODEL.tokenizer
    transcript = engine.run(call, script, phrases(request, tokenizer))
    if transcript.status is not None:
        STATUSES[transcript.status] += 1
    count_media(request_json(request), transcript.status, transcript.fetched)
    return transcript


def count_media(body: dict | None, status: int | None, fetched: Sequence[FetchResult] = ()) -> None:
    """Count a request with media parts by its status, and what its fetches were answered with."""
    if body is not None and media_parts(body):
        MEDIA[str(status) if status is not None else "left"] += 1
    for result in fetched:
        FETCHES["failed" if isinstance(result, MediaFetchFailed) else "fetched"] += 1
