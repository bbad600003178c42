"""Text made safe to show: one line with no terminal control sequences, and no password of a URL.

Message content reaches the logs, the store's rejection reasons and the operator's terminal (``ztfd rejected``,
``ztfd status``). A newline there splits a log line; ``ESC ] 0 ; … BEL`` retitles the operator's terminal, and
other escapes can rewrite what it shows. ``escape_controls`` is the one place that makes such text harmless.
"""

from __future__ import annotations

import re

# C0 and C1 control characters and DEL (Unicode category Cc), plus the bidirectional overrides and isolates
# that reorder what a terminal shows (U+202A-U+202E, U+2066-U+2069).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# The same, less newline and tab: for multi-line text of our own (a traceback) that may quote a message.
CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as ``\\xNN`` (``\\uNNNN`` for the bidi controls)."""
    return CONTROL.sub(_escaped, text)


def escape_controls_but_lines(text: str) -> str:
    """Like ``escape_controls``, keeping newlines and tabs (our own multi-line text, such as a traceback)."""
    return CONTROL_BUT_LINES.sub(_escaped, text)


# The password of a URL's user information (``scheme://user:password@host``); the user name is kept.
URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):[^\s/]*@")


def mask_url_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (``https://user:***@host/``)."""
    return URL_PASSWORD.sub(r"\g<head>:***@", text)
