"""Command line of the model library.

    python -m deconvnet init --preset tiny --out models/tiny
    python -m deconvnet init --preset paper --vgg16 vgg16-397923af.pth --out s3://bucket/models/deconvnet-init
    python -m deconvnet convert-caffe DeconvNet_trainval_inference.caffemodel --out models/deconvnet-voc
    python -m deconvnet segment photo.jpg --model models/tiny --out photo.png --overlay photo-overlay.jpg

A user mistake (a missing file, a bad value) is one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from . import storage
from .cli import add_flags, add_inference_flags, add_storage_option_arg, config_error, flag, storage_options_from


def read_classes(args, parser, opts) -> tuple[str, ...] | None:
    """--classes: class names, one per line, background first; None when not given."""
    if not args.classes:
        return None
    try:
        text = storage.read_bytes(args.classes, opts).decode()
    except FileNotFoundError:
        parser.error(f"--classes: no such file {args.classes}")
    classes = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(classes) < 2:
        parser.error(f"--classes: need at least 2 names (background first), got {len(classes)}")
    return classes


def cmd_init(args, parser) -> int:
    import torch

    from .model import build_model, preset
    from .records import now_iso
    from .weights import ModelInfo, init_from_vgg16, read_state_dict, save_model_dir
    from .data.voc import VOC_CLASSES

    opts = storage_options_from(parser, args.storage_option)
    classes = read_classes(args, parser, opts) or VOC_CLASSES
    config = preset(args.preset, num_classes=len(classes))
    torch.manual_seed(args.seed)
    model = build_model(config)
    provenance = {"created": now_iso(), "created_by": "python -m deconvnet init",
                  "preset": args.preset, "seed": args.seed, "encoder_init": "random (He normal)"}
    if args.vgg16:
        try:
            loaded = init_from_vgg16(model, read_state_dict(args.vgg16, opts))
        except FileNotFoundError:
            parser.error(f"--vgg16: no such file {args.vgg16}")
        except ValueError as e:
            parser.error(f"--vgg16: {e}")
        provenance["encoder_init"] = f"VGG16 ImageNet weights from {args.vgg16} ({len(loaded)} tensors)"
    info = save_model_dir(model, args.out, ModelInfo(config=config, classes=classes,
                                                     provenance=provenance), opts)
    print(f"wrote {args.out} (model id {info.model_id}, {len(classes)} classes, preset {args.preset})")
    return 0


def cmd_segment(args, parser) -> int:
    from .data.imageio import BadImage, decode_image, encode_jpeg
    from .data.voc import encode_label_png, overlay
    from .inference import for_mode
    from .inference.crf import label_map
    from .inference.modes import RUN_SETTINGS
    from .inference.proposals import propose
    from .inference.segmenter import Segmenter

    opts = storage_options_from(parser, args.storage_option)
    try:
        cfg = for_mode(args.inference, **{name: getattr(args, name) for name in RUN_SETTINGS})
        segmenter = Segmenter.from_model_dir(args.model, cfg.segmenter,
                                             device=args.device, fcn_uri=args.fcn_model, storage_options=opts)
        image = decode_image(storage.read_bytes(args.image, opts))
        boxes = propose(image, cfg.proposals, opts)  # reads --edge-model with the storage options
    except (FileNotFoundError, ValueError) as e:  # BadImage is a ValueError
        parser.error(("image: " if isinstance(e, BadImage) else "") + config_error(e, args.flag_of))
    probs = segmenter.probabilities([image], [boxes])[0]  # (C, H, W)
    labels, confidence, uncertainty = label_map(image, probs, cfg.crf)
    palette = segmenter.info.palette_array()
    storage.write_bytes(args.out, encode_label_png(labels, palette), opts)
    if args.overlay:
        storage.write_bytes(args.overlay, encode_jpeg(overlay(image, labels, palette=palette)), opts)
    counts = np.bincount(labels.ravel(), minlength=segmenter.num_classes)
    present = ", ".join(f"{segmenter.info.classes[k]} {100 * counts[k] / labels.size:.1f}%"
                        for k in np.argsort(-counts) if counts[k])
    print(f"{args.image}: {image.shape[1]}x{image.shape[0]}, {len(boxes)} proposals, "
          f"mean confidence {confidence:.3f}, uncertain pixels {100 * uncertainty:.1f}%; {present}")
    print(f"wrote {args.out}" + (f" and {args.overlay}" if args.overlay else ""))
    return 0


def cmd_convert_caffe(args, parser) -> int:
    from .caffe.convert import convert_caffemodel

    opts = storage_options_from(parser, args.storage_option)
    classes = read_classes(args, parser, opts)
    try:
        done = convert_caffemodel(args.weights, args.out, kind=args.kind, classes=classes,
                                  bn_mode=args.bn_mode, seed=args.seed, storage_options=opts)
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:  # one line, nothing written
        what = f"no such file {e.filename or e}" if isinstance(e, OSError) else config_error(e, args.flag_of)
        print(f"{parser.prog}: error: {' '.join(what.split())}", file=sys.stderr)
        return 2
    n = sum(int(np.prod(v.shape)) for k, v in done.state.items() if ".bn." not in k)
    bn = {"inference": "folded for inference", "learn": "training gamma/beta, no statistics"}.get(done.bn_mode, "none")
    print(f"wrote {args.out} (model id {done.info.model_id}, kind {done.kind}, "
          f"{len(done.info.classes)} classes, BN {bn}, {n:,} weights and biases)")
    if done.bn_mode == "learn":
        print("note: a training snapshot: use it to fine-tune (jobs/train.py --init), not for inference")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The command line and its subcommands."""
    from .caffe.convert import BN_MODES, KINDS
    from .model import PRESETS

    parser = argparse.ArgumentParser(prog="python -m deconvnet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a model directory (random decoder, encoder from VGG16 if given)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="architecture preset")
    p.add_argument("--out", required=True, help="model directory URI to write")
    p.add_argument("--vgg16", help="torchvision vgg16/vgg16_bn ImageNet state dict (.pth or .safetensors), path or URI")
    p.add_argument("--classes", help="text file of class names, one per line, background first (default: PASCAL VOC's 21)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (the same seed, the same model)")
    add_storage_option_arg(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("segment", help="segment one image: palette PNG label map (+ colour overlay)")
    p.add_argument("image", help="image path or URI")
    p.add_argument("--model", required=True, help="DeconvNet model directory")
    flag_of = add_inference_flags(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="label map to write (palette PNG)")
    p.add_argument("--overlay", help="colour overlay to write (JPEG)")
    flag_of.update(add_storage_option_arg(p))
    p.set_defaults(func=cmd_segment, flag_of=flag_of)

    p = sub.add_parser("convert-caffe", help="a model directory from the authors' Caffe weights (.caffemodel)")
    p.add_argument("weights", help=".caffemodel path or URI (DeconvNet, FCN-8s or VGG16)")
    p.add_argument("--out", required=True, help="model directory URI to write")
    flag_of = add_flags(p, [
        flag("--kind", choices=KINDS, help="default: told from the layer names"),
        flag("--classes", help="text file of class names, one per line (default: PASCAL VOC's 21)"),
        flag("--bn-mode", choices=BN_MODES,
             help="what DeconvNet's BN blobs hold, when the file cannot tell: folded scale/shift "
                  "(inference model) or learned gamma/beta (training snapshot)"),
        flag("--seed", type=int, default=0, help="--kind vgg16: seed of the decoder's initialisation"),
    ])
    flag_of.update(add_storage_option_arg(p))
    p.set_defaults(func=cmd_convert_caffe, flag_of=flag_of)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    parser, sub = build_parser()
    args = parser.parse_args(argv)
    sub_parser = sub.choices[args.command]
    return args.func(args, sub_parser)


if __name__ == "__main__":
    sys.exit(main())
