"""Command-line pieces shared by `python -m deconvnet` and the job scripts.

A command line is a list of `Flag`s, each the option and the config field it
sets (its `dest`): `add_flags` makes the parser's options from that list and
returns the {field: flag} map that `config_error` uses, so a config's error
names the flag the user typed. `inference_flags` are the inference settings
(`deconvnet.inference.for_mode`'s), the same in `python -m deconvnet segment`
and jobs/segment_dataset.py, with defaults read from the mode table.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import storage


@dataclass(frozen=True)
class Flag:
    """One option: its name (`--max-proposals`), the config field it sets
    (`max_proposals`, its dest) and the rest of `add_argument`'s arguments."""
    name: str
    field: str
    options: dict[str, Any]


def flag(name: str, field: str | None = None, **options: Any) -> Flag:
    """A Flag; its field is the name without dashes unless given."""
    return Flag(name, field or name.lstrip("-").replace("-", "_"), options)


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> dict[str, str]:
    """Add each flag to the parser (its dest is its field); {field: flag}."""
    for f in flags:
        parser.add_argument(f.name, dest=f.field, **f.options)
    return {f.field: f.name for f in flags}


def add_storage_option_arg(parser: argparse.ArgumentParser) -> dict[str, str]:
    """--storage-option (dest `storage_option`, a list of KEY=VALUE); the
    {field: flag} entry of the configs' `storage_options`."""
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for every URI (repeatable), e.g. "
                             "endpoint_url=http://127.0.0.1:9000; S3 also reads AWS_ENDPOINT_URL "
                             "and the usual AWS credential variables")
    return {"storage_options": "--storage-option"}


def storage_options_from(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    try:
        return dict(storage.parse_storage_option(s) for s in items)
    except ValueError as e:
        parser.error(str(e))


def config_error(error: ValueError, flags: dict[str, str]) -> str:
    """A config's ValueError for a user: each `field` it names (in backquotes)
    becomes the flag that sets it, or the bare field name when none does."""
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(1)), str(error))


def inference_flags() -> list[Flag]:
    """The inference options, each with one help text. A default every mode
    shares is the option's default (read from the mode table now, so the
    help shows it); one that differs by mode is None, "the mode's"."""
    from .inference.crf import CRF_PRESETS
    from .inference.modes import INFERENCE_MODES, NO_CRF, fixed_by, setting
    from .inference.proposals import PROPOSAL_METHODS
    from .inference.segmenter import AGGREGATES, ENSEMBLES

    def default(name: str) -> dict[str, Any]:
        """`default` and the help's ending of a setting the modes set."""
        values = {mode: setting(name, mode) for mode in INFERENCE_MODES}
        fixed = [mode for mode in INFERENCE_MODES if name in fixed_by(mode)]
        if len(set(values.values())) == 1:
            return {"default": values["default"], "help": " (default: %(default)s" + "".join(
                f"; the only one in --inference {m}" for m in fixed) + ")"}
        return {"default": None, "help": " (default: the mode's: " + ", ".join(
            f"{v}{' (the only one)' if m in fixed else ''} in --inference {m}" for m, v in values.items()) + ")"}

    def option(name: str, help: str, **options: Any) -> Flag:
        known = default(flag(name).field)
        return flag(name, help=help + known.pop("help"), **known, **options)

    paper = CRF_PRESETS["paper"]
    return [
        flag("--fcn-model", help="FCN-8s model directory: combine with it (EDeconvNet, see --ensemble)"),
        flag("--inference", choices=INFERENCE_MODES, default="default",
             help=f"original: what the authors' release does (boxes under {setting('min_side', 'original')} px "
                  f"skipped, the first {setting('max_proposals', 'original')} processed, no whole-image box; "
                  "black padding; raw scores max-merged from zero, one softmax; EDeconvNet softmax(DeconvNet "
                  "score x max(0, FCN score)); the CRF preset as is: 'paper' is the release's, unnormalised "
                  f"kernels). default: the project's (whole image added, boxes under {setting('min_side')} px "
                  "skipped, mean-colour padding, per-proposal softmax, mean ensemble, normalised CRF kernels)"),
        flag("--proposals", choices=sorted(PROPOSAL_METHODS),
             help="proposal generator (default: edgeboxes with --edge-model, else grid)"),
        flag("--edge-model", help="structured-edge model file (OpenCV's model.yml.gz), path or URI, "
                                  "for --proposals edgeboxes; read with --storage-option"),
        option("--max-proposals", "boxes segmented per image (+ the whole image in --inference default)", type=int),
        option("--aggregate", "merge of proposal maps: pixel-wise max or mean over covering proposals",
               choices=AGGREGATES),
        option("--ensemble", "EDeconvNet rule with --fcn-model: mean of the two probability maps (the "
                             "paper's text), their product renormalised, or relu-product (the release's)",
               choices=ENSEMBLES),
        option("--crf", f"dense CRF preset: paper (the release's Gaussian {paper.gauss_sxy:g}/{paper.gauss_compat:g}, "
                        f"bilateral {paper.bilateral_sxy:g}/{paper.bilateral_srgb:g}/{paper.bilateral_compat:g}, "
                        f"{paper.iterations} iterations), deeplab, or none", choices=[*sorted(CRF_PRESETS), NO_CRF]),
        flag("--crf-max-side", type=int, help="run the CRF on at most this longer side (default: full size)"),
        option("--crf-exact", "run the CRF's full computation: every label, every step. Otherwise labels "
                              "that cannot win (a stated bound) are left out and the steps stop when the "
                              "labels settle", action="store_true"),
        option("--batch-size", "proposals per forward pass; bounds GPU memory", type=int),
    ]


def add_inference_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Add `inference_flags` to a parser; {field: flag}."""
    return add_flags(parser, inference_flags())
