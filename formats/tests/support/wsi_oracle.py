"""Whole-slide test oracle: writes synthetic pyramids with tifffile and imagecodecs, and
reads any slide with OpenSlide (openslide-python + openslide-bin), for formats/tests/wsi.rs.

  wsi_oracle.py make DIR                     write the synthetic slides into DIR
  wsi_oracle.py describe FILE                levels, downsamples, µm per pixel as JSON
  wsi_oracle.py region FILE LEVEL X Y W H    RGB bytes of OpenSlide's read_region on stdout
                                             (X, Y in level-0 pixels, as OpenSlide takes them)
  wsi_oracle.py damage SRC DST KIND          a copy of SRC damaged one way (see damage())
  wsi_oracle.py tissue FILE LEVEL CELL COLS ROWS
                                             grid cells (CELL pixels of LEVEL a side) whose
                                             mean luminance lies in [1/255, 0.8], as JSON
  wsi_oracle.py make-case DIR                two DICOM slides of one study (a case): DIR/a
                                             and DIR/b, JPEG tiles, three levels each
  wsi_oracle.py large FILE MIB               an uncompressed BigTIFF pyramid of about MIB
                                             MiB (40x, 0.25 µm a pixel; tissue in a central
                                             ellipse), written tile by tile in seconds

The slides hold smooth synthetic "tissue" (no patient data): colour gradients with stained
blobs on white glass, so that lossy tiles decode close to what was written.
"""

import json
import sys

import numpy as np


