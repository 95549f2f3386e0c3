"""Finding the host programs capsa runs.

Debian keeps administration tools (mke2fs, ip, ...) in /usr/sbin and /sbin, which are not
on an ordinary user's PATH; capsa runs them as whoever runs capsa, so it looks there too.
"""

from __future__ import annotations

import shutil

SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def find_tool(name: str) -> str | None:
    """The full path of the program ``name``: on PATH, else in the sbin directories."""
    return shutil.which(name) or shutil.which(name, path=SBIN)
