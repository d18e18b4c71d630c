"""Tissue detection methods compared on slides whose tissue is known: medbatch's `luminance`
(Google's recipe: a cell's mean luminance in [1/255, 0.8]) against `otsu-saturation` (a
cell's mean HSV saturation above the slide's Otsu threshold), each through `medbatch run
wsi-tiles`, scored per cell against the truth the scenes were painted with.

  python bench/tissue_methods.py MEDBATCH_BINARY [--seeds 4] [--first-seed 0]

The scenes of seeds 0-3 are the ones the choice was made on; seeds 4-7 (`--first-seed 4`)
are reported only.

Scenes (synthetic, no patient data), painted at 1.25x (8 µm a pixel), 2,240 x 1,680 pixels,
cells of 112 pixels (an 896-px patch at 10x) — each scene kind on white glass with faint
noise:
  he        H&E-stained tissue (pink and purple, with nuclei-like texture)
  pale      H&E tissue and pale tissue (fat, faint eosin: luminance above 0.8)
  pen       H&E tissue and marker-pen strokes (blue, green, black: not tissue)
  debris    H&E tissue, dark dust and grey shadows along the cover-slip edge (not tissue)
  glass     no tissue at all (a blank or failed scan): glass with an illumination gradient
A cell is tissue in truth when at least half its pixels were painted as tissue. The script
writes each scene as a one-level TIFF, runs the wsi-tiles pipeline at 1.25x with each method
(a cell of the grid = a tile row) and prints precision, recall and F1 per kind and overall.
Needs numpy, tifffile and pyarrow (infra/python-env.sh installs them).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq
import tifffile

W, H, CELL = 2240, 1680, 112


def ellipses(rng, img, truth, n, colour_fn, is_tissue, size=(0.05, 0.18), texture=0.0):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    for _ in range(n):
        cx, cy = rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.9) * H
        rx, ry = rng.uniform(*size) * W, rng.uniform(*size) * H
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1
        colour = np.asarray(colour_fn(rng), np.float32)
        paint = colour + rng.normal(0, texture, (H, W, 3)).astype(np.float32) if texture else colour
        img[inside] = paint[inside] if texture else colour
        truth[inside] = is_tissue


def strokes(rng, img, truth, n, colours, width=(6, 14)):
    """Marker-pen strokes: thick random curves."""
    for _ in range(n):
        colour = np.asarray(colours[rng.integers(len(colours))], np.float32)
        x, y = rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.9) * H
        heading, w = rng.uniform(0, 2 * np.pi), rng.uniform(*width)
        for _ in range(400):
            heading += rng.normal(0, 0.08)
            x, y = x + 4 * np.cos(heading), y + 4 * np.sin(heading)
            x0, x1, y0, y1 = int(max(x - w, 0)), int(min(x + w, W)), int(max(y - w, 0)), int(min(y + w, H))
            if x0 >= x1 or y0 >= y1:
                break
            img[y0:y1, x0:x1] = colour
            truth[y0:y1, x0:x1] = False


def scene(kind, seed):
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(243, 3, (H, W, 3)), 0, 255).astype(np.float32)
    truth = np.zeros((H, W), bool)
    if kind == "glass":
        # Brighter in the middle, as a microscope's illumination falls off.
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        r = np.hypot((xx - W / 2) / W, (yy - H / 2) / H)
        img -= (r * rng.uniform(20, 35))[..., None]
        return np.clip(img, 0, 255).astype(np.uint8), truth
    he = lambda r: (r.uniform(170, 215), r.uniform(70, 140), r.uniform(160, 215))
    ellipses(rng, img, truth, 6, he, True, texture=22)
    if kind == "pale":
        pale = lambda r: (r.uniform(228, 238), r.uniform(206, 222), r.uniform(222, 236))
        ellipses(rng, img, truth, 6, pale, True, texture=4)
    elif kind == "pen":
        strokes(rng, img, truth, 10, [(40, 70, 150), (40, 120, 70), (25, 25, 30)])
    elif kind == "debris":
        dust = lambda r: (r.uniform(10, 40),) * 3
        ellipses(rng, img, truth, 40, dust, False, size=(0.004, 0.015))
        # A grey shadow along two edges (the cover slip's rim).
        edge = int(0.06 * W)
        img[:, :edge] = rng.uniform(185, 200)
        img[:edge, :] = rng.uniform(185, 200)
        truth[:, :edge] = False
        truth[:edge, :] = False
    return np.clip(img, 0, 255).astype(np.uint8), truth


def truth_cells(truth):
    cells = set()
    for cy in range(H // CELL):
        for cx in range(W // CELL):
            if truth[cy * CELL : (cy + 1) * CELL, cx * CELL : (cx + 1) * CELL].mean() >= 0.5:
                cells.add((cx, cy))
    return cells


PIPELINE = """name = "tissue-{method}"
version = "1"
task = "tiles"

[input]
kinds = ["slide"]

[imaging]
unit = "tiles"

[imaging.slide]
magnification = 1.25
patch = {cell}
stride = {cell}
mask_magnification = 1.25
tissue = "{method}"

[output]
table = "wsi_tiles"
"""


def run(binary, root, method, slides):
    pipe = root / f"tissue-{method}"
    pipe.mkdir()
    (pipe / "pipeline.toml").write_text(PIPELINE.format(method=method, cell=CELL))
    out = root / f"out-{method}"
    subprocess.run([binary, "run", str(pipe), str(slides), "--out", str(out)], check=True, capture_output=True)
    found = {}
    for f in (out / "wsi_tiles").rglob("*.parquet"):
        t = pq.ParquetFile(f).read().to_pydict()
        for d, c, r in zip(t["document_id"], t["grid_col"], t["grid_row"]):
            found.setdefault(d, set()).add((c, r))
    return found


def score(pairs):
    tp = sum(len(t & p) for t, p in pairs)
    fp = sum(len(p - t) for t, p in pairs)
    fn = sum(len(t - p) for t, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=0)
    a = ap.parse_args()
    kinds = ["he", "pale", "pen", "debris", "glass"]
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        slides = root / "slides"
        slides.mkdir()
        truths = {}
        for kind in kinds:
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                img, truth = scene(kind, 1000 * kinds.index(kind) + seed)
                name = f"{kind}-{seed}.tiff"
                # 8 µm a pixel: 1.25x.
                tifffile.imwrite(slides / name, img, tile=(256, 256), photometric="rgb", resolution=(1250, 1250), resolutionunit="CENTIMETER")
                truths[name] = truth_cells(truth)
        results = {m: run(a.binary, root, m, slides) for m in ["luminance", "otsu-saturation"]}
    rows = []
    for kind in kinds + ["all"]:
        names = [n for n in truths if kind == "all" or n.startswith(kind + "-")]
        line = {"kind": kind, "cells": len(names) * (W // CELL) * (H // CELL), "tissue cells": sum(len(truths[n]) for n in names)}
        for m, found in results.items():
            pairs = [(truths[n], found.get(n, set())) for n in names]
            p, r, f = score(pairs)
            false_positives = sum(len(q - t) for t, q in pairs)
            line[m] = {"precision": round(p, 3), "recall": round(r, 3), "f1": round(f, 3), "false cells": false_positives}
        rows.append(line)
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
