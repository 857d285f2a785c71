"""Keeping the server's file layout out of what clients see."""

from __future__ import annotations

import re

# An absolute POSIX path (two or more components) or a Windows drive path inside a message.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/\\-])(?:/[^\s/'\":,;()\[\]]+){2,}/?|\b[A-Za-z]:\\[^\s'\":;]+")
# The same inside quotes (as repr() quotes paths), taken whole: spaces included ("Alice Smith").
_QUOTED_PATH = re.compile(r"""(?P<q>['"])(?P<path>(?:/[^'"/]+){2,}/?|[A-Za-z]:\\[^'"]+)(?P=q)""")


def redact_paths(message: str) -> str:
    """``message`` with each absolute path replaced by its last component: a job's error reaches every
    client, and the server's directory layout (home folder, user name, mounts) is none of their business."""

    def last(match: re.Match) -> str:
        parts = re.split(r"[/\\]", match.group(0).rstrip("/\\"))
        return f"…/{parts[-1]}"

    def quoted(match: re.Match) -> str:
        parts = re.split(r"[/\\]", match["path"].rstrip("/\\"))
        return f"{match['q']}…/{parts[-1]}{match['q']}"

    return _ABSOLUTE_PATH.sub(last, _QUOTED_PATH.sub(quoted, message))
