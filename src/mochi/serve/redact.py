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
    quoted = _QUOTED_PATH.sub(lambda m: f"{m['q']}{last_component(m['path'])}{m['q']}", message)
    return _ABSOLUTE_PATH.sub(lambda m: last_component(m.group(0)), quoted)


def last_component(path: str) -> str:
    """``…/NAME`` for a path, POSIX or Windows: what a client may see of a file on the server."""
    return "…/" + re.split(r"[/\\]", path.rstrip("/\\"))[-1]
