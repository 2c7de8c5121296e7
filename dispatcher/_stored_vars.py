"""Stored vars as a claim returns them: refused, decoded inline, or left for a thread.

The claim returns a message's vars as jsonb text (NULL when over
:data:`~outbox.MAX_VARS_BYTES`). Short texts are decoded on the event loop; long
ones are left undecoded (None) for :meth:`RenderCache.render_async
<outbox.dispatcher.rendering.RenderCache.render_async>`, which checks and decodes
them in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from outbox import MAX_VARS_BYTES, MAX_VARS_DEPTH
from outbox._errors import TemplateRenderError

INLINE_VARS_CHARS = 4096
"""Vars whose stored text is longer than this are decoded and rendered in a worker
thread. Real notifications carry a few hundred characters and render inline (a
thread hand-off would cost more than the render)."""

TOO_DEEP = (
    f"vars nest deeper than {MAX_VARS_DEPTH} levels (the vars object is level 1;"
    " every object or array inside adds one)"
)
_decode_json = json.JSONDecoder().raw_decode


def stored_vars_problem(vars_text: str | None) -> str | None:
    """Why stored vars (the jsonb text a claim returns) cannot be rendered, or None.

    ``None`` text is what the claim returns instead of vars over
    :data:`~outbox.MAX_VARS_BYTES`. The size is the UTF-8 length of the text as
    received; it is measured only when the characters alone cannot settle it.
    """
    if vars_text is None:
        return f"vars are over the limit of {MAX_VARS_BYTES} bytes as JSON text"
    length = len(vars_text)
    if length * 4 <= MAX_VARS_BYTES:  # UTF-8 takes at most 4 bytes a character
        return None
    if length > MAX_VARS_BYTES:
        return f"vars are at least {length} bytes as JSON text; the limit is {MAX_VARS_BYTES}"
    size = len(vars_text.encode("utf-8"))
    if size > MAX_VARS_BYTES:
        return f"vars are {size} bytes as JSON text; the limit is {MAX_VARS_BYTES}"
    return None


def decode_stored_vars(vars_text: str) -> Mapping[str, Any]:
    """Decode stored vars; a document too deep for the decoder's stack is refused.

    PostgreSQL writes well-formed JSON, so only nesting can fail here (the C
    decoder stops at the interpreter's recursion limit). Anything but an object
    decodes to an empty mapping, whose missing variables the render then names.
    """
    try:
        decoded = _decode_json(vars_text)[0]
    except RecursionError:
        raise TemplateRenderError(TOO_DEEP) from None
    return decoded if type(decoded) is dict else {}


def stored_vars(vars_text: str | None) -> Mapping[str, Any] | None:
    """The vars of a claimed row for :meth:`RenderCache.render`, with its text as ``vars_key``.

    Short texts are decoded at once (the common case: a few hundred characters);
    a long, withheld or undecodable one is left for the renderer (None), which
    refuses it or decodes it off the event loop. Never raises.
    """
    if vars_text is None or len(vars_text) > INLINE_VARS_CHARS:
        return None
    try:
        decoded = _decode_json(vars_text)[0]
    except RecursionError:  # refused by the renderer, with the reason
        return None
    return decoded if type(decoded) is dict else {}
