"""Command-line pieces shared by `python -m deconvnet` and the job scripts."""

from __future__ import annotations

import argparse
import re

from . import storage


def add_storage_option_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for every URI (repeatable), e.g. "
                             "endpoint_url=http://127.0.0.1:9000; S3 also reads AWS_ENDPOINT_URL "
                             "and the usual AWS credential variables")


def storage_options_from(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    try:
        return dict(storage.parse_storage_option(s) for s in items)
    except ValueError as e:
        parser.error(str(e))


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{config field: its flag}, read from the parser itself: each option's
    `dest` is the config field it sets, so the mapping lives in one place."""
    return {a.dest: next(o for o in a.option_strings if o.startswith("--"))
            for a in parser._actions if any(o.startswith("--") for o in a.option_strings)}


def config_error(error: ValueError, flags: dict[str, str]) -> str:
    """A config's ValueError for a user: each `field` it names (in backquotes)
    becomes the flag that sets it, or the bare field name when none does."""
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(1)), str(error))
