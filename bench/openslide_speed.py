"""The peer of `medbatch bench wsi`: OpenSlide (openslide-python + openslide-bin) on the same
slide, the same level-0 tiles (400, spread by the same stride) and 896-px regions at the
level `medbatch bench wsi` reads its patches from, for tiles/s and regions/s side by side.

  python bench/openslide_speed.py SLIDE [--patches N --level L]
"""

import argparse
import resource
import time

import openslide


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide")
    ap.add_argument("--patches", type=int, default=125)
    ap.add_argument("--level", type=int, default=None, help="level of the patches (default: the one at 10x)")
    a = ap.parse_args()
    t = time.perf_counter()
    s = openslide.OpenSlide(a.slide)
    open_s = time.perf_counter() - t
    p = s.properties
    tw, th = int(p["openslide.level[0].tile-width"]), int(p["openslide.level[0].tile-height"])
    w, h = s.level_dimensions[0]
    across, down = -(-w // tw), -(-h // th)
    total = across * down
    stride = max(total // 400, 1)
    print(f"{a.slide}: OpenSlide {openslide.__library_version__}, {s.level_count} levels, level 0 {w}x{h}")
    print(f"  open       {open_s * 1e3:.1f} ms")
    t = time.perf_counter()
    n, i = 0, 0
    while i < total and n < 400:
        s.read_region(((i % across) * tw, (i // across) * th), 0, (tw, th))
        n += 1
        i += stride
    dt = time.perf_counter() - t
    print(f"  tiles      {n} level-0 tiles in {dt:.2f} s: {n / dt:.0f} tiles/s ({n * tw * th / dt / 1e6:.1f} Mpixel/s)")
    level = a.level
    if level is None:
        mpp = float(p.get("openslide.mpp-x", 0) or 0)
        mags = [10 / (mpp * d) if mpp else 0 for d in s.level_downsamples]
        level = max([i for i, m in enumerate(mags) if m >= 10 * 0.99] or [0])
    lw, lh = s.level_dimensions[level]
    ds = s.level_downsamples[level]
    cols, rows = max(lw // 896, 1), max(lh // 896, 1)
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    step = max(len(cells) // a.patches, 1)
    picked = cells[::step][: a.patches]
    t = time.perf_counter()
    for c, r in picked:
        s.read_region((int(c * 896 * ds), int(r * 896 * ds)), level, (896, 896))
    dt = time.perf_counter() - t
    print(f"  patches    {len(picked)} regions of 896x896 on level {level} in {dt:.2f} s: {len(picked) / dt:.1f} patches/s")
    print(f"  summary    peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
