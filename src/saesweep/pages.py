"""The frame of saesweep's HTML pages, shared by the feature report (saesweep.report) and the steering
page (saesweep.steering): the page with its stylesheet, escaping, tokens as shown, and the steering
section both show. No external resource is ever referenced; all text from the corpus or the tokenizer
is escaped here: tokens are untrusted input.
"""

from __future__ import annotations

import html
from importlib.resources import files


def asset(name: str) -> str:
    """A stylesheet or script of saesweep's pages, kept as a file in the package (report/assets/)."""
    return files("saesweep").joinpath("report", "assets", name).read_text(encoding="utf-8")


_CSS = asset("page.css")


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def display_token(token: str) -> str:
    """A token as shown: line breaks and tabs made visible, other control characters as their symbol."""
    out = []
    for ch in token:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("␍")
        elif ord(ch) < 32:
            out.append(chr(0x2400 + ord(ch)))
        else:
            out.append(ch)
    return "".join(out)


def chip_token(token: str) -> str:
    """A token standing alone (in a list, not in running text): a token of only spaces shows them as ␣."""
    shown = display_token(token)
    return shown.replace(" ", "␣") if not shown.strip() else shown


def page(title: str, body: str, extra_css: str = "", script: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        # no network: the page may load nothing from anywhere (inline styles and scripts only)
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:\">"
        f"<title>{esc(title)}</title><style>{_CSS}{extra_css}</style></head>\n<body>\n{body}\n"
        f"{f'<script>{script}</script>' if script else ''}\n</body></html>\n"
    )


def steering_section(steering: dict) -> str:
    """Steered beside unsteered continuations, and the log-prob shift at the first generated token."""
    mode = ("added" if steering["mode"] == "add" else "clamped to")
    parts = ["<h2>Steering</h2>",
             f'<p class="note">Feature {steering["feature"]} {mode} {steering["strength"]:g} × its max activation '
             f'({steering["max_activation"]:.4g}) at {esc(steering["hook_point"])}; the same seed for both columns.</p>',
             '<table class="steer"><tr><th>prompt</th><th>decoding</th><th>unsteered</th><th>steered</th></tr>']
    for c in steering["continuations"]:
        parts.append(f'<tr><td class="tokens">{esc(display_token(c["prompt"]))}</td><td>{esc(c["decoding"])}</td>'
                     f'<td class="tokens">{esc(display_token("".join(c["unsteered"])))}</td>'
                     f'<td class="tokens">{esc(display_token("".join(c["steered"])))}</td></tr>')
    parts.append("</table>")
    for shift in steering["logit_shift"]:
        def chips(entries: list[dict]) -> str:
            return "".join(f'<span class="chip" title="id {e["id"]}">{esc(chip_token(e["token"]))} '
                           f'{e["delta_logprob"]:+.2f}</span>' for e in entries)

        parts.append(f'<h3>Log-prob shift at the first generated token of {esc(repr(shift["prompt"]))}</h3>'
                     f'<p>rises: {chips(shift["rises"])}</p><p>falls: {chips(shift["falls"])}</p>')
    return "".join(parts)


def render_steering_page(steering: dict) -> str:
    body = (f'<h1>Steering with feature {steering["feature"]}</h1>'
            f'<p class="meta">{esc(steering.get("run_dir") or "")}</p>' + steering_section(steering))
    return page(f"Steering with feature {steering['feature']}", body)
