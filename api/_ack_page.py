"""The page a person sees when they open an alert's acknowledgement link in a browser.

``GET /ack/{token}`` answers JSON to programs and this small HTML page to browsers
(an ``Accept`` that prefers ``text/html``): a trader who taps "I have seen it" in a
mail or a chat should read a sentence, not a JSON object. The page states the outcome
and links to the platform; it loads nothing, runs no script (a Content-Security-Policy
that allows only its inline style says so to the browser), and every text in it is
fixed or escaped.
"""

from __future__ import annotations

import html

from litestar import Response

HTML = "text/html"
JSON = "application/json"

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""No cache replays one click; the token in the URL leaks to no other site."""

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;"
    "color:#1b1f24}h1{font-size:1.4rem}a{color:#0b57d0}"
)

ACKNOWLEDGED = (
    "Alert acknowledged",
    "Thank you. This alert is marked as seen: it will not be sent on any further channel.",
)
INVALID = (
    "This link does not work",
    "The acknowledgement link is invalid or has expired. Open the platform to see your alerts.",
)
NOT_ACKNOWLEDGEABLE = (
    "Nothing to acknowledge",
    "This alert no longer waits for an acknowledgement.",
)


def page(status_code: int, heading_and_text: tuple[str, str], platform_url: str) -> Response[str]:
    """The HTML answer: a heading, one sentence and a link to the platform."""
    heading, text = (html.escape(part) for part in heading_and_text)
    link = html.escape(platform_url, quote=True)
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{heading}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{heading}</h1><p>{text}</p>"
        f'<p><a href="{link}" rel="noreferrer">Open the platform</a></p></body></html>'
    )
    return Response(body, status_code=status_code, media_type=HTML, headers=PAGE_HEADERS)
