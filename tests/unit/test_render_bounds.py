"""Rendering is bounded whatever the vars: size, depth, output, and where it runs.

A stored message may have been written past every enqueue check (raw SQL, rows
older than a fix). Whatever its vars, rendering refuses it with a
:class:`~outbox.TemplateRenderError` (a dead letter of class ``template``) before
it can cost the dispatcher seconds of CPU or gigabytes of memory.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from outbox import MAX_VARS_BYTES
from outbox._errors import TemplateRenderError
from outbox._templates import CHANNELS, TemplateCatalog
from outbox.dispatcher import rendering
from outbox.dispatcher.rendering import (
    INLINE_VARS_CHARS,
    RENDER_OUTPUT_LIMITS,
    RenderCache,
    render,
    stored_vars,
    stored_vars_problem,
)

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}
BASE_URL = "https://platform.example.com"


def nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return {**ALERT, "extra": value}


def rendered(
    channel: str, vars: Any, catalog: TemplateCatalog | None = None, name: str = "price_alert"
) -> Any:
    return render(
        catalog or TemplateCatalog(),
        channel,
        name,
        vars,
        message_id=1,
        lane="transactional",
        platform_base_url=BASE_URL,
    )


def cache() -> RenderCache:
    return RenderCache(TemplateCatalog(), platform_base_url=BASE_URL)


@pytest.mark.parametrize("channel", CHANNELS)
def test_vars_nested_33_levels_are_a_render_error_and_32_render(channel: str) -> None:
    assert rendered(channel, nested(32)) is not None
    with pytest.raises(TemplateRenderError, match="vars nest deeper than 32 levels"):
        rendered(channel, nested(33))


@pytest.mark.parametrize(
    ("channel", "path", "source"),
    [
        (
            "email",
            "email/loop.html.j2",
            "<title>t</title>{% for _ in range(100000) %}{{ v }}{% endfor %}",
        ),
        ("telegram", "telegram/loop.md.j2", "{% for _ in range(100000) %}{{ v }}{% endfor %}"),
        (
            "push",
            "push/loop.json.j2",
            '{"title": "{% for _ in range(100000) %}{{ v }}{% endfor %}"}',
        ),
    ],
)
def test_a_template_output_over_its_budget_stops_early(
    tmp_path: Path, channel: str, path: str, source: str
) -> None:
    """100,000 copies of 200 KB would be 20 GB: rendering stops at the budget."""
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(source, encoding="utf-8")
    catalog = TemplateCatalog(tmp_path)
    started = time.perf_counter()
    with pytest.raises(TemplateRenderError, match=r"produced over \d+ characters"):
        rendered(channel, {"v": "y" * 200_000}, catalog, name="loop")
    assert time.perf_counter() - started < 2.0
    assert RENDER_OUTPUT_LIMITS[channel] <= 1024 * 1024


def test_stored_vars_over_256_kib_as_utf8_text_are_refused_at_the_exact_limit() -> None:
    def stored(value: str) -> str:  # jsonb's text form
        return '{"a": "' + value + '"}'

    padding = MAX_VARS_BYTES - len(stored(""))
    assert stored_vars_problem(stored("x" * padding)) is None
    assert "262145 bytes" in str(stored_vars_problem(stored("x" * (padding + 1))))
    # 4-byte characters: measured in UTF-8 bytes, not characters
    four = "\U0001f680" * (padding // 4)
    assert stored_vars_problem(stored(four + "x" * (padding % 4))) is None
    over = stored(four + "x" * (padding % 4 + 1))
    assert len(over) < MAX_VARS_BYTES and "262145 bytes" in str(stored_vars_problem(over))
    # the claim withholds over-limit text (NULL)
    assert "over the limit of 262144 bytes" in str(stored_vars_problem(None))


def test_withheld_long_and_too_deep_stored_vars_are_left_to_the_renderer() -> None:
    small = json.dumps(ALERT)
    assert stored_vars(small) == ALERT
    assert stored_vars(None) is None
    assert stored_vars(json.dumps({**ALERT, "pad": "x" * INLINE_VARS_CHARS})) is None
    assert stored_vars('{"a":' + "[" * 3000 + "]" * 3000 + "}") is None  # decoder recursion
    assert stored_vars("[1, 2]") == {}  # not an object: its missing variables are named


@pytest.mark.parametrize(
    ("vars_text", "message"),
    [
        (None, "over the limit of 262144 bytes"),
        ('{"a":"' + "x" * (20 * 1024 * 1024) + '"}', "at least 20971528 bytes"),
        ('{"a":' + "[" * 10_000 + "]" * 10_000 + "}", "nest deeper than 32 levels"),
        (json.dumps(nested(33)), "nest deeper than 32 levels"),
    ],
    ids=["withheld", "20MiB", "10000-levels", "33-levels"],
)
def test_stored_vars_too_large_or_too_deep_are_render_errors(
    vars_text: str | None, message: str
) -> None:
    renderer = cache()
    with pytest.raises(TemplateRenderError, match=message):
        renderer.render(
            "email",
            "price_alert",
            stored_vars(vars_text),
            vars_key=vars_text,
            message_id=1,
            lane="transactional",
        )
    with pytest.raises(TemplateRenderError, match=message):
        asyncio.run(
            renderer.render_async(
                "telegram",
                "price_alert",
                stored_vars(vars_text),
                vars_key=vars_text,
                message_id=1,
                lane="transactional",
            )
        )


def test_long_vars_render_in_a_worker_thread_and_short_ones_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[int] = []
    real_render = rendering.render

    def recording_render(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real_render(*args, **kwargs)

    monkeypatch.setattr(rendering, "render", recording_render)
    renderer = cache()
    short = json.dumps(ALERT)
    long = json.dumps({**ALERT, "note": "n" * 100_000})

    async def both() -> tuple[Any, Any]:
        first = await renderer.render_async(
            "email", "price_alert", stored_vars(short), vars_key=short, message_id=1, lane="t"
        )
        second = await renderer.render_async(
            "email", "price_alert", stored_vars(long), vars_key=long, message_id=2, lane="t"
        )
        return first, second

    first, second = asyncio.run(both())
    main = threading.get_ident()
    assert threads[0] == main and threads[1] != main
    assert first == second  # the template does not show the extra variable