def tissue(width, height, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.full((height, width, 3), 245.0, np.float32)
    for _ in range(12):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.25) * min(width, height)
        colour = np.array([rng.uniform(120, 220), rng.uniform(40, 140), rng.uniform(120, 230)], np.float32)
        w = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)))[..., None]
        img = img * (1 - w) + colour * w
    img[..., 0] += 10 * np.sin(x / 37.0)
    img[..., 2] += 10 * np.cos(y / 23.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def pyramid(base, levels):
    out = [base]
    for _ in range(levels - 1):
        prev = out[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        out.append(prev[: h * 2, : w * 2].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    return out


def rgb_to_ycbcr(img):
    r, g, b = (img[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.round(np.stack([y, cb, cr], -1)), 0, 255).astype(np.uint8)


def tiles_of(img, tile):
    h, w = img.shape[:2]
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            t = np.full((tile, tile, 3), 255, np.uint8)
            part = img[ty : ty + tile, tx : tx + tile]
            t[: part.shape[0], : part.shape[1]] = part
            yield t


APERIO = "Aperio Image Library v12.0.0 \n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) {codec}|AppMag = 20|MPP = 0.5"


def make(out):
    import imagecodecs
    import tifffile

    base = tissue(1000, 760, 7)
    levels = pyramid(base, 3)

    # Generic pyramids: JPEG in YCbCr with chroma subsampling (BigTIFF), JPEG stored as RGB,
    # LZW with the horizontal predictor, Deflate, uncompressed.
    # (tifffile stores RGB data given to JPEG as YCbCr with 4:2:0 chroma, photometric 6.)
    generic = [
        ("jpeg-ycbcr.tiff", dict(compression="jpeg", photometric="rgb", compressionargs={"level": 90}), True),
        ("lzw-predictor.tiff", dict(compression="lzw", predictor=True, photometric="rgb"), False),
        ("deflate.tiff", dict(compression="zlib", photometric="rgb"), True),
        ("raw.tiff", dict(compression=None, photometric="rgb"), False),
    ]
    for name, kw, big in generic:
        with tifffile.TiffWriter(f"{out}/{name}", bigtiff=big) as w:
            for i, lvl in enumerate(levels):
                w.write(lvl, tile=(256, 256), subfiletype=1 if i else 0, resolution=(20000, 20000), resolutionunit="CENTIMETER", **kw)

    # Glass without tissue: white with faint noise.
    glass = np.clip(250 + np.random.default_rng(5).normal(0, 2, (760, 1000, 3)), 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(f"{out}/glass.tiff") as w:
        for i, lvl in enumerate(pyramid(glass, 3)):
            w.write(lvl, tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1 if i else 0, resolution=(20000, 20000), resolutionunit="CENTIMETER")

    # JPEG tiles holding R, G, B components as such (photometric RGB, as Aperio writes them).
    with tifffile.TiffWriter(f"{out}/jpeg-rgb.tiff") as w:
        for i, lvl in enumerate(levels):
            data = (imagecodecs.jpeg8_encode(t, level=90, colorspace="RGB", outcolorspace="RGB") for t in tiles_of(lvl, 256))
            w.write(data, shape=lvl.shape, dtype=np.uint8, tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1 if i else 0, metadata=None)
    # tifffile marks JPEG tiles YCbCr whatever it is told; the tag is set to RGB afterwards.
    with tifffile.TiffFile(f"{out}/jpeg-rgb.tiff", mode="r+b") as t:
        for page in t.pages:
            page.tags["PhotometricInterpretation"].overwrite(2)

    # Aperio SVS with JPEG 2000 tiles: 33003 as Aperio writes it (YCbCr components, no
    # codestream colour transform) and 33005 (RGB, with the transform, as converters write).
    for name, comp in [("aperio-j2k-ycbcr.svs", 33003), ("aperio-j2k-rgb.svs", 33005)]:
        with tifffile.TiffWriter(f"{out}/{name}") as w:
            for i, lvl in enumerate(levels):
                h, wd = lvl.shape[:2]
                if comp == 33003:
                    data = (imagecodecs.jpeg2k_encode(rgb_to_ycbcr(t), level=90, codecformat="j2k", mct=False) for t in tiles_of(lvl, 240))
                else:
                    data = (imagecodecs.jpeg2k_encode(t, level=90, codecformat="j2k", mct=True) for t in tiles_of(lvl, 240))
                desc = APERIO.format(w=wd, h=h, t=240, codec="J2K") if i == 0 else None
                w.write(data, shape=lvl.shape, dtype=np.uint8, tile=(240, 240), compression=comp, photometric="rgb", description=desc, metadata=None)
                if i == 0:
                    thumb = levels[-1][::2, ::2]
                    w.write(thumb, photometric="rgb", compression="jpeg", metadata=None)


def dicom_level(path, img, level, series, study, frame_of_ref, tile, syntax, sparse=False, offsets="bot"):
    """One DICOM VL Whole Slide Microscopy instance holding `img` as a level."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate, encapsulate_extended
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    h, w = img.shape[:2]
    across, down = -(-w // tile), -(-h // tile)
    tiles = list(tiles_of(img, tile))
    positions = [(tx * tile + 1, ty * tile + 1) for ty in range(down) for tx in range(across)]
    if sparse:
        # Glass tiles (almost white) are left out, as scanners do.
        keep = [i for i, t in enumerate(tiles) if t.mean() < 240]
        tiles = [tiles[i] for i in keep]
        positions = [positions[i] for i in keep]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
    ds.Modality = "SM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PatientName, ds.PatientID = "Synthetic^Slide", "SYNTH-1"
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.NumberOfFrames = len(tiles)
    ds.SamplesPerPixel = 3
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 0
    ds.DimensionOrganizationType = "TILED_SPARSE" if sparse else "TILED_FULL"
    ds.InstanceNumber = level + 1
    spacing = 0.0005 * 2**level
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [spacing, spacing]
    pm.SliceThickness = 0.001
    shared.PixelMeasuresSequence = Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    op = Dataset()
    op.OpticalPathIdentifier = "1"
    op.ObjectiveLensPower = 20
    ds.OpticalPathSequence = Sequence([op])
    if sparse:
        per = []
        for col, row in positions:
            item, pos = Dataset(), Dataset()
            pos.ColumnPositionInTotalImagePixelMatrix, pos.RowPositionInTotalImagePixelMatrix = col, row
            pos.XOffsetInSlideCoordinateSystem = pos.YOffsetInSlideCoordinateSystem = 0
            pos.ZOffsetInSlideCoordinateSystem = 0
            item.PlanePositionSlideSequence = Sequence([pos])
            per.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    if syntax == "1.2.840.10008.1.2.1":
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = b"".join(t.tobytes() for t in tiles)
    else:
        if syntax == "1.2.840.10008.1.2.4.50":
            ds.PhotometricInterpretation = "YBR_FULL_422"
            frames = [imagecodecs.jpeg8_encode(t, level=90) for t in tiles]
        else:
            ds.PhotometricInterpretation = "YBR_ICT"
            frames = [imagecodecs.jpeg2k_encode(t, level=90, codecformat="j2k", mct=True) for t in tiles]
        if offsets == "eot":
            ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(frames)
        else:
            ds.PixelData = encapsulate(frames, has_bot=offsets == "bot")
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def make_dicom(out):
    """DICOM pyramids of the synthetic tissue, a folder each: JPEG with a basic offset
    table, JPEG with an extended one, JPEG 2000 without offsets, sparse uncompressed."""
    import os

    from pydicom.uid import generate_uid

    levels = pyramid(tissue(1000, 760, 7), 3)
    kinds = [
        ("dicom-jpeg-bot", "1.2.840.10008.1.2.4.50", False, "bot"),
        ("dicom-jpeg-eot", "1.2.840.10008.1.2.4.50", False, "eot"),
        ("dicom-j2k", "1.2.840.10008.1.2.4.91", False, "none"),
        ("dicom-sparse", "1.2.840.10008.1.2.1", True, "none"),
    ]
    for name, syntax, sparse, offsets in kinds:
        os.makedirs(f"{out}/{name}", exist_ok=True)
        series, study, ref = generate_uid(), generate_uid(), generate_uid()
        for i, lvl in enumerate(levels):
            dicom_level(f"{out}/{name}/level-{i}.dcm", lvl, i, series, study, ref, 256, syntax, sparse, offsets)


def describe(path):
    import openslide

    s = openslide.OpenSlide(path)
    p = s.properties
    print(json.dumps({
        "vendor": p.get("openslide.vendor"),
        "level_dimensions": s.level_dimensions,
        "level_downsamples": s.level_downsamples,
        "mpp": [float(p[k]) if k in p else None for k in ("openslide.mpp-x", "openslide.mpp-y")],
        "objective_power": float(p["openslide.objective-power"]) if "openslide.objective-power" in p else None,
        "tile_sizes": [[int(p[f"openslide.level[{i}].tile-width"]), int(p[f"openslide.level[{i}].tile-height"])] for i in range(s.level_count)],
        "associated": sorted(s.associated_images.keys()),
    }))


def region(path, level, x, y, w, h):
    import openslide

    s = openslide.OpenSlide(path)
    rgba = np.asarray(s.read_region((x, y), level, (w, h)))
    rgb = np.ascontiguousarray(rgba[..., :3])
    # Where the slide has no data (a sparse level's missing tiles), OpenSlide is transparent;
    # readers render it as white glass.
    rgb[rgba[..., 3] == 0] = 255
    sys.stdout.buffer.write(rgb.tobytes())


def tissue_cells(path, level, cell, cols, rows):
    import openslide

    s = openslide.OpenSlide(path)
    w, h = s.level_dimensions[level]
    rgb = np.asarray(s.read_region((0, 0), level, (w, h)))[..., :3].astype(np.float64)
    lum = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    found = []
    for cy in range(rows):
        for cx in range(cols):
            m = lum[cy * cell : (cy + 1) * cell, cx * cell : (cx + 1) * cell].mean()
            if 1 / 255 <= m <= 0.8:
                found.append([cx, cy])
    print(json.dumps(found))


def damage(src, dst, kind):
    """truncate: the file cut after 60 % of its bytes; offset-past-end: one tile of level 0
    placed past the end; garbage-tile: one tile's bytes overwritten with noise (garbage-last:
the same on the least detailed level, a tissue mask's); huge: level 0
    declaring 2^31 - 1 pixels a side; short-table: level 1's tile table cut to one entry."""
    import shutil

    import tifffile

    data = open(src, "rb").read()
    if kind == "truncate":
        open(dst, "wb").write(data[: len(data) * 6 // 10])
        return
    shutil.copyfile(src, dst)
    with tifffile.TiffFile(dst, mode="r+b") as t:
        p = t.pages[0]
        if kind == "offset-past-end":
            offsets = list(p.dataoffsets)
            offsets[1] = len(data) + 4096
            p.tags["TileOffsets"].overwrite(offsets)
        elif kind in ("garbage-tile", "garbage-last"):
            q, k = (p, 1) if kind == "garbage-tile" else (t.pages[-1], 0)
            fh = t.filehandle
            fh.seek(q.dataoffsets[k])
            fh.write(np.random.default_rng(3).integers(0, 256, q.databytecounts[k], dtype=np.uint8).tobytes())
        elif kind == "huge":
            p.tags["ImageWidth"].overwrite(2**31 - 1)
        elif kind == "short-table":
            q = t.pages[1]
            q.tags["TileOffsets"].overwrite([q.dataoffsets[0]])
            q.tags["TileByteCounts"].overwrite([q.databytecounts[0]])
        else:
            sys.exit(f"unknown damage {kind}")


def make_case(out):
    import os

    from pydicom.uid import generate_uid

    study, ref = generate_uid(), generate_uid()
    for name, seed in [("a", 7), ("b", 8)]:
        os.makedirs(f"{out}/{name}", exist_ok=True)
        series = generate_uid()
        for i, lvl in enumerate(pyramid(tissue(1000, 760, seed), 3)):
            dicom_level(f"{out}/{name}/level-{i}.dcm", lvl, i, series, study, ref, 256, "1.2.840.10008.1.2.4.50")


def large(path, mib):
    """An uncompressed pyramid (levels 1, 1/4, 1/16, 1/64) of about `mib` MiB: tiles drawn
    from a few noisy "tissue" and "glass" tiles by where their centre falls (inside or outside
    a central ellipse), so that any size is written in seconds with little memory."""
    import tifffile

    tile = 256
    side = max(4, int((mib * 2**20 / 3) ** 0.5) // tile) * tile
    rng = np.random.default_rng(3)
    tissue_tiles = [np.clip(rng.normal((190, 110, 170), 25, (tile, tile, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    glass_tiles = [np.clip(rng.normal(246, 3, (tile, tile, 3)), 0, 255).astype(np.uint8) for _ in range(2)]

    def tiles(level_side, scale):
        n = -(-level_side // tile)
        ys, xs = np.mgrid[0:tile, 0:tile].astype(np.float32)
        for ty in range(n):
            for tx in range(n):
                # Each pixel's place in the ellipse, in level-0 terms: the same shape on
                # every level.
                cx = ((tx * tile + xs + 0.5) * scale / side - 0.5) * 2
                cy = ((ty * tile + ys + 0.5) * scale / side - 0.5) * 2
                inside = ((cx / 0.7) ** 2 + (cy / 0.5) ** 2 <= 1)[..., None]
                k = tx * 7 + ty * 13
                yield np.where(inside, tissue_tiles[k % 4], glass_tiles[k % 2])

    with tifffile.TiffWriter(path, bigtiff=True) as w:
        for i, scale in enumerate([1, 4, 16, 64]):
            level_side = side // scale
            w.write(tiles(level_side, scale), shape=(level_side, level_side, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression=None, subfiletype=1 if i else 0, resolution=(40000, 40000), resolutionunit="CENTIMETER", metadata=None)
    print(json.dumps({"width": side, "height": side}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "make":
        make(args[0])
        make_dicom(args[0])
    elif cmd == "describe":
        describe(args[0])
    elif cmd == "region":
        region(args[0], *map(int, args[1:]))
    elif cmd == "damage":
        damage(*args)
    elif cmd == "tissue":
        tissue_cells(args[0], *map(int, args[1:]))
    elif cmd == "make-case":
        make_case(args[0])
    elif cmd == "large":
        large(args[0], int(args[1]))
    else:
        sys.exit(f"unknown command {cmd}")
