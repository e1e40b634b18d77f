"""Write ``mlfabric/learn/data/digits.bin.gz`` from scikit-learn's handwritten digits (run once).

The digits task ships its data inside the package so a node needs no download and no scikit-learn at
run time. This script is how that file was made; it is reproducible byte for byte (gzip mtime 0).

Format (before gzip), all integers little-endian:
    magic   8 bytes  b"MLFDIG01"
    count   u32      number of images N
    rows    u8       8
    cols    u8       8
    pixels  N*rows*cols uint8, row-major, values 0..16
    labels  N uint8, values 0..9

Usage: ``python benchmarks/make_digits_data.py`` (needs scikit-learn in the environment).
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

MAGIC = b"MLFDIG01"
OUT = Path(__file__).resolve().parents[1] / "mlfabric" / "learn" / "data" / "digits.bin.gz"


def main() -> None:
    bunch = load_digits()
    images = np.asarray(bunch.images)
    labels = np.asarray(bunch.target)
    n, rows, cols = images.shape
    if images.min() < 0 or images.max() > 16 or not np.all(images == np.round(images)):
        raise SystemExit("unexpected pixel values")
    if labels.min() < 0 or labels.max() > 9:
        raise SystemExit("unexpected labels")
    raw = (
        MAGIC
        + struct.pack("<IBB", n, rows, cols)
        + images.astype("<u1").tobytes(order="C")
        + labels.astype("<u1").tobytes()
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    print(f"{OUT}: {n} images {rows}x{cols}, {OUT.stat().st_size} bytes, sha256 {hashlib.sha256(raw).hexdigest()}")


if __name__ == "__main__":
    main()
