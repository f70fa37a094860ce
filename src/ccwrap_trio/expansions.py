"""What the CLI does to the text of a user turn, and how ccwrap-trio keeps it from doing it.

Observed on the pinned CLI (2.1.332, docs/reliability.md "Threat model"): a text block that starts
with ``/`` runs a slash command or a skill, and ``@path`` (absolute, ``~``, relative, quoted) where
``@`` starts the text or follows whitespace reads the file, or lists the directory, into the
model's context, even with ``--tools ""``. Mentions are switched off at the source
(``CLAUDE_CODE_DISABLE_FILE_MENTIONS``, config.CHILD_ENV_LOCKDOWN); ``neutralize`` is the second
line, applied to every text of every turn in ``protocol.user_line``, so a future CLI that ignored
the variable would still find nothing to expand.
"""

from __future__ import annotations

import re

# An invisible character that is not whitespace to the CLI's mention matcher: "look \u2060@/x"
# reads as "look @/x" to the model and expands nothing (checked against the real CLI).
WORD_JOINER = "\u2060"
# A mention that names a path: "@" at the start or after whitespace, then "/", "~", ".", or a
# quote. Bare "@name" (handles, decorators, "@app.route") is left alone: a bare name can only
# reach the CLI's private, empty working directory.
# "Whitespace" is JavaScript's \s (the CLI's), which also counts U+FEFF; U+180E for old engines.
_PATH_MENTION = re.compile(r"(^|[\s\ufeff\u180e])@(?=[/~.\"'])")


def neutralize(text: str) -> str:
    """``text`` as the model should read it, with nothing the CLI would expand."""
    text = _PATH_MENTION.sub(lambda m: m.group(1) + WORD_JOINER + "@", text)
    # A leading newline keeps a text that starts with "/" text, not a command.
    if text.startswith("/"):
        return "\n" + text
    return text


def could_expand(text: str) -> bool:
    """True if the CLI would treat some of ``text`` as a command or a path mention."""
    return text.startswith("/") or _PATH_MENTION.search(text) is not None
