"""Structured logging for pvsd, pvsctl and pvs-target.

Console-friendly by default (an admin reads it in a terminal or journalctl); JSON lines with a
flag, for log shippers. Logs go to stderr so that stdout stays free for command output.

A command an administrator runs (`configure_command`) is not a daemon: its internal events
(``vdisk_found``, ``manifest_progress``...) mean nothing to the person waiting for a result, so
only warnings and errors are shown, each as one line that starts with the program's name and
ends with what to do; ``-v`` adds the info events, ``-vv`` the debug ones.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_COMMAND_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)
_ADVICE_KEYS = ("action", "hint")
_LEVEL_NAMES = {"warn": "warning", "exception": "error", "critical": "error", "fatal": "error"}


def configure(*, json: bool = False, level: str = "info", name: str | None = None) -> None:
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if name:
        processors.insert(0, _bind_server(name))
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line, newline included (print writes the line and its newline apart
        # on a non-terminal stderr): pvsd and its stream workers share one stderr, and a line
        # of one must not land between another's text and its newline.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _bind_server(name: str) -> structlog.typing.Processor:
    def add(
        _logger: object, _method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event.setdefault("server", name)
        return event

    return add


def configure_command(program: str, verbosity: int = 0) -> None:
    """Logging for a command such as pvsctl: one line per event on stderr, warnings and
    errors only unless ``verbosity`` (the count of ``-v``) asks for more."""
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, one_line(program)],
        wrapper_class=structlog.make_filtering_bound_logger(command_level(verbosity)),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def command_level(verbosity: int) -> int:
    """The logging level `configure_command` uses for ``verbosity``."""
    return _COMMAND_LEVELS[max(0, min(verbosity, len(_COMMAND_LEVELS) - 1))]


def one_line(program: str) -> Processor:
    """Render an event as ``pvsctl: warning: event (key=value ...); what to do``.

    An exception is shown by its type and message, never as a traceback: the event's own
    words and its ``action`` are what an administrator can act on."""

    def render(_logger: WrappedLogger, method: str, event: EventDict) -> str:
        name = str(event.pop("event", ""))
        level = _LEVEL_NAMES.get(method, method)
        advice = [str(event.pop(key)) for key in _ADVICE_KEYS if key in event]
        error = event.pop("exc_info", None)
        event.pop("timestamp", None)
        if isinstance(error, BaseException):
            event["error"] = f"{type(error).__name__}: {error}"
        elif error:
            kind, value = sys.exc_info()[:2]
            if kind is not None:
                event["error"] = f"{kind.__name__}: {value}"
        line = f"{program}: {level}: {name}"
        if event:
            line += f" ({_pairs(event)})"
        if advice:
            line += "; " + "; ".join(advice)
        return " ".join(line.split("\n"))

    return render


def _pairs(values: Mapping[str, object]) -> str:
    parts = []
    for key, value in values.items():
        text = str(value)
        parts.append(f"{key}={text!r}" if not text or " " in text else f"{key}={text}")
    return " ".join(parts)


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the moment, so that a progress bar that
    redirects stderr while it is shown prints each line above itself."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _StderrLoggerFactory:
    def __call__(self, *_args: object) -> _Stderr:
        return _Stderr()
