"""Dense CRF cost: exact vs pruned vs early-stopped on photographs, the presets, and `max_side`.

    .venv/bin/python bench/crf.py                 # every table on stdout, JSON in bench/results/crf.json
    .venv/bin/python bench/crf.py --part settings # only the exact / pruned / early-stop table
    .venv/bin/python bench/crf.py --part split    # only where the default CRF's time goes
    .venv/bin/python bench/crf.py --repeats 5 --output /tmp/crf.json

Settings (`--part settings`): the `paper` preset as `--inference default` runs
it, with `exact` (every label, 10 steps: `--crf-exact`), pruned (labels that
cannot win left out, 10 steps) and pruned + early stop (the default), on real
photographs: matplotlib's grace_hopper.jpg and, when scikit-image is installed
(`pip install -e .[bench]`), the photographs its wheel ships (astronaut,
chelsea, coffee, rocket). Each is cropped to 4:3 at its centre and resized
(bicubic) to 500x375 and 1000x750 (upscaled: none is that large). Three
recipes of probability maps. No 21-class VOC model is trained here; two are
made from a pseudo ground truth: k-means (k = 5) on colour and position of
the photograph at 1/8 size, the clusters given classes 0, 15, 12, 7, 9; then
- `soft`, the scene's below: the one-hot map area-downsampled 16x, bilinear
  back, logits 6 x that + 1.5 x smooth unit noise on all 21 classes;
- `peaked`: logits 12 x the blurred one-hot + 1.5 x smooth noise on the
  present classes and 2 absent "confusable" ones, -8 for the other 14-16
  classes: a confident network that hesitates among a few classes only (at
  a three-class junction of the blurred map, 12 x 1/3 = 4, an absent class is
  then about e^-12 of the best, where `soft` puts it at about e^-4);
- `demo`: a trained network's, the merged map the segmenter gives with
  `--model` (default models/demo: a tiny 21-class DeconvNet trained on
  generated shapes of 4 classes + background, so not a VOC model) as
  `--inference default` runs it, with grid proposals (50 + the whole image).
Reported per image: ms of CPU time (time.process_time, all threads) and of
wall time, the steps run, the labels kept, and % of labels equal to the
exact CRF's; then the means per size and recipe.

Split (`--part split`): on astronaut's `soft` map at each size, CPU ms of
building each lattice, of the bound, of one step over 1 to 21 labels and of
the early stop's argmax.

The scene (sky, wavy horizon, ground, a person, a car and a dog, with colour
texture and sensor noise) is drawn at any size from the same normalised
geometry. Its 21-class probability map mimics a merged network output: the
one-hot ground truth is downsampled 16x and upsampled again (blurred borders),
and low-frequency noise on every class's logits adds confusion.

Reported: milliseconds per image (median of the repeats) for each preset at
500x375 and 1000x750, pixel accuracy and mean IoU against the ground truth
before and after the CRF, and, at 1000x750, the time and the agreement (% of
pixels with the same label) of the CRF run at a reduced `max_side` against the
full-resolution CRF.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from deconvnet.inference.crf import CRF_PRESETS, CRFConfig, dense_crf, mean_field
from deconvnet.inference import INFERENCE_MODES, for_mode

NUM_CLASSES = 21  # PASCAL VOC
BACKGROUND, CAR, DOG, PERSON = 0, 7, 12, 15


def scene(width: int, height: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB image and its (H, W) uint8 ground-truth labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width] / np.array([height, width])[:, None, None]  # (H, W), [0, 1)
    horizon = 0.55 + 0.04 * np.sin(xx * 9) + 0.02 * np.sin(xx * 23 + 1)  # (H, W)
    sky = np.stack([90 + 80 * yy, 140 + 60 * yy, 230 - 20 * yy], axis=-1)
    ground = np.stack([70 + 40 * yy, 110 + 30 * yy, 50 + 10 * yy], axis=-1)
    rgb = np.where((yy < horizon)[..., None], sky, ground)  # (H, W, 3)

    labels = Image.new("L", (width, height), BACKGROUND)
    paint = Image.fromarray(rgb.astype(np.uint8))
    draw_l, draw_c = ImageDraw.Draw(labels), ImageDraw.Draw(paint)

    def box(x1: float, y1: float, x2: float, y2: float) -> list[float]:
        return [x1 * width, y1 * height, x2 * width, y2 * height]

    def poly(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * width, y * height) for x, y in points]

    # A person: head, torso, legs.
    for shape, colour in (
        (("ellipse", box(0.20, 0.22, 0.26, 0.31)), (225, 180, 150)),
        (("rectangle", box(0.18, 0.31, 0.28, 0.58)), (170, 40, 40)),
        (("polygon", poly([(0.19, 0.58), (0.27, 0.58), (0.29, 0.83), (0.25, 0.83),
                           (0.23, 0.64), (0.21, 0.83), (0.17, 0.83)])), (40, 40, 90)),
    ):
        kind, xy = shape
        getattr(draw_c, kind)(xy, fill=colour)
        getattr(draw_l, kind)(xy, fill=PERSON)
    # A car: body, cabin, wheels.
    car_body = poly([(0.45, 0.60), (0.85, 0.60), (0.88, 0.75), (0.43, 0.75)])
    car_cabin = poly([(0.52, 0.60), (0.56, 0.48), (0.74, 0.48), (0.79, 0.60)])
    for xy in (car_body, car_cabin):
        draw_c.polygon(xy, fill=(200, 200, 210))
        draw_l.polygon(xy, fill=CAR)
    for cx in (0.52, 0.79):
        wheel = box(cx - 0.04, 0.70, cx + 0.04, 0.81)
        draw_c.ellipse(wheel, fill=(25, 25, 25))
        draw_l.ellipse(wheel, fill=CAR)
    # A dog: body blob, head, legs.
    dog = poly([(0.30, 0.78), (0.40, 0.76), (0.42, 0.72), (0.45, 0.74), (0.44, 0.80),
                (0.42, 0.92), (0.39, 0.92), (0.38, 0.84), (0.33, 0.84), (0.32, 0.92),
                (0.29, 0.92), (0.30, 0.84)])
    draw_c.polygon(dog, fill=(150, 100, 50))
    draw_l.polygon(dog, fill=DOG)

    # Texture: low-frequency colour variation and per-pixel noise, then the
    # slight blur of a camera; labels keep their hard edges.
    image = np.asarray(paint.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    image = image + _low_frequency(rng, 3, height, width).transpose(1, 2, 0) * 12
    image = image + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(labels)


def network_like_probs(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(21, H, W) float32 probabilities that look like a merged DeconvNet output."""
    rng = np.random.default_rng(seed)
    h, w = labels.shape
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[labels].transpose(2, 0, 1)  # (C, H, W)
    coarse = torch.nn.functional.interpolate(torch.from_numpy(one_hot)[None], scale_factor=1 / 16,
                                             mode="area")
    blurred = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                              align_corners=False)[0].numpy()
    logits = 6 * blurred + 1.5 * _low_frequency(rng, NUM_CLASSES, h, w)
    return torch.softmax(torch.from_numpy(logits), dim=0).numpy()


