"""What the CLI does to the text of a user turn, and how ccwrap-trio keeps it from doing it.

Every text ccwrap-trio puts into a CLI turn goes through ``neutralize`` (one place, for every
role, content part and endpoint), so no client text can make the CLI expand it.
"""

from __future__ import annotations


def neutralize(text: str) -> str:
    """``text`` as the model should read it, with nothing the CLI would expand."""
    # The CLI runs a text block that starts with "/" as a slash command (seen on 2.1.332); a
    # leading newline keeps it text.
    if text.startswith("/"):
        return "\n" + text
    return text
