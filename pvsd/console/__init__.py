"""pvsctl's parts beyond the local vDisk commands: the admin API client and its commands.

`pvsd.ctl` builds the command line; the site-wide commands (servers, vdisks, targets,
stop-stream, start-stream, site) live here and talk to any server's admin API.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the administrator can fix; the message says what failed and what to do."""
