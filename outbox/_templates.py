"""The template catalog: where templates live, what they need, and how they load.

Templates are ``email/<name>.html.j2`` (optional ``email/<name>.txt.j2``),
``telegram/<name>.md.j2``, ``push/<name>.json.j2`` and ``inapp/<name>.json.j2``, built
into the package ``outbox.templates``; any other channel (sms, a plugin's) has plain
text, ``<channel>/<name>.txt.j2``. A folder with the same layout (``OUTBOX_TEMPLATES_DIR``)
overrides them by name: a template it has on a channel comes from it entirely.
Files named ``_*`` are partials (layouts, macros), looked up in the folder first.

Required variables are read from each template's Jinja2 syntax tree (and those of
the templates it imports, includes or extends). A name is *optional* when every use
is guarded: tested with ``is defined``/``is undefined``, used where such a test
holds, or passed straight to ``default``. Any other use makes it required.

Environments are :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` with
:class:`~jinja2.StrictUndefined`: no reaching Python internals, and an undefined
variable raises instead of rendering empty. Variables are data, never template
source. Folders are scanned once; analyses and compiled templates are cached.
Producers only *validate*; the dispatcher renders with environments from
:meth:`TemplateCatalog.create_environment`.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from importlib.resources import files
from importlib.resources.abc import Traversable
from json.encoder import encode_basestring
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from jinja2 import BaseLoader, StrictUndefined, TemplateError, TemplateNotFound, meta, nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context
from jinja2.visitor import NodeTransformer

from outbox._errors import (
    ConfigurationError,
    InvalidMessage,
    MissingTemplateVariables,
    UnknownTemplate,
)
from outbox._template_analysis import classify, learn_names
from outbox.vocabulary import CHANNEL_NAME, CHANNELS

MAIN_SUFFIX = {"email": ".html.j2", "telegram": ".md.j2", "push": ".json.j2", "inapp": ".json.j2"}
EMAIL_TEXT_SUFFIX = ".txt.j2"
TEXT_SUFFIX = ".txt.j2"
"""Every other channel (sms, a plugin's: any folder named like a channel) renders
plain text from ``<channel>/<name>.txt.j2``."""
RENDER_CONTEXT = frozenset({"ack_url", "lane", "message_id", "platform_base_url"})
"""Names the renderer provides itself; templates may use them without declaring."""

_NAME = re.compile(r"^[a-z0-9_]{1,100}$")
_ROOT_SEP = "::"


def format_value(value: object) -> object:
    """Return how a variable reads in every template, before channel escaping.

    Strings (``Markup`` included) pass unchanged. Floats keep every digit they have
    and never use an exponent (``1.08345`` stays ``1.08345``, ``1e-05`` reads
    ``0.00001``); ``true``, ``false``, ``null``, lists and objects read as JSON.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f") if math.isfinite(value) else repr(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


def path_segment(value: object) -> str:
    """Percent-encode ``value`` as one URL path segment (``/`` included)."""
    return quote(str(format_value(value)), safe="")


@pass_context
def platform_url(context: Context, path: str = "/") -> str:
    """Join the renderer's ``platform_base_url`` and an absolute ``path``."""
    base = context.get("platform_base_url")
    if not isinstance(base, str) or not base:
        raise TemplateError("platform_url() needs platform_base_url from the renderer")
    return base.rstrip("/") + "/" + str(path).lstrip("/")


_RENDERER_NAMES = frozenset({"platform_url", "platform_base_url"})
"""Names a template must not assign for its ``platform_url`` calls to be folded."""


class _FoldPlatformUrls(NodeTransformer):
    """Replaces ``platform_url('<constant>')`` with the URL it returns for one base URL.

    A call inside a macro or a ``{% call %}`` block is left alone: a macro imported
    without context cannot see the base URL, and must go on failing the same way.
    """

    def __init__(self, base: str) -> None:
        self.base = base

    def visit_Macro(self, node: nodes.Macro) -> nodes.Node:
        return node

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.Node:
        return node

    def visit_Call(self, node: nodes.Call) -> nodes.Node:
        if (
            isinstance(node.node, nodes.Name)
            and node.node.name == "platform_url"
            and len(node.args) == 1
            and isinstance(node.args[0], nodes.Const)
            and type(node.args[0].value) is str
            and not (node.kwargs or node.dyn_args or node.dyn_kwargs)
        ):
            url = self.base.rstrip("/") + "/" + node.args[0].value.lstrip("/")
            return nodes.Const(url, lineno=node.lineno)
        return self.generic_visit(node)


def _assigns_renderer_names(tree: nodes.Template) -> bool:
    """Whether the template binds ``platform_url`` or ``platform_base_url`` itself."""
    for name in tree.find_all(nodes.Name):
        if name.ctx != "load" and name.name in _RENDERER_NAMES:
            return True
    for macro in tree.find_all(nodes.Macro):
        if macro.name in _RENDERER_NAMES:
            return True
    for imported in tree.find_all(nodes.Import):
        if imported.target in _RENDERER_NAMES:
            return True
    for from_import in tree.find_all(nodes.FromImport):
        for imported_name in from_import.names:
            alias = imported_name if isinstance(imported_name, str) else imported_name[1]
            if alias in _RENDERER_NAMES:
                return True
    return False


class _RendererEnvironment(ImmutableSandboxedEnvironment):
    """The renderer's environment for one ``platform_base_url``.

    A call ``platform_url('/a/constant/path')`` returns the same URL for every
    message, so it is computed once, when the template is compiled (and, being a
    constant, escaped for the channel then too), instead of going through the
    sandbox's call checks on every render. Any other call is made as before.
    """

    def __init__(self, *, platform_base_url: str, **options: Any) -> None:
        super().__init__(**options)
        self.platform_base_url = platform_base_url

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        if _assigns_renderer_names(tree):
            return tree
        folded = _FoldPlatformUrls(self.platform_base_url).visit(tree)
        assert isinstance(folded, nodes.Template)
        return folded


class _CatalogLoader(BaseLoader):
    """Loads ``root::path`` from one root, a plain ``path`` from the first root having it."""

    def __init__(self, roots: Sequence[tuple[str, Traversable]]) -> None:
        self._roots = tuple(roots)

    def get_source(
        self, environment: Any, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        label, sep, path = template.rpartition(_ROOT_SEP)
        roots = [r for r in self._roots if r[0] == label] if sep else self._roots
        parts = path.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise TemplateNotFound(template)
        for _, root in roots:
            node = root.joinpath(*parts)
            if node.is_file():
                return node.read_text(encoding="utf-8"), str(node), lambda: True
        raise TemplateNotFound(template)


@dataclass(frozen=True, kw_only=True)
class TemplateFiles:
    """Loader names of one template on one channel (``text``: the email text part)."""

    main: str
    text: str | None = None


@dataclass(frozen=True, kw_only=True)
class TemplateVariables:
    """The variables one template needs on one channel."""

    required: frozenset[str]
    optional: frozenset[str]
    context: frozenset[str] = frozenset()
    """Names of the renderer's own context (:data:`RENDER_CONTEXT`) the template
    reads: a template that never reads ``message_id`` renders the same text for
    every message with the same variables."""


@dataclass(frozen=True, kw_only=True)
class TemplateInfo:
    """One template name, the channels it exists for, and the variables it needs."""

    name: str
    variables: Mapping[str, TemplateVariables] = field(hash=False)
    """Per channel, in the order of :data:`CHANNELS`."""

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels this template exists for."""
        return tuple(self.variables)

    @property
    def required(self) -> tuple[str, ...]:
        """Variables required on at least one channel, sorted."""
        return tuple(sorted(set().union(*(v.required for v in self.variables.values()))))

    @property
    def optional(self) -> tuple[str, ...]:
        """Variables optional wherever used and required nowhere, sorted."""
        names = set().union(*(v.optional for v in self.variables.values()))
        return tuple(sorted(names - set(self.required)))

    def required_for(self, channel: str) -> frozenset[str]:
        """Return the variables an enqueue on ``channel`` must pass; raise UnknownTemplate."""
        if channel not in self.variables:
            raise UnknownTemplate(channel, self.name)
        return self.variables[channel].required

    def as_dict(self) -> dict[str, Any]:
        """Describe the template as JSON-ready data (for the API and ``outbox templates``)."""
        return {
            "name": self.name,
            "channels": list(self.channels),
            "required": list(self.required),
            "optional": list(self.optional),
            "by_channel": {
                channel: {"required": sorted(v.required), "optional": sorted(v.optional)}
                for channel, v in self.variables.items()
            },
        }


class TemplateCatalog:
    """The templates of one process: built-in ones, overridden by an extra folder.

    ``extra_dir`` (``OUTBOX_TEMPLATES_DIR``) holds templates with the built-in
    layout; ``builtin=False`` leaves the built-ins out (tests). Building a catalog
    scans the folders once; an ``extra_dir`` that is not a folder raises
    :class:`~outbox.ConfigurationError`. Methods are thread-safe. A template that
    does not parse raises ``ConfigurationError`` when first analysed or validated.
    """

    def __init__(self, extra_dir: str | os.PathLike[str] | None = None, *, builtin: bool = True):
        roots: list[tuple[str, Traversable]] = []
        if extra_dir is not None:
            folder = Path(extra_dir)
            if not folder.is_dir():
                raise ConfigurationError(f"OUTBOX_TEMPLATES_DIR {str(folder)!r} is not a folder")
            roots.append(("extra", folder))
        if builtin:
            roots.append(("builtin", files("outbox.templates")))
        self._loader = _CatalogLoader(roots)
        self._files = _scan(roots)
        self._parser = self.create_environment()
        self._analysed: dict[tuple[str, str], TemplateVariables] = {}
        self._lock = threading.Lock()

    def create_environment(
        self,
        *,
        autoescape: bool = False,
        finalize: Callable[[object], object] | None = None,
        filters: Mapping[str, Callable[..., Any]] | None = None,
        platform_base_url: str | None = None,
        json_strings: bool = False,
    ) -> ImmutableSandboxedEnvironment:
        """Build a sandboxed, strict environment over this catalog's folders.

        Every ``{{ ... }}`` output goes through :func:`format_value`, then through
        ``finalize`` (a channel's escaping); with ``json_strings``, through the
        escaping of the inside of a JSON string literal (as ``json.dumps`` writes it;
        ``finalize`` is then not used). Whitespace handling is Jinja's default
        (no ``trim_blocks``): in Telegram text a line break after ``{% endif %}``
        is kept; use ``{%- ... -%}`` to remove whitespace on purpose.

        With ``platform_base_url`` (a renderer's), ``platform_url('<a constant>')``
        is computed when a template is compiled, for that base URL (a template
        that assigns ``platform_url`` or ``platform_base_url`` itself is compiled
        as written); the renderer then passes the same base URL to every render.
        """
        channel_finalize = finalize

        if json_strings:  # one call per output: a push message has a dozen of them

            def finalize_output(value: object) -> object:
                shown = value if type(value) is str else str(format_value(value))
                return encode_basestring(shown)[1:-1]

        else:

            def finalize_output(value: object) -> object:
                shown = value if type(value) is str else format_value(value)
                return channel_finalize(shown) if channel_finalize is not None else shown

        options: dict[str, Any] = {
            "loader": self._loader,
            "undefined": StrictUndefined,
            "autoescape": autoescape,
            "finalize": finalize_output,
            "auto_reload": False,
        }
        env = (
            _RendererEnvironment(platform_base_url=platform_base_url, **options)
            if platform_base_url  # empty: platform_url() fails at render, as it should
            else ImmutableSandboxedEnvironment(**options)
        )
        env.filters["path_segment"] = path_segment
        env.filters.update(filters or {})
        env.globals["platform_url"] = platform_url
        return env

    def names(self, channel: str | None = None) -> tuple[str, ...]:
        """Template names, sorted; only those existing for ``channel`` if given."""
        return tuple(sorted({n for c, n in self._files if channel in (None, c)}))

    def channels(self) -> tuple[str, ...]:
        """The channels some template exists for: built-ins first, then the others."""
        found = {c for c, _ in self._files}
        return tuple(c for c in CHANNELS if c in found) + tuple(sorted(found.difference(CHANNELS)))

    def has(self, channel: str, template: str) -> bool:
        """Whether ``template`` exists for ``channel``."""
        return (channel, template) in self._files

    def files(self, channel: str, template: str) -> TemplateFiles:
        """Loader names of ``template`` on ``channel``; raises UnknownTemplate."""
        try:
            return self._files[channel, template]
        except KeyError:
            raise UnknownTemplate(channel, template, self.names(channel)) from None

    def variables(self, channel: str, template: str) -> TemplateVariables:
        """Return the required and optional variables of ``template`` on ``channel``."""
        key = (channel, template)
        found = self._analysed.get(key)
        if found is None:
            template_files = self.files(channel, template)
            parts = [template_files.main]
            if template_files.text is not None:
                parts.append(template_files.text)
            found = self._analyse(parts)
            with self._lock:
                found = self._analysed.setdefault(key, found)
        return found

    def info(self, template: str) -> TemplateInfo:
        """Return what :meth:`templates` says about one name; raise UnknownTemplate."""
        channels = [c for c in self.channels() if self.has(c, template)]
        if not channels:
            raise UnknownTemplate("any", template, self.names())
        variables: dict[str, TemplateVariables] = {c: self.variables(c, template) for c in channels}
        return TemplateInfo(name=template, variables=MappingProxyType(variables))

    def templates(self) -> list[TemplateInfo]:
        """Every template with its channels and variables, sorted by name."""
        return [self.info(name) for name in self.names()]

    def validate(self, channel: str, template: str, vars: Mapping[str, object]) -> None:
        """Raise unless ``vars`` can render ``template`` on ``channel``.

        Raises :class:`~outbox.UnknownTemplate` when the template does not exist for
        that channel and :class:`~outbox.MissingTemplateVariables` naming every
        required variable absent from ``vars`` (the names the renderer provides
        itself never count). Touches no database.
        """
        if type(vars) is not dict and not isinstance(vars, Mapping):
            raise InvalidMessage(f"vars must be a mapping, not {type(vars).__name__}")
        required = self.variables(channel, template).required
        if not vars.keys() >= required:
            raise MissingTemplateVariables(channel, template, required - vars.keys())

    def _analyse(self, loader_names: Iterable[str]) -> TemplateVariables:
        required: set[str] = set()
        optional: set[str] = set()
        context: set[str] = set()
        reserved = RENDER_CONTEXT | self._parser.globals.keys()
        pending, seen = list(loader_names), set[str]()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            try:
                source, _, _ = self._loader.get_source(self._parser, name)
                tree = self._parser.parse(source, name=name)
            except TemplateError as error:
                raise ConfigurationError(f"template {name!r} cannot be read: {error}") from error
            learn_names(self._parser, tree)
            undeclared = meta.find_undeclared_variables(tree)
            context |= undeclared & RENDER_CONTEXT
            free = frozenset(undeclared - reserved)
            classify(tree, free, frozenset(), required, optional)
            for referenced in meta.find_referenced_templates(tree):
                if referenced is None:
                    raise ConfigurationError(f"template {name!r} includes a computed name")
                pending.append(referenced)
        return TemplateVariables(
            required=frozenset(required),
            optional=frozenset(optional - required),
            context=frozenset(context),
        )


def _channel_folders(root: Traversable) -> list[str]:
    """The folders of ``root`` named like a channel: the built-ins in their order,
    then any other (a plugin's channel) by name.
    """
    others = sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and CHANNEL_NAME.match(entry.name) and entry.name not in CHANNELS
    )
    return [c for c in CHANNELS if root.joinpath(c).is_dir()] + others


def _scan(roots: Sequence[tuple[str, Traversable]]) -> dict[tuple[str, str], TemplateFiles]:
    """Map (channel, name) to the files of the first root that has the main file."""
    found: dict[tuple[str, str], TemplateFiles] = {}
    for label, root in reversed(roots):  # later assignments (earlier roots) win
        for channel in _channel_folders(root):
            folder = root.joinpath(channel)
            entries = {entry.name for entry in folder.iterdir() if entry.is_file()}
            suffix = MAIN_SUFFIX.get(channel, TEXT_SUFFIX)
            for entry in entries:
                name = entry.removesuffix(suffix)
                if not entry.endswith(suffix) or not _NAME.match(name) or name[0] == "_":
                    continue
                text = f"{name}{EMAIL_TEXT_SUFFIX}" if channel == "email" else None
                found[channel, name] = TemplateFiles(
                    main=f"{label}{_ROOT_SEP}{channel}/{entry}",
                    text=f"{label}{_ROOT_SEP}{channel}/{text}" if text in entries else None,
                )
    return found


_default: TemplateCatalog | None = None
_default_lock = threading.Lock()


def default_catalog() -> TemplateCatalog:
    """Return the process-wide catalog, built on first use from ``OUTBOX_TEMPLATES_DIR``."""
    global _default
    with _default_lock:
        if _default is None:
            _default = TemplateCatalog(os.environ.get("OUTBOX_TEMPLATES_DIR") or None)
        return _default


def set_default_catalog(catalog: TemplateCatalog | None) -> None:
    """Replace the process-wide catalog; ``None`` rebuilds it on next use."""
    global _default
    with _default_lock:
        _default = catalog
