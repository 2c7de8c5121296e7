"""The sandboxed Jinja environments one catalog renders with, built once per catalog.

Four environments per catalog and base URL: HTML (autoescaped), plain text, Telegram
MarkdownV2 (every variable escaped) and push JSON (every variable escaped for a JSON
string). With the renderer's ``platform_base_url``, ``platform_url('<constant>')``
is computed once per template, when it is compiled (see
:meth:`~outbox._templates.TemplateCatalog.create_environment`).
:meth:`Environments.render` streams a template's output against a budget.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any

from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

from outbox._templates import TemplateCatalog
from outbox.dispatcher import markdown


@dataclass(frozen=True, kw_only=True)
class Environments:
    html: ImmutableSandboxedEnvironment
    text: ImmutableSandboxedEnvironment
    telegram: ImmutableSandboxedEnvironment
    push: ImmutableSandboxedEnvironment
    compiled: dict[tuple[int, str], Template] = field(default_factory=dict)
    """(environment id, loader name) -> the compiled template."""

    def render(
        self,
        env: ImmutableSandboxedEnvironment,
        name: str,
        context: Mapping[str, Any],
        *,
        limit: int,
    ) -> str:
        """Render template ``name`` of ``env`` (one of ours) with ``context``.

        What ``Template.render`` does, minus its per-call costs: the environment's
        template cache is a locked LRU, and every call copies the template's
        globals (a ``ChainMap``, slow to iterate) into the new context. Both are
        done once per template here; the context is still a fresh dict per call.
        The output is streamed: past ``limit`` characters rendering stops with
        :class:`OutputTooLong`, before the rest is produced.
        """
        key = (id(env), name)
        template = self.compiled.get(key)
        if template is None:
            template = env.get_template(name)
            # Jinja keeps a template's globals in a ChainMap that every context
            # creation iterates; these environments never change their globals.
            template.globals = dict(template.globals)
            template = self.compiled.setdefault(key, template)
        ctx = template.new_context({**template.globals, **context}, shared=True)
        parts: list[str] = []
        size = 0
        try:
            for part in template.root_render_func(ctx):
                size += len(part)
                if size > limit:
                    raise OutputTooLong(limit)
                parts.append(part)
        except OutputTooLong:
            raise
        except Exception:
            env.handle_exception()  # re-raises with the template's line numbers
            raise
        return "".join(parts)


class OutputTooLong(Exception):
    """A template produced more than its channel's output budget."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the template produced over {limit} characters (shorten the variables or the template)"
        )


_cache: weakref.WeakKeyDictionary[TemplateCatalog, dict[str | None, Environments]] = (
    weakref.WeakKeyDictionary()
)
_cache_lock = threading.Lock()


def _json_string(value: object) -> str:
    """Escape ``value`` for the inside of a JSON string literal (as ``json.dumps``)."""
    return encode_basestring(str(value))[1:-1]


def environments(catalog: TemplateCatalog, platform_base_url: str | None = None) -> Environments:
    """Return the catalog's rendering environments for ``platform_base_url`` (built
    once per catalog and base URL; they cache compiled templates).
    """
    with _cache_lock:
        by_base = _cache.setdefault(catalog, {})
        found = by_base.get(platform_base_url)
        if found is None:
            base = platform_base_url
            found = Environments(
                html=catalog.create_environment(autoescape=True, platform_base_url=base),
                text=catalog.create_environment(platform_base_url=base),
                telegram=catalog.create_environment(
                    finalize=markdown.finalize, filters=markdown.FILTERS, platform_base_url=base
                ),
                push=catalog.create_environment(finalize=_json_string, platform_base_url=base),
            )
            by_base[platform_base_url] = found
        return found
