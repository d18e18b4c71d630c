#!/usr/bin/env python3
"""Makes the small synthetic DICOM example sets of the imaging pipelines (no patient data:
geometric phantoms with made-up identifiers).

    python3 -m pip install pydicom==3.0.2 numpy          # numpy 2.4.6 was used
    python3 examples/imaging/make_examples.py            # from the repository root

Writes, deterministically:
  cxr/   chest radiograph studies for cxr-report and cxr-longitudinal:
         PAT-A  prior 2025-01-10 (CR, MONOCHROME1, VOI window in the header, RLE lossless)
                current 2025-06-02 (CR, MONOCHROME2, window, explicit VR little endian)
         PAT-B  one DX study 2025-03-15 (no window: min-max), stored without a file extension
         broken/truncated.dcm  (a valid file cut short)  broken/not-dicom.dcm  (text)
  ct/    one abdominal CT phantom series (CT, 24 slices of 64x64, rescale slope 1 / intercept
         -1024, instance numbers not in file-name order)
"""

import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

ROOT = Path(__file__).resolve().parent
ORG = "1.2.826.0.1.3680043.10.1234."  # example-only UID root


def uid(name):
    # Deterministic UIDs from names (generate_uid with entropy sources).
    return generate_uid(prefix=ORG, entropy_srcs=[name])


def base(path, sop_class, modality, patient, study, series, instance, date):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid(f"{study}/{series}/{instance}")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = ORG + "1"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient
    ds.PatientName = "EXAMPLE^" + patient
    ds.StudyInstanceUID = uid(study)
    ds.SeriesInstanceUID = uid(f"{study}/{series}")
    ds.StudyDate = date
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def chest(h, w, seed, effusion):
    """A chest-like phantom: bright mediastinum and ribs, dark lungs, optional left effusion."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 2600.0)
    for cx in (0.3, 0.7):  # lungs
        img[((x / w - cx) / 0.17) ** 2 + ((y / h - 0.5) / 0.33) ** 2 < 1] = 700
    img[np.abs(x / w - 0.5) < 0.08] = 2200  # mediastinum
    img[((x / w - 0.53) / 0.12) ** 2 + ((y / h - 0.62) / 0.12) ** 2 < 1] = 2400  # heart
    for k in range(8):  # ribs
        img[np.abs(y / h - (0.22 + 0.075 * k) - 0.05 * np.sin(x / w * 6)) < 0.008] += 500
    if effusion:
        img[(((x / w - 0.7) / 0.17) ** 2 + ((y / h - 0.5) / 0.33) ** 2 < 1) & (y / h > 0.7)] = 1900
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


def radiograph(path, modality, patient, study, date, pixels, mono1=False, window=None, rle=False):
    sop = "1.2.840.10008.5.1.4.1.1.1" if modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1"
    ds = base(path, sop, modality, patient, study, "s1", 1, date)
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    data = 4095 - pixels if mono1 else pixels
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = data.astype("<u2").tobytes()
    if rle:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def ct_series(folder):
    n, size = 24, 64
    y, x = np.mgrid[0:size, 0:size]
    order = [(7 * k) % n for k in range(n)]  # file names not in instance order
    for k in range(n):
        z = k / (n - 1)
        hu = np.full((size, size), -1000.0)
        body = ((x - 32) / 28) ** 2 + ((y - 32) / 20) ** 2 < 1
        hu[body] = 40
        hu[body & (((x - 32) / 28) ** 2 + ((y - 32) / 20) ** 2 > 0.85)] = -100  # fat rim
        liver = ((x - 22) / 10) ** 2 + ((y - 30) / 9) ** 2 < 1
        hu[liver] = 60
        if 0.3 < z < 0.7:
            hu[((x - 20) / 3) ** 2 + ((y - 29) / 3) ** 2 < 1] = 5  # cyst
        hu[((x - 32) / 4) ** 2 + ((y - 44) / 4) ** 2 < 1] = 700  # vertebra
        stored = np.round(hu + 1024).astype(np.uint16)
        inst = k + 1
        ds = base(folder / f"slice-{order[k]:02d}.dcm", "1.2.840.10008.5.1.4.1.1.2", "CT", "PAT-C",
                  "ct-study", "ct-series", inst, "20250820")
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImagePositionPatient = [0, 0, float(k * 5)]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 5
        ds.PixelData = stored.astype("<u2").tobytes()
        ds.save_as(folder / f"slice-{order[k]:02d}.dcm", enforce_file_format=True)


def main():
    cxr, ct = ROOT / "cxr", ROOT / "ct"
    for d in (cxr, cxr / "broken", ct):
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            if f.is_file():
                f.unlink()
    radiograph(cxr / "pat-a-2025-01-10.dcm", "CR", "PAT-A", "a-prior", "20250110", chest(320, 256, 1, False),
               mono1=True, window=(2048, 3000), rle=True)
    radiograph(cxr / "pat-a-2025-06-02.dcm", "CR", "PAT-A", "a-current", "20250602", chest(320, 256, 2, True),
               window=(1900, 3200))
    radiograph(cxr / "PAT-B-DX-0001", "DX", "PAT-B", "b-only", "20250315", chest(288, 240, 3, False))
    whole = (cxr / "pat-a-2025-06-02.dcm").read_bytes()
    (cxr / "broken" / "truncated.dcm").write_bytes(whole[: len(whole) // 3])
    (cxr / "broken" / "not-dicom.dcm").write_text("This is a text file with a .dcm extension.\n")
    ct_series(ct)
    for f in sorted(ROOT.rglob("*")):
        if f.is_file() and f.suffix != ".py" and f.name != "README.md":
            print(f.relative_to(ROOT), f.stat().st_size)


if __name__ == "__main__":
    main()
