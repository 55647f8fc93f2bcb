"""A scripted fake engine that drives one `Call` to its end, with no threads, clock or IO.

It plays the part of the runtime and the engine together: it runs `call.start()`, answers the
`Generate` commands of every `Submit` with `Tokens` events (random ids inside the vocabulary,
random chunking into engine steps, n samples, finish reasons "stop"/"length", stop token ids,
logprobs and prompt logprobs in the requested shape), answers `Encode` with `Pooled`, honours
`Abort` (whole request or one sample), answers a random share of the `Encode`s per step (one
row per token for the token tasks), and feeds one batch of events per step until
`call.finished`. A hypothesis-drawn `EngineScript` decides the randomness, and may inject a
`Failed` event (before or after the first output) or a client disconnect. A call that asks for
media (`Fetch`) gets one `MediaFetched` or `MediaFetchFailed` per URL at once, drawn from the
script's `fetch_answers` (image bytes, garbage, empty, a failure), unless the client leaves first.

Token streams are drawn per (submission position, sample index) from their own seeded
generators, so the same script yields the same tokens for a streamed and a non-streamed request
even if the two interleave steps differently. The driver records everything in a `Transcript`
that the properties check; it raises `DriverError` only for protocol violations of the call
itself (outputs out of order, a call that waits forever).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from hypothesis import strategies as st

from fuzz import media_samples
from protocol.engine_api import (
    Abort,
    Command,
    Encode,
    Event,
    Failed,
    Generate,
    Pooled,
    TokenLogprobs,
    Tokens,
)
from protocol.media.fetch import FetchResult, MediaFetched, MediaFetchFailed, MediaRequest
from protocol.outputs import Body, Compute, EndResponse, Fetch, Output, StartResponse, Submit, compute_inline

MAX_STEPS = 10_000
MAX_SAMPLE_TOKENS = 24  # a sample never runs longer than this, whatever its max_tokens
MAX_SAMPLES = 1024  # refuse to simulate more samples per call than this: an unbounded n is a core bug
# What the fake runtime may feed back for a media URL: an image sample's bytes (by sample name),
# or "garbage", "truncated" (a sample cut short), "empty", "html" (an error page), "failed".
FETCH_ANSWERS = (*media_samples.IMAGE_NAMES, "garbage", "truncated", "empty", "html", "failed")


class CallLike(Protocol):
    def start(self) -> list[Output]: ...

    def feed(self, events: Sequence[Event]) -> list[Output]: ...

    def disconnected(self) -> list[Command]: ...

    @property
    def finished(self) -> bool: ...


class DriverError(AssertionError):
    """The call broke the runtime contract (its outputs or its waiting), not the response format."""


@dataclass(frozen=True)
class EngineScript:
    """How the fake engine behaves for one call."""

    seed: int = 0
    max_chunk: int = 3  # most tokens one sample gets per step
    empty_chunks: bool = False  # sometimes a step carries no new token (chunked prefill)
    special_tokens: bool = False  # sometimes sample special ids (EOS, chat markers) mid-stream
    minus_inf_logprobs: bool = False  # sometimes report -inf logprobs (the core must clamp)
    use_phrases: bool = False  # splice the phrases given to `run` (stop strings, ...) into samples
    late_events: bool = False  # an aborted sample still gets the event already in flight (as real engines do)
    failure: Literal["none", "before", "after"] = "none"
    failure_status: int = 500
    failure_step: int = 1  # with failure="after": the step (>= 1) that fails, if output began
    disconnect_step: int | None = None  # the client leaves before this step (0: while media is fetched)
    # what the i-th media URL a call asks for returns (cycled), from FETCH_ANSWERS
    fetch_answers: tuple[str, ...] = ("png",)
    fetch_reversed: bool = False  # feed the fetch results back in reverse order (any order is allowed)


def engine_scripts(*, failures: bool = True, disconnects: bool = True) -> st.SearchStrategy[EngineScript]:
    return st.builds(
        EngineScript,
        seed=st.integers(0, 2**32 - 1),
        max_chunk=st.integers(1, 4),
        empty_chunks=st.booleans(),
        special_tokens=st.booleans(),
        minus_inf_logprobs=st.booleans(),
        use_phrases=st.booleans(),
        late_events=st.booleans(),
        failure=st.sampled_from(["none", "none", "none", "before", "after"]) if failures else st.just("none"),
        failure_status=st.sampled_from([400, 500, 500, 503]),
        failure_step=st.integers(1, 4),
        disconnect_step=(st.none() | st.none() | st.integers(0, 4)) if disconnects else st.none(),
        fetch_answers=st.lists(
            st.sampled_from(FETCH_ANSWERS[:3] + FETCH_ANSWERS), min_size=1, max_size=3
        ).map(tuple),
        fetch_reversed=st.booleans(),
    )


@dataclass
class _Sample:
    """One sample (index) of a submitted Generate, as the engine will produce it."""

    position: int  # submission order of its Generate
    request: Generate
    index: int
    plan: list[int]  # all token ids it will produce
    finish_reason: Literal["stop", "length"]
    stop_reason: int | None
    rng: random.Random
    sent: int = 0
    done: bool = False
    cumulative: float = 0.0
    late: bool = False  # aborted; one in-flight event is still owed to the call


@dataclass
class Transcript:
    """What happened while driving one call."""

    status: int | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    ended: bool = False
    generates: list[Generate] = field(default_factory=list)
    encodes: list[Encode] = field(default_factory=list)
    pooled: dict[str, Pooled] = field(default_factory=dict)  # request id -> what the engine answered
    aborts: list[Abort] = field(default_factory=list)
    tokens: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (position, index) -> ids fed
    finish: dict[tuple[int, int], tuple[str, int | None]] = field(default_factory=dict)
    failed: Failed | None = None
    output_before_failure: bool = False  # a Tokens (maybe empty) or Pooled event was fed before the failure
    disconnected: bool = False
    steps: int = 0
    fetches: list[MediaRequest] = field(default_factory=list)  # every URL the call asked for
    fetched: list[FetchResult] = field(default_factory=list)  # what was fed back for them
    fetch_pending: bool = False  # the call asked for media that was never fed back (the client left)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class FakeEngine:
    """Drives calls through a scripted engine; pure apart from the call under test."""

    def __init__(
        self,
        vocab_size: int,
        special_ids: frozenset[int] = frozenset(),
        eos_ids: frozenset[int] = frozenset(),
    ):
        self.vocab_size = vocab_size
        self.special_ids = special_ids
        self.eos_ids = eos_ids
        self._phrases: list[tuple[int, ...]] = []
        self._late_events = False

    def run(
        self, call: CallLike, script: EngineScript = EngineScript(), phrases: Sequence[Sequence[int]] = ()
    ) -> Transcript:
        """Drive `call` to its end. `phrases` are token sequences the "model" may say (to hit stop strings)."""
        self._phrases = [tuple(phrase) for phrase in phrases if phrase]
        self._late_events = script.late_events
        transcript = Transcript()
        rng = random.Random(script.seed)
        samples: list[_Sample] = []
        dead: set[str] = set()  # request ids that failed or were aborted as a whole
        self._play(call, call.start(), transcript, samples, dead, script)
        step = 0
        while not call.finished:
            if step >= MAX_STEPS:
                raise DriverError(f"the call is still not finished after {MAX_STEPS} engine steps")
            if script.disconnect_step is not None and step >= script.disconnect_step:
                transcript.disconnected = True
                commands = call.disconnected()
                for command in commands:
                    if not isinstance(command, Abort):
                        raise DriverError(f"disconnected() returned a non-Abort command {command!r}")
                self._apply_aborts(list(commands), transcript, samples, dead)
                break
            if transcript.fetch_pending:  # only a client that left mid-fetch stops the driver answering
                raise DriverError("the call's media fetch was never answered")
            events = self._step(step, rng, script, transcript, samples, dead)
            if not events:
                raise DriverError(
                    "the call waits for engine events, but every submitted request has finished, failed"
                    " or been aborted (or it submitted nothing)"
                )
            self._play(call, call.feed(events), transcript, samples, dead, script)
            step += 1
        transcript.steps = step
        if call.finished and not transcript.disconnected and not transcript.ended:
            raise DriverError("the call finished without ending its response")
        leaked = sorted(
            {
                (s.request.request_id, s.index)
                for s in samples
                if not s.done and s.request.request_id not in dead
            }
        )
        if leaked:
            # The engine would go on generating for a response nobody reads.
            raise DriverError(f"the call is over but never aborted these running samples: {leaked}")
        running = [e.request_id for e in transcript.encodes if e.request_id not in dead]
        if running:
            raise DriverError(f"the call is over but never aborted these running encodes: {running}")
        return transcript

    def session(self, script: EngineScript = EngineScript()) -> EngineSession:
        """The engine side of one call, stepped by another driver (the served ASGI stack of
        `fuzz/served.py`) instead of `run`: same plans, failures and checks, its own clock."""
        return EngineSession(self, script)

    # ---- outputs of the call

    def _play(
        self,
        call: CallLike,
        outputs: Sequence[Output],
        transcript: Transcript,
        samples: list[_Sample],
        dead: set[str],
        script: EngineScript,
    ) -> None:
        if not isinstance(outputs, list | tuple):
            raise DriverError(f"the call returned {type(outputs).__name__}, not a list of outputs")
        for output in outputs:
            if transcript.ended:
                if isinstance(output, Submit) and all(isinstance(c, Abort) for c in output.commands):
                    self._apply_aborts(list(output.commands), transcript, samples, dead)
                    continue
                raise DriverError(f"output {output!r} after EndResponse")
            if isinstance(output, StartResponse):
                if transcript.status is not None:
                    raise DriverError("a second StartResponse")
                transcript.status = output.status
                transcript.headers = tuple(output.headers)
            elif isinstance(output, Body):
                if transcript.status is None:
                    raise DriverError("Body before StartResponse")
                transcript.body += output.data
            elif isinstance(output, EndResponse):
                if transcript.status is None:
                    raise DriverError("EndResponse before StartResponse")
                transcript.ended = True
            elif isinstance(output, Submit):
                self._submit(output.commands, transcript, samples, dead, script)
            elif isinstance(output, Fetch):
                results = self.fetch(output, transcript, script)
                if script.disconnect_step == 0:  # the client leaves while the media is fetched
                    transcript.fetch_pending = True
                    continue
                self._play(call, call.feed(results), transcript, samples, dead, script)
            elif isinstance(output, Compute):  # decoding media: a server's worker thread runs it
                self._play(call, call.feed([compute_inline(output)]), transcript, samples, dead, script)
            else:
                raise DriverError(f"unknown output {output!r}")

    def fetch(self, fetch: Fetch, transcript: Transcript, script: EngineScript) -> list[FetchResult]:
        """Check a `Fetch` (it comes before any response or engine work, with keys never asked for
        before, so a call cannot loop asking), draw its answers and record both in `transcript`."""
        if transcript.status is not None or transcript.generates or transcript.encodes:
            raise DriverError("a Fetch after the response started or engine work was submitted")
        if not fetch.requests:
            raise DriverError("a Fetch of no URLs")
        keys = [request.key for request in fetch.requests]
        if len(set(keys)) != len(keys) or set(keys) & {request.key for request in transcript.fetches}:
            raise DriverError(f"Fetch keys are not unique: {keys}")
        results = fetch_results(fetch.requests, script)
        transcript.fetches.extend(fetch.requests)
        transcript.fetched.extend(results)
        return results

    def _submit(
        self,
        commands: Sequence[Command],
        transcript: Transcript,
        samples: list[_Sample],
        dead: set[str],
        script: EngineScript,
    ) -> None:
        aborts: list[Abort] = []
        for command in commands:
            if isinstance(command, Generate):
                self._check_generate(command, transcript)
                position = len(transcript.generates)
                transcript.generates.append(command)
                if len(samples) + command.params.n > MAX_SAMPLES:
                    raise DriverError(
                        f"the call asks for {len(samples) + command.params.n} samples; the core let n grow unbounded"
                    )
                for index in range(command.params.n):
                    samples.append(self._plan(position, command, index, script))
            elif isinstance(command, Encode):
                self._check_encode(command, transcript)
                transcript.encodes.append(command)
            elif isinstance(command, Abort):
                aborts.append(command)
            else:
                raise DriverError(f"unknown command {command!r}")
        self._apply_aborts(aborts, transcript, samples, dead)

    def _check_generate(self, command: Generate, transcript: Transcript) -> None:
        known = {g.request_id for g in transcript.generates} | {e.request_id for e in transcript.encodes}
        if command.request_id in known:
            raise DriverError(f"request id {command.request_id!r} submitted twice")
        params = command.params
        if not command.prompt_token_ids:
            raise DriverError("a Generate with an empty prompt")
        bad = [t for t in command.prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise DriverError(f"prompt token ids out of the vocabulary reached the engine: {bad[:5]}")
        if params.n < 1 or params.max_tokens < 1:
            raise DriverError(f"invalid sampling params reached the engine: {params!r}")

    def _check_encode(self, command: Encode, transcript: Transcript) -> None:
        known = {g.request_id for g in transcript.generates} | {e.request_id for e in transcript.encodes}
        if command.request_id in known:
            raise DriverError(f"request id {command.request_id!r} submitted twice")
        prompt = command.prompt_token_ids
        if not prompt:
            raise DriverError("an Encode with an empty prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise DriverError(f"prompt token ids out of the vocabulary reached the engine: {bad[:5]}")
        if command.token_type_ids is not None and len(command.token_type_ids) != len(prompt):
            raise DriverError("token_type_ids must have one entry per prompt token")
        if command.params.dimensions is not None and command.params.dimensions < 1:
            raise DriverError(f"invalid pooling params reached the engine: {command.params!r}")

    def _apply_aborts(
        self, aborts: list[Abort], transcript: Transcript, samples: list[_Sample], dead: set[str]
    ) -> None:
        for abort in aborts:
            transcript.aborts.append(abort)
            for sample in samples:
                if sample.request.request_id == abort.request_id and abort.index in (None, sample.index):
                    sample.late = self._late_events and not sample.done and transcript.failed is None
                    sample.done = True
            if abort.index is None:
                dead.add(abort.request_id)

    # ---- the engine side

    def _plan(self, position: int, request: Generate, index: int, script: EngineScript) -> _Sample:
        params = request.params
        rng = random.Random(f"{script.seed}:{position}:{index}")
        limit = min(params.max_tokens, MAX_SAMPLE_TOKENS)
        length = rng.randint(max(1, min(params.min_tokens, limit)), limit)
        finish: Literal["stop", "length"] = "length" if length == params.max_tokens else "stop"
        choices = list(params.allowed_token_ids or range(self.vocab_size))
        ordinary = [t for t in choices if t not in self.special_ids] or choices
        plan = [
            rng.choice(choices if script.special_tokens and rng.random() < 0.1 else ordinary)
            for _ in range(length)
        ]
        if script.use_phrases and self._phrases and rng.random() < 0.7:
            phrase = list(rng.choice(self._phrases))
            at = rng.randint(0, max(0, length - len(phrase)))
            plan = (plan[:at] + phrase + plan[at:])[:length]
        stop_reason: int | None = None
        if finish == "stop":
            # The last token ended the sample: a stop token id (reported as stop_reason) or EOS.
            # (only ids inside the vocabulary: the engine never samples others)
            stop_ids = [t for t in params.stop_token_ids if 0 <= t < self.vocab_size]
            if stop_ids and rng.random() < 0.5:
                stop_reason = rng.choice(stop_ids)
                plan[-1] = stop_reason
            elif self.eos_ids and not params.ignore_eos and rng.random() < 0.5:
                plan[-1] = rng.choice(sorted(self.eos_ids))
        return _Sample(position, request, index, plan, finish, stop_reason, rng)

    def _step(
        self,
        step: int,
        rng: random.Random,
        script: EngineScript,
        transcript: Transcript,
        samples: list[_Sample],
        dead: set[str],
    ) -> list[Event]:
        live = [s for s in samples if not s.done and s.request.request_id not in dead]
        pending_encodes = [e for e in transcript.encodes if e.request_id not in dead]
        fail = script.failure == "before" and step == 0
        fail = fail or (
            script.failure == "after" and step >= script.failure_step and transcript.output_before_failure
        )
        if fail and transcript.failed is None and (live or pending_encodes):
            victim = (live[0].request.request_id) if live else pending_encodes[0].request_id
            transcript.failed = Failed(
                victim, script.failure_status, f"injected engine failure {script.failure_status}"
            )
            dead.add(victim)
            for sample in samples:
                if sample.request.request_id == victim:
                    sample.done = True
            return [transcript.failed]
        events: list[Event] = []
        if pending_encodes:  # a random share of the inputs finishes in this step, in any order
            rng.shuffle(pending_encodes)
            for encode in pending_encodes[: rng.randint(1, len(pending_encodes))]:
                pooled = self._pooled(encode, rng)
                transcript.pooled[encode.request_id] = pooled
                events.append(pooled)
                dead.add(encode.request_id)
                if transcript.failed is None:
                    transcript.output_before_failure = True
        for sample in samples:
            if sample.late:  # the step that was running when the abort came in
                sample.late = False
                events.append(self._late_event(sample))
        rng.shuffle(live)
        for sample in live:
            events.append(self._tokens(sample, script, transcript))
        return events

    @staticmethod
    def _late_event(sample: _Sample) -> Tokens:
        return Tokens(
            request_id=sample.request.request_id,
            index=sample.index,
            token_ids=(sample.rng.randrange(0, 256),),
            num_prompt_tokens=len(sample.request.prompt_token_ids),
            finish_reason="abort",
        )

    def _pooled(self, encode: Encode, rng: random.Random) -> Pooled:
        """A vector (`dimensions` long, else 4), or one such row per prompt token for the token tasks."""
        size = encode.params.dimensions or 4
        prompt_len = len(encode.prompt_token_ids)
        if encode.params.task in ("token_embed", "token_classify"):
            rows = tuple(tuple(rng.uniform(-1, 1) for _ in range(size)) for _ in range(prompt_len))
            return Pooled(encode.request_id, rows, prompt_len)
        return Pooled(encode.request_id, tuple(rng.uniform(-1, 1) for _ in range(size)), prompt_len)

    def _tokens(self, sample: _Sample, script: EngineScript, transcript: Transcript) -> Tokens:
        rng = sample.rng
        params = sample.request.params
        first = sample.sent == 0
        count = rng.randint(0 if script.empty_chunks else 1, script.max_chunk)
        chunk = sample.plan[sample.sent : sample.sent + count]
        sample.sent += len(chunk)
        last = sample.sent >= len(sample.plan)
        logprobs = None
        if params.logprobs is not None:
            logprobs = tuple(self._logprob(token, params.logprobs, rng, script) for token in chunk)
            sample.cumulative += sum(entry.logprob for entry in logprobs)
        prompt_logprobs = None
        if first and params.prompt_logprobs is not None:
            prompt = sample.request.prompt_token_ids
            prompt_logprobs = (None,) + tuple(
                self._logprob(t, params.prompt_logprobs, rng, script) for t in prompt[1:]
            )
        key = (sample.position, sample.index)
        transcript.tokens.setdefault(key, []).extend(chunk)
        if transcript.failed is None:
            transcript.output_before_failure = True
        if last:
            sample.done = True
            transcript.finish[key] = (sample.finish_reason, sample.stop_reason)
        prompt_len = len(sample.request.prompt_token_ids)
        return Tokens(
            request_id=sample.request.request_id,
            index=sample.index,
            token_ids=tuple(chunk),
            num_prompt_tokens=prompt_len,
            num_cached_tokens=random.Random(f"{script.seed}:{sample.position}").randint(0, prompt_len),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            finish_reason=sample.finish_reason if last else None,
            stop_reason=sample.stop_reason if last else None,
            cumulative_logprob=sample.cumulative if params.logprobs is not None else None,
        )

    def _logprob(self, token: int, k: int, rng: random.Random, script: EngineScript) -> TokenLogprobs:
        """The chosen token's logprob and rank, plus the top-k alternatives, consistent with each other."""
        k = self.vocab_size if k < 0 else min(k, self.vocab_size)
        values = sorted((rng.uniform(-12.0, 0.0) for _ in range(k + 1)), reverse=True)
        if script.minus_inf_logprobs and rng.random() < 0.2:
            values[-1] = float("-inf")
        others = rng.sample([t for t in range(self.vocab_size) if t != token], k)
        rank = rng.randint(1, k + 1)
        ids = others[: rank - 1] + [token] + others[rank - 1 :]
        top = tuple(zip(ids[:k], values[:k], strict=True))
        return TokenLogprobs(token_id=token, logprob=values[rank - 1], rank=rank, top=top)


