"""Properties of settings parsing (`pipeline.settings.load_settings`): whatever the keyword overrides, the YAML
file and the `SINKSTREAM_*` environment hold, the result is a valid `Settings`, or an error the CLI turns into
one line (pydantic's `ValidationError`, the project's `UserError`), never another exception (a traceback).

Two inputs break that today (xfail tests at the end): a YAML file that is not a mapping of str keys, and a
section-level variable (`SINKSTREAM_CACHE`) that is not JSON.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.errors import UserError
from pipeline.settings import Settings, load_settings, settings_env_names

SECTIONS = {name: info.annotation for name, info in Settings.model_fields.items()}
FIELD_NAMES = sorted(
    {f for s in SECTIONS.values() if hasattr(s, "model_fields") for f in s.model_fields} | set(SECTIONS)
)
ENV_NAMES = sorted(settings_env_names())

_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["auto", "cpu", "json", "INFO", "redis://127.0.0.1:1/0", "127.0.0.1:9092", "64", "-1"]),
)
_key = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
_value = st.recursive(
    _scalar, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_key, inner, max_size=4)),
    max_leaves=12,
)
_overrides = st.dictionaries(_key, _value, max_size=5)
# Environment text: no NUL (the OS refuses it); otherwise anything, JSON-looking or not.
_env_text = st.one_of(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30),
                      st.sampled_from(["1", "0", "true", "{}", "[]", "null", "1e400", "-5", "DEBUG", "smollm2-135m"]))

OK_ERRORS = (ValidationError, UserError)


@contextlib.contextmanager
def _isolated(env: dict[str, str], yaml_text: str | None = None) -> Iterator[Path | None]:
    """Run in an empty folder (no ./config.yaml) with only `env` among the SINKSTREAM_* variables."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            os.chdir(tmp)
            for k in [k for k in os.environ if k.upper().startswith("SINKSTREAM_") and k != "SINKSTREAM_HOME"]:
                del os.environ[k]
            os.environ.update(env)
            path = None
            if yaml_text is not None:
                path = Path(tmp) / "config.yaml"
                path.write_text(yaml_text, encoding="utf-8", errors="surrogatepass")
            yield path
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)


def _load(path=None, **overrides) -> Settings | Exception:
    try:
        return load_settings(path, **overrides)
    except OK_ERRORS as exc:
        return exc


@given(_overrides)
def test_any_keyword_overrides_give_settings_or_a_validation_error(overrides):
    with _isolated({}):
        result = _load(**{str(k): v for k, v in overrides.items()})
    assert isinstance(result, (Settings, *OK_ERRORS))


@given(st.dictionaries(st.text(max_size=8).filter(lambda s: s.isidentifier()), _value, max_size=5)
       .map(lambda d: {k: v for k, v in d.items()}), st.data())
def test_any_yaml_mapping_with_str_keys_gives_settings_or_a_validation_error(doc, data):
    section = data.draw(st.sampled_from(sorted(SECTIONS)))
    nested = data.draw(st.dictionaries(st.sampled_from(FIELD_NAMES), _value, max_size=4))
    doc = {**doc, section: nested}
    with _isolated({}, yaml.safe_dump(doc, allow_unicode=True)) as path:
        result = _load(path)
    assert isinstance(result, (Settings, *OK_ERRORS))


_field_env = st.sampled_from(
    [n for n in ENV_NAMES if "__" in n or n in ("SINKSTREAM_LOG_LEVEL", "SINKSTREAM_LOG_FORMAT")]
)
_unknown_env = st.text(st.sampled_from("ABCDEFXYZ_"), min_size=1, max_size=10).map(lambda s: "SINKSTREAM_" + s)


@given(st.dictionaries(st.one_of(_field_env, _unknown_env), _env_text, max_size=5))
def test_any_field_level_environment_gives_settings_or_a_user_facing_error(env):
    with _isolated(env):
        result = _load()
    assert isinstance(result, (Settings, *OK_ERRORS))


@given(st.dictionaries(st.sampled_from(sorted(SECTIONS)),
                       st.dictionaries(st.sampled_from(FIELD_NAMES), _value, max_size=3), max_size=3))
def test_valid_settings_survive_a_round_trip_through_yaml(sections):
    with _isolated({}, yaml.safe_dump(sections)) as path:
        result = _load(path)
        if isinstance(result, Settings):
            again = _load(None, **result.model_dump(mode="python"))
            assert isinstance(again, Settings) and again == result


# ---- known bugs (coordinator: pipeline/settings.py load_settings) ----------------------------------------------


@given(st.text(max_size=60))
@example(":\n  - [")
@example("- 1\n- 2\n")
@example("1: 2\n")
@example("\tcache:\n")
def test_any_yaml_text_gives_settings_or_a_user_facing_error(text):
    with _isolated({}, text) as path:
        try:
            result = _load(path)
        except Exception as exc:
            raise AssertionError(f"{type(exc).__module__}.{type(exc).__name__} escaped load_settings: {exc}") from exc
    assert isinstance(result, (Settings, *OK_ERRORS))


@given(st.sampled_from(sorted(f"SINKSTREAM_{s.upper()}" for s in SECTIONS)), _env_text)
@example("SINKSTREAM_CACHE", "{bad")
def test_any_section_level_environment_gives_settings_or_a_user_facing_error(name, value):
    with _isolated({name: value}):
        try:
            result = _load()
        except Exception as exc:
            raise AssertionError(f"{type(exc).__module__}.{type(exc).__name__} escaped load_settings: {exc}") from exc
    assert isinstance(result, (Settings, *OK_ERRORS))


@given(st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), min_size=8, max_size=16),
       st.sampled_from(["http://", "redis:/", "rediss//", "tcp://"]))
@example("hunter2hunter2", "http://")
def test_a_rejected_redis_url_never_shows_its_password(password, scheme):
    from pipeline.settings import describe_validation_error

    with _isolated({}):
        result = _load(redis={"url": f"{scheme}:{password}@cache.internal:6379/0"})
        other = _load(redis={"url": f"{scheme}:OTHER-PASSWORD@cache.internal:6379/0"})
    assert isinstance(result, ValidationError) and isinstance(other, ValidationError)
    # The message does not depend on the password at all (a password may be a word of the message itself, such
    # as "settings"), and the fixed one, which no message contains, does not show.
    assert describe_validation_error(result) == describe_validation_error(other)
    assert "OTHER-PASSWORD" not in describe_validation_error(other)
