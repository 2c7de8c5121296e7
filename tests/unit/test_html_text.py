"""Plain text derived from email HTML reads well: paragraphs, tables, links survive."""

from __future__ import annotations

from outbox.dispatcher.html_text import extract_title, html_to_text


def test_paragraphs_and_headings_are_separated_by_one_blank_line() -> None:
    html = "<h1>Alert</h1>\n\n<p>First   paragraph\n spans lines.</p><p>Second.</p><div>Third</div>"
    assert html_to_text(html) == "Alert\n\nFirst paragraph spans lines.\n\nSecond.\n\nThird\n"


def test_a_link_reads_as_its_text_then_its_url_in_parentheses() -> None:
    html = '<p>See <a href="https://p.example/x?a=1&amp;b=2">the <b>position</b></a>.</p>'
    assert html_to_text(html) == "See the position (https://p.example/x?a=1&b=2).\n"


def test_a_link_whose_text_is_its_url_appears_once() -> None:
    html = (
        '<p><a href="https://p.example">https://p.example</a> '
        '<a href="mailto:ops@p.example">ops@p.example</a> <a href="#top">Top</a> '
        '<a href="https://img.example"><img src="x.png" alt=""></a></p>'
    )
    assert html_to_text(html) == "https://p.example ops@p.example Top https://img.example\n"


def test_a_data_table_becomes_one_aligned_line_per_row() -> None:
    html = (
        "<table><thead><tr><th>Field</th><th>Value</th></tr></thead><tbody>"
        "<tr><th>Instrument</th><td>EURUSD</td></tr>"
        "<tr><th>Entry price</th><td>1.08345</td></tr>"
        "<tr><td></td><td></td></tr>"
        "</tbody></table><p>After.</p>"
    )
    assert html_to_text(html) == (
        "Field        Value\nInstrument   EURUSD\nEntry price  1.08345\n\nAfter.\n"
    )


def test_a_layout_table_marked_presentation_reads_as_plain_blocks() -> None:
    html = (
        '<table role="presentation"><tr><td><p>Hello.</p>'
        "<table><tr><th>Ticket</th><td>88123456</td></tr></table>"
        "</td></tr><tr><td>Footer</td></tr></table>"
    )
    assert html_to_text(html) == "Hello.\n\nTicket  88123456\n\nFooter\n"


def test_head_styles_scripts_and_hidden_preheaders_are_dropped() -> None:
    html = (
        "<html><head><title>Subject</title><style>p { color: red }</style></head><body>"
        '<div style="display: none; max-height:0">Inbox preview</div>'
        "<script>alert(1)</script><p hidden>secret</p><p>Visible.</p></body></html>"
    )
    assert html_to_text(html) == "Visible.\n"


def test_lists_get_bullets_and_ordered_lists_get_numbers() -> None:
    html = "<ul><li>one<li>two</ul><ol><li>first</li><li>second</li></ol>"
    assert html_to_text(html) == "- one\n- two\n\n1. first\n2. second\n"


def test_a_line_break_breaks_the_line_and_entities_are_decoded() -> None:
    html = "<p>Loss: &minus;267.5&nbsp;USD<br>Ticket &lt;88123456&gt; &amp; more</p>"
    assert html_to_text(html) == "Loss: \u2212267.5 USD\nTicket <88123456> & more\n"


def test_a_rule_reads_as_a_line_of_dashes() -> None:
    assert html_to_text("<p>a</p><hr><p>b</p>") == f"a\n\n{'-' * 40}\n\nb\n"


def test_preformatted_text_keeps_its_spacing() -> None:
    assert html_to_text("<pre>a  b\n  c</pre>") == "a  b\n  c\n"


def test_images_read_as_their_alt_text() -> None:
    assert html_to_text('<p><img src="logo.png" alt="Platform"> alerts</p>') == (
        "Platform alerts\n"
    )


def test_unclosed_and_stray_tags_lose_no_text() -> None:
    html = "<div><p>one<p>two</span></div><table><tr><td>a<td>b<tr><td>c</table>tail"
    assert html_to_text(html) == "one\n\ntwo\n\na  b\nc\n\ntail\n"


def test_the_title_is_extracted_decoded_and_on_one_line() -> None:
    html = "<html><head><title>\n  Price alert:\n EUR&amp;USD &lt;b&gt; </title></head></html>"
    assert extract_title(html) == "Price alert: EUR&USD <b>"
    assert extract_title("<p>no title</p>") == ""
