"""How pvs-target logs: one-line failures from the commands themselves, structlog to stderr
for -v, and, once a target is attached, its warnings without -v."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(verbosity: int, *, quiet: bool = True) -> None:
    """Failures are reported as one line by the command itself; logs are for -v. Once
    attached (``quiet`` False), a target's warnings (a write cache filling up, a failover)
    belong in its journal without -v too."""
    quietest = logging.ERROR if quiet else logging.WARNING
    level = quietest if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),  # line and newline: one write
        cache_logger_on_first_use=False,
    )