class EngineSession:
    """One call's engine state for a driver that owns the loop: it submits the call's commands as
    they come and asks for one engine step at a time while `busy`."""

    def __init__(self, engine: FakeEngine, script: EngineScript) -> None:
        self.engine = engine
        self.script = script
        self.transcript = Transcript()
        self.samples: list[_Sample] = []
        self.dead: set[str] = set()
        self.rng = random.Random(script.seed)
        self.steps = 0
        engine._phrases = []
        engine._late_events = script.late_events

    def submit(self, commands: Sequence[Command]) -> None:
        """Take a `Submit`'s commands (raises `DriverError` on a runtime-contract violation)."""
        self.engine._submit(commands, self.transcript, self.samples, self.dead, self.script)

    def fetch(self, requests: Sequence[MediaRequest]) -> list[FetchResult]:
        """Answer a call's media URLs as the runtime's fetcher would (raises `DriverError` on a
        contract violation)."""
        return self.engine.fetch(Fetch(tuple(requests)), self.transcript, self.script)

    @property
    def busy(self) -> bool:
        """Work is running (samples or encodes), or an aborted sample still owes its in-flight event."""
        return any(
            s.late or (not s.done and s.request.request_id not in self.dead) for s in self.samples
        ) or any(e.request_id not in self.dead for e in self.transcript.encodes)

    def step(self) -> list[Event]:
        """One engine step's events."""
        events = self.engine._step(
            self.steps, self.rng, self.script, self.transcript, self.samples, self.dead
        )
        self.steps += 1
        return events

    def leaked(self) -> list[str]:
        """Request ids whose engine work is still running (a finished call must have aborted them)."""
        samples = {
            s.request.request_id for s in self.samples if not s.done and s.request.request_id not in self.dead
        }
        encodes = {e.request_id for e in self.transcript.encodes if e.request_id not in self.dead}
        return sorted(samples | encodes)


