#!/usr/bin/env python3
"""Writes a full-size synthetic CT series for `medbatch bench --dicom`: N slices of 512x512,
16-bit, rescale intercept -1024, uncompressed (explicit VR little endian) or RLE lossless.

    python3 -m pip install pydicom==3.0.2 numpy
    python3 bench/make_ct_series.py /tmp/ct-512 --slices 120 [--rle]
    medbatch bench --dicom /tmp/ct-512 --runs 3
"""
import argparse
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--slices", type=int, default=120)
p.add_argument("--size", type=int, default=512)
p.add_argument("--rle", action="store_true")
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
study, series = generate_uid(entropy_srcs=["bench-study"]), generate_uid(entropy_srcs=["bench-series"])
n = a.size
y, x = np.mgrid[0:n, 0:n]
rng = np.random.default_rng(0)
for k in range(a.slices):
    hu = np.full((n, n), -1000.0)
    body = ((x - n / 2) / (0.44 * n)) ** 2 + ((y - n / 2) / (0.32 * n)) ** 2 < 1
    hu[body] = 40 + rng.normal(0, 12, body.sum())
    hu[((x - 0.35 * n) / (0.15 * n)) ** 2 + ((y - 0.47 * n) / (0.13 * n)) ** 2 < 1] = 60
    hu[((x - n / 2) / (0.06 * n)) ** 2 + ((y - 0.7 * n) / (0.06 * n)) ** 2 < 1] = 700
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"bench-{k}"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = out / f"ct-{k:04d}.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "BENCH", study, series
    ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [0, 0, float(k)]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", n, n
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.clip(np.round(hu + 1024), 0, 4095).astype("<u2").tobytes()
    if a.rle:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
print(f"{a.slices} slices of {n}x{n} in {out}")
