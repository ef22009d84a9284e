"""Crop the largest face of every image of a set: the input the face detectors were trained on.

    python data_prep/faces.py ../shared/data/gan_faces/labels.csv --out runs/gan_crops --size 512
    python data_prep/faces.py photos/ --out runs/photo_crops --margin 0.3 --size 512

Writes each crop under its input name (atomically; a second run keeps the crops it finds, so a killed run
resumes) and ``OUT/labels.csv`` with every input column plus ``origin``, ``face_found`` and ``crop_box``.
Images without a face get the centre square, are counted, and are named on stderr. The detector and the
crop itself are :mod:`core.faces`, the very code ``infer.py --crop-faces`` scores with.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image

from core.faces import DEFAULT_CONF, DEFAULT_MARGIN, DEFAULT_SIZE, crop_face
from core.files import atomic_output
from core.images import ImageLoadError, load_image
from core.progress import progress_bar, write_line


def crop_name(img_name: str, ext: str) -> str:
    """The output name: the input's relative name with the new extension (``images/a.jpg`` -> ``images/a.png``)."""
    return Path(img_name).with_suffix(ext).as_posix()


def crop_images(source: str | Path, out_dir: str | Path, size: int = DEFAULT_SIZE, margin: float = DEFAULT_MARGIN,
                conf: float = DEFAULT_CONF, ext: str = ".png", progress: bool = True) -> tuple[Path, int, int, int]:
    """Crop every image of a CSV or folder into ``out_dir`` and write ``out_dir/labels.csv``.

    The labels keep every input column (target, group, source...) and add ``origin`` (the input name),
    ``face_found`` and ``crop_box``. Crops that already exist are kept (re-running resumes); each is
    written atomically. Returns ``(labels_path, n_written, n_without_face, n_failed)``.

    Raises:
        core.labels.LabelsError: ``source`` cannot be read as a list of images, or two of its images would be
            written under one name.
    """
    import pandas as pd  # here, not at the top: the command's --help stays instant

    from core.image_lists import read_image_list
    from core.labels import LabelsError

    df = read_image_list(source)
    out_dir = Path(out_dir)
    names = [crop_name(n, ext) for n in df["img_name"]]
    clash = pd.Series(names).duplicated()
    if clash.any():
        raise LabelsError(f"{source}: two images map to the output name {names[int(clash.idxmax())]!r}")
    rows, no_face, failed = [], 0, 0
    for name, (_, row) in progress_bar(zip(names, df.iterrows()), total=len(df), desc="crop faces", enabled=progress):
        out = out_dir / name
        found, box = _crop_one(row["path"], out, size, margin, conf)
        if found is None:
            failed += 1
            continue
        no_face += not found
        if not found:
            write_line(f"note: {row['img_name']}: no face found; the centre square was cropped")
        rows.append({**{k: v for k, v in row.items() if k != "path"}, "img_name": name,
                     "origin": row["img_name"], "face_found": int(found), "crop_box": box})
    labels = out_dir / "labels.csv"
    with atomic_output(labels) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return labels, len(rows), no_face, failed


def _crop_one(src: str, out: Path, size: int, margin: float, conf: float) -> tuple[bool | None, str]:
    """Crop one file, or re-detect only (no write) when its crop exists; ``found=None`` if unreadable."""
    try:
        image = load_image(src)
    except ImageLoadError as e:
        write_line(f"error: {e}")
        return None, ""
    crop, found, box = crop_face(image, size, margin, conf, warn=False)
    if not out.exists():
        with atomic_output(out) as tmp:
            Image.fromarray(crop).save(tmp, **({"quality": 95} if out.suffix == ".jpg" else {}))
    return found, " ".join(map(str, box))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a labels CSV (img_name relative to it) or a folder of images")
    p.add_argument("--out", required=True, help="output folder: crops under their input names, plus labels.csv")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="output side in pixels (default: %(default)s)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="added on every side, as a fraction of the face's longer side (default: %(default)s)")
    p.add_argument("--conf", type=float, default=DEFAULT_CONF, help="detector score threshold (default: %(default)s)")
    p.add_argument("--format", choices=["png", "jpg"], default="png",
                   help="png adds no compression of its own; jpg is smaller (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    args = p.parse_args(argv)
    from core.labels import LabelsError
    try:
        labels, n, no_face, failed = crop_images(args.source, args.out, args.size, args.margin, args.conf,
                                                 ext=f".{args.format}", progress=not args.quiet)
    except (LabelsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} crops ({no_face} without a face: centre square used); labels written to {labels}", file=sys.stderr)
    if failed:
        print(f"{failed} images could not be read (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
