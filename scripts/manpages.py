"""Make the manual pages pvsd(8), pvsctl(8) and pvs-target(8) from the programs' own parsers.

    .venv/bin/python scripts/manpages.py            # rewrite man/*.8
    .venv/bin/python scripts/manpages.py --check    # exit 1 if a committed page is stale
    .venv/bin/python scripts/manpages.py --output DIR

The options, commands and their help come from the argparse parsers through argparse-manpage,
so a page never lists an option the program lacks; what a parser cannot say (exit status,
environment, files, see also) is written here. A page keeps the date it has in the output
directory while nothing else in it changes, so regenerating is reproducible and the date says
when the page last changed (today's date, or SOURCE_DATE_EPOCH's, for a changed page).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from argparse_manpage.manpage import Manpage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's code, also when run from elsewhere

from pvsd.version import package_version  # noqa: E402

SECTION = 8
MANUAL = "System Administration"
_DATE = re.compile(r'^(\.TH \S+ "\d+" )"([^"]*)"', re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Page:
    program: str
    module: str
    functions: tuple[str, ...]
    """Names of the function that builds the parser, the first found is used."""
    summary: str
    """The NAME line after the dash."""
    sections: tuple[tuple[str, str], ...]
    """Extra sections, heading and roff text, after OPTIONS."""

    def parser(self) -> argparse.ArgumentParser:
        module = importlib.import_module(self.module)
        for name in self.functions:
            build: Callable[[], argparse.ArgumentParser] | None = getattr(module, name, None)
            if build is not None:
                return build()
        raise SystemExit(f"manpages: {self.module} has none of {', '.join(self.functions)}")


_SEE_ALSO = (
    "The pvs documentation: README.md, docs/deploy.md (installing a site), docs/admin.md "
    "(daily administration) and docs/protocol.md."
)

PAGES = (
    Page(
        "pvsd", "pvsd.config", ("build_parser",),
        "pvs server: streams vDisks to diskless targets",
        (
            ("CONFIGURATION", (
                "Settings are read once at start from the TOML file given with "
                "\\fB\\-\\-config\\fR, then from the options, which win over the file. "
                "A wrong setting is reported on one line naming it, and pvsd exits with "
                "status 2 before it listens."
            )),
            ("SIGNALS", (
                "SIGTERM or SIGINT: stop taking logins, tell the targets to move to other "
                "servers of the site (for at most the drain timeout), then exit."
            )),
            ("EXIT STATUS", (
                ".TP\n0\nstopped by a signal.\n"
                ".TP\n1\ncould not start (an address in use or not local).\n"
                ".TP\n2\na configuration error, or another server of the site uses this "
                "server's name."
            )),
            ("FILES", (
                ".TP\n/etc/pvs/pvsd.toml\nthe configuration file of the packaged unit.\n"
                ".TP\n\\fISTORE\\fR/\\fINAME\\fR.img\na vDisk image; \\fINAME\\fR@\\fIN\\fR.img "
                "holds version \\fIN\\fR.\n"
                ".TP\n\\fISTORE\\fR/\\fINAME\\fR.manifest\nthe image's manifest: the hash tree "
                "whose root is the version's identity.\n"
                ".TP\n\\fISTORE\\fR/\\fINAME\\fR.vdisk.toml\nthe vDisk's properties "
                "(pvsctl vdisk set)."
            )),
            ("SEE ALSO", f"\\fBpvsctl\\fR(8), \\fBpvs\\-target\\fR(8). {_SEE_ALSO}"),
        ),
    ),
    Page(
        "pvsctl", "pvsd.ctl", ("build_parser",),
        "administer a pvs site: vDisks, versions, replication, servers and targets",
        (
            ("OUTPUT", (
                "Results go to standard output, progress, warnings and errors to standard "
                "error. Tables fit a terminal by wrapping, never by cutting; in a pipe each "
                "row is one line, however wide. Long local passes (vdisk create, import, "
                "manifest, verify) show a progress bar on a terminal and a line every few "
                "seconds otherwise. Only warnings are logged unless \\fB\\-v\\fR is given."
            )),
            ("EXIT STATUS", (
                ".TP\n0\ndone.\n"
                ".TP\n1\n\\fBvdisk verify\\fR found the copy damaged.\n"
                ".TP\n2\nan error, reported on one line that says what to do; or a usage "
                "error.\n"
                ".TP\n130\ninterrupted (Ctrl\\-C); files being made are removed.\n"
                ".TP\n141\nthe reader of the output went away (\\fBpvsctl ... | head\\fR)."
            )),
            ("ENVIRONMENT", (
                ".TP\nPVS_ADMIN\nthe admin API to talk to, when \\fB\\-\\-admin\\fR is not "
                "given.\n"
                ".TP\nPVS_KEY_FILE\nthe site key file, when \\fB\\-\\-key\\-file\\fR is not "
                "given.\n"
                ".TP\nPVS_STORE\nthe store of \\fBvdisk verify\\fR and \\fBvdisk manifest\\fR, "
                "when \\fB\\-\\-store\\fR is not given."
            )),
            ("SEE ALSO", f"\\fBpvsd\\fR(8), \\fBpvs\\-target\\fR(8). {_SEE_ALSO}"),
        ),
    ),
    Page(
        "pvs-target", "pvs_target.__main__", ("build_parser", "_parser"),
        "attach and read vDisks streamed by pvsd",
        (
            ("EXIT STATUS", (
                ".TP\n0\ndone.\n"
                ".TP\n1\na Standard Image could not be read whole with every block matching "
                "the manifest root pinned at login.\n"
                ".TP\n2\nany other failure, reported on one line.\n"
                ".TP\n130\ninterrupted."
            )),
            ("SEE ALSO", f"\\fBpvsd\\fR(8), \\fBpvsctl\\fR(8). {_SEE_ALSO}"),
        ),
    ),
)


def render(page: Page, date: str) -> str:
    manpage = Manpage(page.parser())
    manpage.date = date
    manpage.source = f"pvs {package_version()}"
    manpage.manual = MANUAL
    manpage.section = SECTION
    manpage.description = page.summary
    for heading, content in page.sections:
        manpage.add_section(heading, ">", content)
    return str(manpage)


def today() -> str:
    """SOURCE_DATE_EPOCH's date if set (reproducible builds), else today's, in UTC."""
    seconds = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")


def page_text(page: Page, existing: str | None) -> str:
    """The page, dated as ``existing`` (the page now in place) if nothing else changed."""
    fresh = render(page, today())
    if existing is not None:
        match = _DATE.search(existing)
        if match is not None:
            kept = render(page, match[2].replace("\\-", "-"))
            if kept == existing:
                return kept
    return fresh


def file_name(page: Page) -> str:
    return f"{page.program}.{SECTION}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/manpages", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output", type=Path, default=ROOT / "man", help="directory of the pages (default: man/)"
    )
    parser.add_argument(
        "--check", action="store_true",
        help="write nothing; exit 1 naming each page that is not what the parsers make",
    )
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        path = args.output / file_name(page)
        existing = path.read_text(encoding="utf-8") if path.exists() else None
        text = page_text(page, existing)
        if text == existing:
            continue
        stale.append(path)
        if not args.check:
            args.output.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if args.check and stale:
        for path in stale:
            print(
                f"manpages: {path} is not what the parsers make now; run scripts/manpages",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
