"""Writes a large synthetic whole-slide image for `medbatch bench wsi`: a BigTIFF pyramid of
JPEG tiles (256 px, levels 1, 1/4, 1/16, 1/64 as scanners write them), 0.25 µm a pixel
(40×), stained "tissue" blobs with cell-like texture on white glass, generated and written
tile by tile so that memory stays small whatever the size. No patient data.

  python bench/make_slide.py OUT.tiff --width 60000 --height 45000   (about 1.1 GB)

Needs numpy, tifffile and imagecodecs (infra/python-env.sh installs them).
"""

import argparse

import numpy as np
import tifffile

TILE = 256


def blobs(width, height, seed, n=60):
    rng = np.random.default_rng(seed)
    cx = rng.uniform(0.1, 0.9, n) * width
    cy = rng.uniform(0.1, 0.9, n) * height
    r = rng.uniform(0.02, 0.08, n) * min(width, height)
    colour = np.stack([rng.uniform(150, 210, n), rng.uniform(60, 130, n), rng.uniform(150, 220, n)], -1)
    return cx, cy, r, colour


def tile(level_scale, tx, ty, b, rng):
    """One tile of a level whose pixels are `level_scale` level-0 pixels."""
    cx, cy, r, colour = b
    ys, xs = np.mgrid[ty : ty + TILE, tx : tx + TILE].astype(np.float32) * level_scale
    img = np.full((TILE, TILE, 3), 242.0, np.float32)
    # Only blobs near the tile contribute.
    x0, y0, span = tx * level_scale, ty * level_scale, TILE * level_scale
    near = (cx + 3 * r > x0) & (cx - 3 * r < x0 + span) & (cy + 3 * r > y0) & (cy - 3 * r < y0 + span)
    for i in np.nonzero(near)[0]:
        w = np.exp(-(((xs - cx[i]) ** 2 + (ys - cy[i]) ** 2) / (2 * r[i] ** 2)))[..., None]
        img = img * (1 - w) + colour[i] * w
    tissue = img.mean(-1) < 225
    # Nuclei-like texture inside tissue, faint noise on glass.
    img += rng.normal(0, 18, img.shape).astype(np.float32) * tissue[..., None]
    img += rng.normal(0, 2, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--width", type=int, default=60000)
    ap.add_argument("--height", type=int, default=45000)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    b = blobs(a.width, a.height, a.seed)
    rng = np.random.default_rng(a.seed)
    with tifffile.TiffWriter(a.out, bigtiff=True) as w:
        for level, scale in enumerate([1, 4, 16, 64]):
            lw, lh = a.width // scale, a.height // scale
            if lw < TILE or lh < TILE:
                break
            tiles = (tile(scale, tx, ty, b, rng) for ty in range(0, lh, TILE) for tx in range(0, lw, TILE))
            w.write(
                tiles,
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"level": a.quality},
                photometric="rgb",
                subfiletype=1 if level else 0,
                resolution=(40000 / scale, 40000 / scale),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            print(f"level {level}: {lw}x{lh}", flush=True)


if __name__ == "__main__":
    main()