def _low_frequency(rng: np.random.Generator, channels: int, h: int, w: int) -> np.ndarray:
    """(channels, H, W) smooth noise, about unit std: 6x8 random cells upsampled."""
    cells = torch.from_numpy(rng.normal(0, 1, (1, channels, 6, 8)).astype(np.float32))
    return torch.nn.functional.interpolate(cells, size=(h, w), mode="bicubic",
                                           align_corners=False)[0].numpy()


def mean_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    ious = [np.logical_and(pred == c, truth == c).sum() / np.logical_or(pred == c, truth == c).sum()
            for c in np.unique(truth)]
    return float(np.mean(ious))


def timed(repeats: int, fn, *args):
    """(median milliseconds, last result)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def crf_settings(**overrides) -> dict[str, CRFConfig]:
    """Every CRF preset as each inference mode runs it ('paper/original', ...), exact
    (every label, every step: the cost the settings table compares against)."""
    return {f"{name}/{mode}": for_mode(mode, crf=name, crf_exact=True, **overrides).crf
            for name in CRF_PRESETS for mode in INFERENCE_MODES}


PHOTO_CLASSES = (0, 15, 12, 7, 9)  # the k-means clusters' classes: background, person, dog, car, chair
CONFUSABLE = (8, 11)  # the `peaked` recipe's two absent classes with noise
ABSENT_LOGIT = -8.0  # the `peaked` recipe's logit of every other class


def photographs() -> dict[str, Image.Image]:
    """Name -> RGB photograph: matplotlib's, and scikit-image's shipped ones if installed."""
    import importlib.util

    import matplotlib.cbook
    photos = {"grace_hopper": Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))}
    spec = importlib.util.find_spec("skimage")
    if spec is not None:  # read from the wheel's data folder: no download, no import of skimage
        data = Path(spec.origin).parent / "data"
        for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
            if (data / name).exists():
                photos[name.split(".")[0]] = Image.open(data / name)
    return {name: image.convert("RGB") for name, image in photos.items()}


def photo_at(photo: Image.Image, width: int, height: int) -> np.ndarray:
    """The photograph's centre cropped to width:height, resized (bicubic): (H, W, 3) uint8."""
    w, h = photo.size
    cw, ch = min(w, h * width // height), min(h, w * height // width)
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    return np.asarray(photo.crop(box).resize((width, height), Image.BICUBIC))


def pseudo_truth(image: np.ndarray, seed: int = 0, k: int = 5, iters: int = 20) -> np.ndarray:
    """(H, W) uint8 labels: k-means on (colour, position) at 1/8 size, nearest-upsampled,
    clusters mapped to PHOTO_CLASSES."""
    h, w = image.shape[:2]
    small = np.asarray(Image.fromarray(image).resize((w // 8, h // 8), Image.BILINEAR), np.float32)
    yy, xx = np.mgrid[:small.shape[0], :small.shape[1]]
    feats = np.concatenate([small / 255, (np.stack([yy, xx], -1) / max(small.shape[:2]))[..., :] * 0.7],
                           -1).reshape(-1, 5)
    rng = np.random.default_rng(seed)
    centres = feats[rng.choice(len(feats), k, replace=False)]
    for _ in range(iters):
        assign = ((feats[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([feats[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
    labels = np.asarray(PHOTO_CLASSES, np.uint8)[assign].reshape(small.shape[:2])
    return np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))


def peaked_probs(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(21, H, W) float32: the `peaked` recipe (module docstring)."""
    rng = np.random.default_rng(seed)
    h, w = labels.shape
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[labels].transpose(2, 0, 1)  # (C, H, W)
    coarse = torch.nn.functional.interpolate(torch.from_numpy(one_hot)[None], scale_factor=1 / 16, mode="area")
    blurred = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
    noisy = sorted({*np.unique(labels).tolist(), *CONFUSABLE})
    logits = np.full_like(blurred, ABSENT_LOGIT)
    logits[noisy] = 12 * blurred[noisy] + 1.5 * _low_frequency(rng, len(noisy), h, w)
    return torch.softmax(torch.from_numpy(logits), dim=0).numpy()


def cpu_and_wall(repeats: int, fn, *args):
    """(median CPU ms over all threads, median wall ms, last result)."""
    cpu, wall, result = [], [], None
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        result = fn(*args)
        cpu.append((time.process_time() - c) * 1000)
        wall.append((time.perf_counter() - t) * 1000)
    return statistics.median(cpu), statistics.median(wall), result


def model_probs(model: str):
    """The `demo` recipe: a function image -> (C, H, W) float32, the merged probability
    map the segmenter gives with the model directory `model` as `--inference default`
    runs it (grid proposals: no structured-edge model here)."""
    from deconvnet.inference.proposals import propose
    from deconvnet.inference.segmenter import Segmenter

    inference = for_mode("default")
    segmenter = Segmenter.from_model_dir(model, inference.segmenter)
    return lambda image: segmenter.probabilities([image], [propose(image, inference.proposals)])[0]


def settings_table(repeats: int, sizes: list[tuple[int, int]], photo_names: list[str] | None,
                   model: str | None = None) -> list[dict]:
    """The exact / pruned / pruned + early stop table on photographs (module docstring)."""
    base = for_mode("default", crf="paper").crf
    settings = {"exact": dataclasses.replace(base, exact=True),
                "pruned": dataclasses.replace(base, exact=False, stop_changed=None),
                "pruned+stop": dataclasses.replace(base, exact=False)}
    photos = photographs()
    if photo_names:
        photos = {n: photos[n] for n in photo_names}
    recipes = {"soft": lambda image, truth: network_like_probs(truth),
               "peaked": lambda image, truth: peaked_probs(truth)}
    if model:
        demo = model_probs(model)
        recipes["demo"] = lambda image, truth: demo(image)
    rows = []
    print(f"{'photo':>13} {'size':>9} {'maps':>6} {'setting':>11} {'cpu ms':>8} {'wall ms':>8} "
          f"{'steps':>5} {'kept':>4} {'agree %':>8}")
    for name, photo in photos.items():
        for width, height in sizes:
            image = photo_at(photo, width, height)
            truth = pseudo_truth(image)
            for recipe, make in recipes.items():
                probs = make(image, truth)
                exact_labels = None
                for setting, config in settings.items():
                    cpu, wall, result = cpu_and_wall(repeats, mean_field, image, probs, config)
                    labels = result.q.argmax(axis=0)
                    if exact_labels is None:
                        exact_labels = labels
                    row = {"photo": name, "size": f"{width}x{height}", "maps": recipe, "setting": setting,
                           "cpu_ms": round(cpu, 1), "wall_ms": round(wall, 1), "steps": result.steps,
                           "kept": len(result.kept),
                           "agreement_pct": float((labels == exact_labels).mean() * 100)}
                    rows.append(row)
                    print(f"{name:>13} {row['size']:>9} {recipe:>6} {setting:>11} {cpu:8.0f} {wall:8.0f} "
                          f"{row['steps']:>5} {row['kept']:>4} {row['agreement_pct']:8.2f}")
    print(f"\nmeans over photographs\n{'size':>9} {'maps':>6} {'setting':>11} {'cpu ms':>8} {'wall ms':>8} "
          f"{'x exact':>7} {'agree %':>8} {'min agree':>9}")
    for size in dict.fromkeys(r["size"] for r in rows):
        for recipe in recipes:
            group = [r for r in rows if r["size"] == size and r["maps"] == recipe]
            exact_cpu = statistics.mean(r["cpu_ms"] for r in group if r["setting"] == "exact")
            for setting in settings:
                sel = [r for r in group if r["setting"] == setting]
                cpu = statistics.mean(r["cpu_ms"] for r in sel)
                agree = [r["agreement_pct"] for r in sel]
                print(f"{size:>9} {recipe:>6} {setting:>11} {cpu:8.0f} "
                      f"{statistics.mean(r['wall_ms'] for r in sel):8.0f} {exact_cpu / cpu:7.2f} "
                      f"{statistics.mean(agree):8.2f} {min(agree):9.2f}")
    return rows


def split_table(sizes: list[tuple[int, int]], photo: str = "astronaut") -> list[dict]:
    """Where the default CRF's time goes (CPU ms, one run each) on one photograph's
    `soft` map: building the Gaussian and the bilateral lattice, the bound
    (`_pairwise_bound`), one mean-field step over 1, 2, 5, 10 and 21 labels (the
    mean of 3) and the argmax the early stop takes after each step (over 21)."""
    import pydensecrf.densecrf as dcrf
    import pydensecrf.eigen as eigen

    from deconvnet.inference.crf import KERNELS, NORMALIZATIONS, _pairwise_bound, unary_energy

    config, rows = for_mode("default", crf="paper").crf, []
    kernel, norm = KERNELS[config.kernel], NORMALIZATIONS[config.normalization]
    for width, height in sizes:
        image = photo_at(photographs()[photo], width, height)
        unary = unary_energy(network_like_probs(pseudo_truth(image)), config.unary_clip)
        crf = dcrf.DenseCRF2D(width, height, NUM_CLASSES)
        row, clock = {"photo": photo, "size": f"{width}x{height}"}, time.process_time()

        def lap(name: str, since: float, divide: int = 1) -> float:
            now = time.process_time()
            row[name] = round((now - since) * 1000 / divide, 1)
            return now

        crf.addPairwiseGaussian(sxy=config.gauss_sxy, compat=config.gauss_compat, kernel=kernel, normalization=norm)
        clock = lap("gaussian_build_ms", clock)
        crf.addPairwiseBilateral(sxy=config.bilateral_sxy, srgb=config.bilateral_srgb, rgbim=np.array(image),
                                 compat=config.bilateral_compat, kernel=kernel, normalization=norm)
        clock = lap("bilateral_build_ms", clock)
        _pairwise_bound(crf, width * height)
        lap("bound_ms", clock)
        for labels in (1, 2, 5, 10, NUM_CLASSES):
            crf.setUnary(dcrf.ConstUnary(np.ascontiguousarray(unary[:labels])))
            q, _, scratch = crf.startInference()
            logits, clock = eigen.matrixXf(-unary[:labels]), time.process_time()
            for _ in range(3):
                crf.stepInference(q, logits, scratch)
            clock = lap(f"step_{labels}_labels_ms", clock, 3)
        np.asarray(q).argmax(axis=0)
        lap("argmax_21_ms", clock)
        rows.append(row)
        print(" ".join(f"{k} {v}" for k, v in row.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "settings", "split", "presets"], default="all",
                        help="settings: exact / pruned / early stop on photographs; split: where the "
                             "default CRF's time goes; presets: the presets and max_side on the synthetic scene")
    parser.add_argument("--sizes", nargs="+", default=["500x375", "1000x750"],
                        help="WIDTHxHEIGHT of the settings table's images")
    parser.add_argument("--photos", nargs="+", help="only these photographs (default: all found)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "demo"),
                        help="model directory of the settings table's `demo` maps ('' for none)")
    parser.add_argument("--max-sides", type=int, nargs="+", default=[500, 375, 250],
                        help="reduced max_side values to compare at 1000x750")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "crf.json")
    args = parser.parse_args()

    results: dict = {"machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                                 "torch_threads": torch.get_num_threads()},
                     "repeats": args.repeats, "presets": [], "max_side": [], "settings": [], "split": []}
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    if args.part in ("all", "split"):
        results["split"] = split_table(sizes)
    if args.part == "split":
        write(args.output, results)
        return
    if args.part in ("all", "settings"):
        results["settings"] = settings_table(args.repeats, sizes, args.photos, args.model or None)
    if args.part == "settings":
        write(args.output, results)
        return
    print(f"{'size':>9} {'preset/mode':>16} {'ms':>8} {'acc before':>10} {'acc after':>9} "
          f"{'mIoU before':>11} {'mIoU after':>10}")
    full_labels = {}
    for width, height in ((500, 375), (1000, 750)):
        image, truth = scene(width, height)
        probs = network_like_probs(truth)
        before = probs.argmax(axis=0)
        for name, config in crf_settings().items():
            ms, (labels, confidence) = timed(args.repeats, dense_crf, image, probs, config)
            full_labels[width, name] = labels
            row = {"size": f"{width}x{height}", "preset": name, "ms": round(ms, 1),
                   "acc_before": float((before == truth).mean()),
                   "acc_after": float((labels == truth).mean()),
                   "miou_before": mean_iou(before, truth), "miou_after": mean_iou(labels, truth),
                   "mean_confidence": float(confidence.mean())}
            results["presets"].append(row)
            print(f"{row['size']:>9} {name:>16} {ms:8.1f} {row['acc_before']:10.4f} "
                  f"{row['acc_after']:9.4f} {row['miou_before']:11.4f} {row['miou_after']:10.4f}")

    image, truth = scene(1000, 750)
    probs = network_like_probs(truth)
    print(f"\n1000x750, CRF at a reduced max_side vs full resolution\n"
          f"{'preset/mode':>16} {'max_side':>8} {'ms':>8} {'agree %':>8} {'mIoU':>7}")
    for max_side in args.max_sides:
        for name, config in crf_settings(crf_max_side=max_side).items():
            ms, (labels, _) = timed(args.repeats, dense_crf, image, probs, config)
            row = {"preset": name, "max_side": max_side, "ms": round(ms, 1),
                   "agreement_pct": float((labels == full_labels[1000, name]).mean() * 100),
                   "miou": mean_iou(labels, truth)}
            results["max_side"].append(row)
            print(f"{name:>16} {max_side:>8} {ms:8.1f} {row['agreement_pct']:8.2f} "
                  f"{row['miou']:7.4f}")

    write(args.output, results)


def write(output: Path, results: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
