"""The template catalog: discovery, overrides, required-variable analysis, validation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import outbox
from outbox._errors import ConfigurationError, MissingTemplateVariables, UnknownTemplate
from outbox._templates import (
    CHANNELS,
    TemplateCatalog,
    default_catalog,
    format_value,
    set_default_catalog,
)

# DESIGN section 6, verbatim.
DESIGN_VARIABLES = {
    "position_failure_entry": (
        {"instrument", "side", "entry_price", "volume", "error_reason", "approval_id"},
        set(),
    ),
    "position_failure_sl": (
        {"instrument", "side", "entry_price", "current_price", "loss_amount", "broker_ticket"},
        {"currency"},
    ),
    "position_failure_tp": (
        {"instrument", "side", "entry_price", "current_price", "profit_amount", "broker_ticket"},
        {"currency"},
    ),
    "price_alert": ({"instrument", "trigger_price", "current_price", "condition"}, set()),
}


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def analyse(tmp_path: Path, source: str, **partials: str) -> tuple[set[str], set[str]]:
    files = {"telegram/probe.md.j2": source}
    files.update({f"telegram/{name}.md.j2": text for name, text in partials.items()})
    catalog = TemplateCatalog(write(tmp_path, files), builtin=False)
    found = catalog.variables("telegram", "probe")
    return set(found.required), set(found.optional)


@pytest.fixture
def catalog() -> TemplateCatalog:
    return TemplateCatalog()


@pytest.fixture
def restore_default_catalog() -> Iterator[None]:
    set_default_catalog(None)
    yield
    set_default_catalog(None)


def test_every_builtin_template_exists_for_all_three_channels(catalog: TemplateCatalog) -> None:
    assert [info.name for info in catalog.templates()] == sorted(DESIGN_VARIABLES)
    for info in catalog.templates():
        assert info.channels == CHANNELS


@pytest.mark.parametrize("name", sorted(DESIGN_VARIABLES))
@pytest.mark.parametrize("channel", CHANNELS)
def test_required_variables_read_from_the_templates_match_the_design(
    catalog: TemplateCatalog, name: str, channel: str
) -> None:
    required, optional = DESIGN_VARIABLES[name]
    found = catalog.variables(channel, name)
    assert found.required == required
    assert found.optional == optional
    assert catalog.info(name).required_for(channel) == required


def test_the_listing_describes_each_template_as_json_ready_data(catalog: TemplateCatalog) -> None:
    described = catalog.info("position_failure_sl").as_dict()
    assert described["name"] == "position_failure_sl"
    assert described["channels"] == ["email", "telegram", "push", "inapp", "sms"]
    assert described["required"] == sorted(DESIGN_VARIABLES["position_failure_sl"][0])
    assert described["optional"] == ["currency"]
    assert described["by_channel"]["push"]["optional"] == ["currency"]


def test_partials_whose_names_start_with_an_underscore_are_not_templates(
    catalog: TemplateCatalog,
) -> None:
    assert "_layout" not in catalog.names()
    with pytest.raises(UnknownTemplate):
        catalog.validate("email", "_layout", {})


def test_validate_accepts_every_required_variable_plus_extra_and_optional_ones(
    catalog: TemplateCatalog,
) -> None:
    required, _ = DESIGN_VARIABLES["position_failure_sl"]
    vars: dict[str, Any] = dict.fromkeys(required, "x")
    catalog.validate("telegram", "position_failure_sl", vars)
    catalog.validate("telegram", "position_failure_sl", {**vars, "currency": "USD", "extra": 1})


def test_validate_names_every_missing_variable(catalog: TemplateCatalog) -> None:
    with pytest.raises(MissingTemplateVariables) as raised:
        catalog.validate("email", "price_alert", {"instrument": "EURUSD", "condition": "above"})
    assert raised.value.missing == ("current_price", "trigger_price")
    assert "current_price, trigger_price" in str(raised.value)
    assert "price_alert" in str(raised.value)


def test_a_variable_passed_as_null_counts_as_given(catalog: TemplateCatalog) -> None:
    vars = dict.fromkeys(DESIGN_VARIABLES["price_alert"][0])
    catalog.validate("push", "price_alert", vars)


def test_validate_raises_unknown_template_naming_the_known_ones(catalog: TemplateCatalog) -> None:
    with pytest.raises(UnknownTemplate) as raised:
        catalog.validate("email", "margin_call", {})
    assert "margin_call" in str(raised.value)
    assert "position_failure_sl" in str(raised.value)
    assert isinstance(raised.value, outbox.InvalidMessage)


def test_validate_raises_unknown_template_for_a_channel_the_template_lacks(
    tmp_path: Path,
) -> None:
    catalog = TemplateCatalog(write(tmp_path, {"email/digest.html.j2": "<title>x</title>"}))
    catalog.validate("email", "digest", {})
    with pytest.raises(UnknownTemplate, match="'digest' for channel 'telegram'"):
        catalog.validate("telegram", "digest", {})
    assert catalog.info("digest").channels == ("email",)


def test_validate_rejects_vars_that_are_not_a_mapping(catalog: TemplateCatalog) -> None:
    with pytest.raises(outbox.InvalidMessage, match="mapping"):
        catalog.validate("email", "price_alert", ["instrument"])  # type: ignore[arg-type]


def test_enqueue_raises_for_a_missing_variable_before_touching_the_connection(
    restore_default_catalog: None,
) -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"enqueue used the connection ({name}) before validating")

    vars = {"instrument": "EURUSD", "condition": "above", "current_price": 1.1}
    with pytest.raises(MissingTemplateVariables, match="trigger_price"):
        outbox.enqueue(
            Untouchable(), user_id="u1", channel="telegram", template="price_alert", vars=vars
        )
    with pytest.raises(UnknownTemplate):
        outbox.enqueue(Untouchable(), user_id="u1", channel="push", template="nope", vars={})


@pytest.mark.parametrize(
    ("source", "required", "optional"),
    [
        pytest.param("{{ a }} {{ b.c }} {{ d[0] }}", {"a", "b", "d"}, set(), id="plain use"),
        pytest.param("{{ x | default('USD') }}", set(), {"x"}, id="default filter"),
        pytest.param("{{ x | d('USD') }}", set(), {"x"}, id="d alias"),
        pytest.param("{% if x is defined %}{{ x }}{% endif %}", set(), {"x"}, id="is defined"),
        pytest.param(
            "{% if x is not defined %}-{% else %}{{ x }}{% endif %}", set(), {"x"}, id="not"
        ),
        pytest.param(
            "{% if x is undefined %}-{% elif y %}{{ x }}{% else %}{{ x }}{% endif %}",
            {"y"},
            {"x"},
            id="undefined with elif",
        ),
        pytest.param("{{ x if x is defined else '-' }}", set(), {"x"}, id="conditional"),
        pytest.param("{{ x is defined and x > 1 }}", set(), {"x"}, id="and"),
        pytest.param("{{ x is undefined or x > 1 }}", set(), {"x"}, id="or"),
        pytest.param(
            "{% if x is defined and y %}{{ x }}{{ y }}{% endif %}", {"y"}, {"x"}, id="and guard"
        ),
        pytest.param("{% if x %}{{ x }}{% endif %}", {"x"}, set(), id="truth test"),
        pytest.param("{{ x | default('') }}{{ x }}", {"x"}, set(), id="one bare use"),
        pytest.param("{% if x is defined %}{{ y }}{% endif %}", {"y"}, {"x"}, id="other name"),
        pytest.param("{% for i in items %}{{ i }}{% endfor %}", {"items"}, set(), id="loop"),
        pytest.param("{% set y = 2 %}{{ y }}", set(), set(), id="set"),
        pytest.param("{% macro m(a) %}{{ a }}{% endmacro %}{{ m(b) }}", {"b"}, set(), id="macro"),
        pytest.param(
            "{{ platform_url('/x') }} {{ lane }} {{ message_id }} {{ range(3) | list }}",
            set(),
            set(),
            id="renderer names and globals",
        ),
        pytest.param("{{ x | code }}", {"x"}, set(), id="channel filter"),
    ],
)
def test_the_analysis_sorts_variables_into_required_and_optional(
    tmp_path: Path, source: str, required: set[str], optional: set[str]
) -> None:
    assert analyse(tmp_path, source) == (required, optional)


def test_the_analysis_follows_includes_and_imports(tmp_path: Path) -> None:
    source = '{% include "telegram/_part.md.j2" %}{% from "telegram/_m.md.j2" import m %}{{ m() }}'
    found = analyse(tmp_path, source, _part="{{ a }}", _m="{% macro m() %}{{ b }}{% endmacro %}")
    assert found == ({"a", "b"}, set())


def test_an_email_needs_the_variables_of_its_text_part_too(tmp_path: Path) -> None:
    catalog = TemplateCatalog(
        write(
            tmp_path,
            {"email/note.html.j2": "<title>{{ a }}</title>", "email/note.txt.j2": "{{ b }}"},
        ),
        builtin=False,
    )
    assert catalog.variables("email", "note").required == {"a", "b"}
    assert catalog.files("email", "note").text is not None


def test_an_extra_folder_overrides_a_builtin_template_by_name(tmp_path: Path) -> None:
    extra = write(tmp_path, {"telegram/price_alert.md.j2": "{{ instrument }} {{ note }}"})
    catalog = TemplateCatalog(extra)
    assert catalog.variables("telegram", "price_alert").required == {"instrument", "note"}
    assert catalog.variables("email", "price_alert").required == DESIGN_VARIABLES["price_alert"][0]
    assert catalog.files("telegram", "price_alert").main.startswith("extra::")
    assert catalog.files("email", "price_alert").main.startswith("builtin::")


def test_an_overriding_email_takes_its_text_part_from_its_own_folder_only(
    tmp_path: Path,
) -> None:
    extra = write(tmp_path / "extra", {"email/price_alert.html.j2": "<title>t</title>"})
    assert TemplateCatalog(extra).files("email", "price_alert").text is None
    write(extra, {"email/price_alert.txt.j2": "text"})
    assert TemplateCatalog(extra).files("email", "price_alert").text == (
        "extra::email/price_alert.txt.j2"
    )


def test_files_that_are_not_templates_are_ignored(tmp_path: Path) -> None:
    extra = write(
        tmp_path,
        {
            "email/README.md": "notes",
            "email/Bad-Name.html.j2": "<title>x</title>",
            "Not-A-Channel/hello.txt.j2": "hi",
            "telegram/ok.md.j2": "ok",
            "telegram/notes.txt.j2": "not telegram's suffix",
        },
    )
    assert TemplateCatalog(extra, builtin=False).names() == ("ok",)


def test_a_folder_named_like_a_channel_holds_a_plugin_channels_text_templates(
    tmp_path: Path,
) -> None:
    extra = write(tmp_path, {"slack/price_alert.txt.j2": "{{ instrument }} at {{ price }}"})
    catalog = TemplateCatalog(extra)
    assert catalog.has("slack", "price_alert")
    assert catalog.channels()[-1] == "slack"  # after the built-ins
    assert catalog.info("price_alert").channels[-1] == "slack"
    assert catalog.variables("slack", "price_alert").required == {"instrument", "price"}


def test_the_extra_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a folder"):
        TemplateCatalog(tmp_path / "missing")


def test_a_template_that_does_not_parse_raises_a_configuration_error(tmp_path: Path) -> None:
    catalog = TemplateCatalog(write(tmp_path, {"push/broken.json.j2": "{% if x %}"}))
    with pytest.raises(ConfigurationError, match="broken"):
        catalog.validate("push", "broken", {"x": 1})


def test_the_default_catalog_reads_the_extra_folder_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_default_catalog: None
) -> None:
    extra = write(tmp_path, {"telegram/hello.md.j2": "hi {{ name }}"})
    monkeypatch.setenv("OUTBOX_TEMPLATES_DIR", str(extra))
    catalog = default_catalog()
    assert catalog is default_catalog()
    assert catalog.has("telegram", "hello")
    assert catalog.has("email", "position_failure_sl")
    replacement = TemplateCatalog()
    set_default_catalog(replacement)
    assert default_catalog() is replacement


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (1.08345, "1.08345"),
        (0.00001, "0.00001"),
        (1e22, "10000000000000000000000"),
        (2.0, "2.0"),
        (-267.5, "-267.5"),
        (65000, "65000"),
        (True, "true"),
        (None, "null"),
        ([1, "a"], '[1, "a"]'),
        ({"k": 1.5}, '{"k": 1.5}'),
        ("text", "text"),
    ],
)
def test_values_read_the_same_in_every_template(value: object, shown: str) -> None:
    assert format_value(value) == shown
