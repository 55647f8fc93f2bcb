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
from protocol.testing import tiny_served_model

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


def make_app(*, api_key: bool = False) -> App:
    """A fresh app (fresh id counter) serving the tiny byte-level model, with a fixed clock."""
    ids = itertools.count(1)
    config = AppConfig(api_keys=[API_KEY] if api_key else [])
    return App(config, [MODEL], clock=lambda: 1_700_000_000.0, new_id=lambda: f"fz{next(ids)}")


APP = make_app()
APP_WITH_KEY = make_app(api_key=True)


def exchange(request: FuzzRequest, script: EngineScript, app: App = APP) -> Transcript:
    """Run one request end to end; exceptions from the core propagate (that is a finding).

    Requests that would hit a bug already pinned in `fuzz/test_regressions.py` are skipped.
    """
    assume(known_bug(request) is None)
    EXERCISED[request.family] += 1
    call = app.handle(request.method, request.path, request.headers, request.body)
    transcript = ENGINE.run(call, script)
    if transcript.status is not None:
        STATUSES[transcript.status] += 1
    return transcript
