"""Generated input, driven by maintained tools: schemathesis against the server's own OpenAPI schema (every
response must be one the schema declares, with its status, content type and body shape, and no 5xx), and
hypothesis for the small parsers a request or a command line reaches (`_parse_range`, segment bounds, `--set`).

Bounded for CI: a few dozen examples per property, no deadline (a loaded 2-core runner must not flake).
"""

from __future__ import annotations

import math
import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("faiss")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stanvid.cli.common import parse_overrides  # noqa: E402
from stanvid.errors import ConfigError, VideoReadError  # noqa: E402
from stanvid.models.config import MODEL_OVERRIDES  # noqa: E402
from stanvid.search.index import (  # noqa: E402
    VideoIndexError,
    build_index,
    segment_bounds,
    segment_frame_indices,
    segments_with_frames,
)
from stanvid.training.recipe import parse_override  # noqa: E402

FEW = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


# ---------------------------------------------------------------------------------------------- Range header
def _media():
    pytest.importorskip("fastapi")
    from stanvid.search.server import media

    return media


_digits = st.integers(min_value=0, max_value=10**20).map(str)
_range_headers = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda a, b: f"bytes={a}-{b}", st.one_of(st.just(""), _digits), st.one_of(st.just(""), _digits)
    ),
    st.builds(lambda a, b: f" bytes={a}-{b},0-1 ", _digits, _digits),
    st.just("bytes=" + "9" * 5000 + "-"),  # an integer Python refuses to parse from text
)


@FEW
@given(header=_range_headers, size=st.integers(min_value=0, max_value=10**12))
def test_parse_range_answers_a_valid_span_or_416(header, size):
    media = _media()
    try:
        start, end = media.parse_range(header, size)
    except media.BadRequest as exc:
        assert exc.status == 416 and exc.headers == {"Content-Range": f"bytes */{size}"}
        return
    assert 0 <= start <= end < size
    # the same span by the RFC's rules, computed independently
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    assert match is not None
    first, last = match.groups()
    if first == "":
        assert (start, end) == (max(0, size - int(last)), size - 1)
    else:
        assert start == int(first)
        assert end == (size - 1 if last == "" else min(int(last), size - 1))


# ---------------------------------------------------------------------------------------------- segments
_durations = st.floats(min_value=1e-3, max_value=1e5, allow_nan=False)
_lengths = st.floats(min_value=0.1, max_value=1e3, allow_nan=False)


@FEW
@given(duration=_durations, seconds=_lengths)
def test_segment_bounds_tile_the_video(duration, seconds):
    try:
        spans = segment_bounds(duration, seconds, limit=10_000)
    except VideoIndexError as exc:
        assert "at most 10000" in str(exc)
        assert duration / seconds > 10_000 - 1
        return
    assert spans[0][0] == 0.0 and spans[-1][1] == duration
    for (_, b), (c, _) in zip(spans, spans[1:], strict=False):
        assert b == c  # contiguous
    assert all(0 < b - a <= seconds * (1 + 1e-9) for a, b in spans)
    assert len(spans) == max(1, math.ceil(duration / seconds - 1e-9))


@FEW
@given(
    num_frames=st.integers(min_value=1, max_value=400),
    fps=st.one_of(st.floats(min_value=0.5, max_value=120), st.floats(min_value=1e-9, max_value=1e-3)),
    seconds=st.one_of(_lengths, st.none()),
)
def test_segments_with_frames_are_the_non_empty_segment_bounds(num_frames, fps, seconds):
    duration = num_frames / fps
    try:
        fast = segments_with_frames(duration, fps, num_frames, seconds, limit=2000)
    except VideoReadError as exc:
        assert "at most 2000" in str(exc)
        return
    if seconds is not None and duration / seconds > 2000:  # the full list would be refused: compare a count
        assert len(fast) <= num_frames
        return
    slow = [
        (a, b)
        for a, b in segment_bounds(duration, seconds, limit=2000)
        if segment_frame_indices(a, b, fps, num_frames, 4) is not None
    ]
    assert fast == slow
    assert len(fast) <= num_frames  # bounded by what the file holds, whatever its duration


def test_huge_bounds_are_refused_not_built():
    with pytest.raises(VideoIndexError, match="at most"):
        segment_bounds(1e12, 0.1)
    with pytest.raises(VideoReadError, match="longer --segment-seconds"):
        segments_with_frames(1e4, 30.0, 300_000, 0.1, limit=1000)


