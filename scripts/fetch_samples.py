#!/usr/bin/env python3
"""Copy foolbox's 20 labelled ImageNet validation photos into testdata/imagenet/.

foolbox 3.3.4 (MIT) ships them as foolbox/data/imagenet_<NN>_<CLASS>.jpg, where CLASS
is the ImageNet-1k class index. foolbox is only located, never imported: it is installed
without its dependencies and importing it would fail.

Writes <out>/imagenet_*.jpg and <out>/labels.csv (header `file,class_id`). Idempotent:
files that are already identical are left alone.

Usage: .venv/bin/python scripts/fetch_samples.py [--out testdata/imagenet]
"""

import argparse
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTO_NAME = re.compile(r"imagenet_\d+_(\d+)\.jpg")
EXPECTED_PHOTOS = 20


def foolbox_data_dir():
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("foolbox is not installed; run `make setup` (it installs requirements.txt into .venv)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def write_if_changed(path, data):
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "testdata" / "imagenet")
    args = parser.parse_args()

    photos = sorted((p, int(m.group(1))) for p in foolbox_data_dir().iterdir()
                    if (m := PHOTO_NAME.fullmatch(p.name)))
    if len(photos) != EXPECTED_PHOTOS:
        sys.exit(f"found {len(photos)} ImageNet photos in foolbox/data, expected {EXPECTED_PHOTOS}")

    args.out.mkdir(parents=True, exist_ok=True)
    rows = ["file,class_id"]
    for path, class_id in photos:
        write_if_changed(args.out / path.name, path.read_bytes())
        rows.append(f"{path.name},{class_id}")
    write_if_changed(args.out / "labels.csv", ("\n".join(rows) + "\n").encode())
    print(f"{len(photos)} photos and labels.csv in {args.out}")


if __name__ == "__main__":
    main()