def fetch_results(requests: Sequence[MediaRequest], script: EngineScript) -> list[FetchResult]:
    """The runtime's answers to a `Fetch`: the i-th URL gets `script.fetch_answers[i % len]`, as
    `MediaFetched` bytes (with a plausible or misleading Content-Type) or a `MediaFetchFailed`
    quoting the URL as the real fetcher does (`sansllm.media_fetch`)."""
    results: list[FetchResult] = []
    images = media_samples.images()
    for index, request in enumerate(requests):
        answer = script.fetch_answers[index % len(script.fetch_answers)]
        if answer == "failed":
            results.append(MediaFetchFailed(request.key, f"HTTP 404 fetching '{request.url[:100]}'"))
        elif answer in images:
            results.append(MediaFetched(request.key, images[answer], media_samples.mime_of(answer)))
        elif answer == "truncated":
            results.append(MediaFetched(request.key, images["png"][:40], "image/png"))
        elif answer == "empty":
            results.append(MediaFetched(request.key, b"", None))
        elif answer == "html":
            results.append(MediaFetched(request.key, b"<html><body>Not Found</body></html>", "text/html"))
        else:
            garbage = random.Random(f"{script.seed}:fetch:{index}").randbytes(48)
            results.append(MediaFetched(request.key, garbage, "application/octet-stream"))
    return results[::-1] if script.fetch_reversed else results