# ---------------------------------------------------------------------------------------------- --set
_keys = st.one_of(
    st.sampled_from(sorted(MODEL_OVERRIDES)),
    st.text(alphabet=st.characters(blacklist_characters="=", blacklist_categories=("Cs",)), max_size=12),
)
_values = st.one_of(
    st.sampled_from(["true", "False", "0", "12", "-3", "abc", "0.5,0.5,0.5", "gelu", ""]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
)


@FEW
@given(key=_keys, value=_values)
def test_model_overrides_parse_or_name_the_item(key, value):
    """A known key gets a value of its declared type; anything else is one ConfigError naming the item."""
    item = f"{key}={value}"
    try:
        parsed = parse_overrides([item])
    except ConfigError as exc:
        message = str(exc)
        assert repr(item) in message or repr(key.strip()) in message or f"--set {key.strip()}:" in message
        return
    name = key.strip()
    assert list(parsed) == [name] and name in MODEL_OVERRIDES
    got, kind = parsed[name], MODEL_OVERRIDES[name][1]
    if kind is int:
        assert isinstance(got, int) and got == int(value.strip())
    elif kind is str:
        assert got == value.strip()
    else:  # booleans and number lists come back typed, never as the raw text
        assert not isinstance(got, str)


@FEW
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_recipe_overrides_parse_or_raise_config_error(text):
    try:
        parts, _ = parse_override(text)
    except ConfigError as exc:
        assert repr(text) in str(exc)
        return
    key = text.partition("=")[0].strip()
    assert parts == key.split(".") and all(parts)


@FEW
@given(
    value=st.one_of(
        st.integers(min_value=-(10**9), max_value=10**9),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
    )
)
def test_recipe_override_values_keep_their_type(value):
    text = "optim.lr=" + ("true" if value is True else "false" if value is False else repr(value))
    _, parsed = parse_override(text)
    assert type(parsed) is type(value) and parsed == value


# ---------------------------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    schemathesis = pytest.importorskip("schemathesis")
    pytest.importorskip("fastapi")
    from indexkit import make_folder, save_tiny_model
    from stanvid.search.server.app import create_app

    base = tmp_path_factory.mktemp("fuzz")
    model_dir = save_tiny_model(base / "model")
    root = make_folder(base / "videos", {"a.mp4": (20, 1, "h264"), "b.mkv": (12, 2, "h264")})
    build_index(root, base / "idx", model_dir, segment_seconds=1.0, num_workers=0, progress=False)
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(base / "idx"))


def test_the_schema_declares_every_route_and_its_responses(api_schema):
    operations = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert operations == {
        ("GET", "/api/info"),
        ("GET", "/api/search"),
        ("GET", "/api/like/{segment_id}"),
        ("POST", "/api/search/image"),
        ("GET", "/api/thumbnail/{segment_id}"),
        ("GET", "/api/video/{file_id}"),
        ("HEAD", "/api/video/{file_id}"),
        ("GET", "/api/moment/{file_id}"),
        ("GET", "/api/copies/{file_id}"),
    }
    raw = api_schema.raw_schema["paths"]
    assert set(raw["/api/video/{file_id}"]["get"]["responses"]) >= {"200", "206", "400", "404", "409", "416"}
    assert "image/jpeg" in raw["/api/thumbnail/{segment_id}"]["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_get_declared_answers(api_schema, mode):
    """Every operation, schema-valid and schema-invalid requests: schemathesis's checks (no 5xx, status code,
    content type, headers and body conform to the schema; valid data accepted, invalid data rejected)."""
    from schemathesis.generation import GenerationMode

    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode == "negative" and not list(operation.iter_parameters()):
            continue  # nothing to make invalid (/api/info)

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy(generation_mode=generation))
        def check(case):
            from schemathesis.checks import positive_data_acceptance

            # An uploaded image must also decode to a picture of at least 4x4 pixels, which a schema cannot say:
            # schemathesis's generated bytes are a 1x1 JPEG, rightly refused with 400, so for that one route the
            # "valid data is accepted" check cannot apply (every other check still does).
            # Likewise a filter's value must be a real date, a duration, a balanced glob, a range in order
            # (`stanvid.search.index.filters`): a schema-valid one may be refused with 422.
            filtered = bool(set(case.query or {}) & {"in", "after", "before", "min_duration", "max_duration",
                                                     "created_after", "created_before", "title"})  # fmt: skip
            excluded = (
                [positive_data_acceptance] if case.operation.path == "/api/search/image" or filtered else []
            )
            case.call_and_validate(excluded_checks=excluded)

        check()
