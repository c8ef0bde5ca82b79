"""Command-line pieces shared by `python -m deconvnet` and the job scripts."""

from __future__ import annotations

import argparse

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
