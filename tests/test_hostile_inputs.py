"""Hostile and broken inputs: each is read correctly or refused with one line naming the file.

The loader (``load_image``) and the labels reader (``read_labels``) are tested case by case; then a folder
holding every bad file at once goes through ``infer.py``, which must write all the good rows, print one
``error: FILE: REASON`` line per bad file and a summary, exit with 1, and show no traceback (unless
``--debug``).
"""
from __future__ import annotations

import os
import re
import resource
import struct
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, features

import infer
from core import images as images_module
from core.images import MAX_PIXELS, ImageLoadError, load_image
from core.labels import LabelsError, read_labels
from experts import create_expert, save_ensemble

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    return save_ensemble({"eff": create_expert("test_efficientnet")}, tmp_path_factory.mktemp("w") / "weights")


def png_bytes(width: int, height: int, bit_depth: int = 8, color_type: int = 2, raw: bytes | None = None) -> bytes:
    """A PNG written by hand: any declared size (a bomb's header costs nothing), optionally real pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw if raw is not None else b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def truncated(image: Image.Image, fmt: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        image.save(path, fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    return make


def isobmff_header(brand: bytes) -> Callable[[Path], None]:
    """The opening box of a HEIC or AVIF file (what an iPhone photo starts with), and no image after it."""
    return lambda path: path.write_bytes(struct.pack(">I", 24) + b"ftyp" + brand + b"\0" * 4 + b"mif1" + brand
                                         + b"\0" * 64)


# ---------------------------------------------------------------------------------------------- refusals
BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "the file is empty"),
    "cut.jpg": (truncated(noise(), "JPEG"), "truncated"),
    "cut.png": (truncated(noise(), "PNG"), "truncated"),
    "text.png": (lambda p: p.write_text("name,score\nnot,an image\n"), "not an image file"),
    "folder.jpg": (lambda p: p.mkdir(), "not a regular file"),
    "fifo.jpg": (lambda p: os.mkfifo(p), "not a regular file"),  # opening it would block forever
    "bomb.png": (lambda p: p.write_bytes(png_bytes(50_000, 50_000)), "image too large .*decompression bomb"),
    "bomb2.png": (lambda p: p.write_bytes(png_bytes(13_000, 13_000)), r"too large \(13000x13000 = 169,000,000"),
}
if not features.check("avif"):
    BAD_FILES["photo.avif"] = (isobmff_header(b"avif"), "built without AVIF support")
try:
    import pillow_heif  # noqa: F401
except ImportError:
    BAD_FILES["photo.heic"] = (isobmff_header(b"heic"), "HEIC/HEIF images need the pillow-heif package")


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_refused_naming_it(tmp_path, name):
    make, reason = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(60_000, 60_000))  # 10.8 GB of RGB pixels, declared in a 1 kB file
    assert 60_000 ** 2 > MAX_PIXELS
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="refused as a possible decompression bomb"):
        load_image(path)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # KiB: nothing decoded


def test_unreadable_file_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root, which reads files whatever their permissions")
    path = tmp_path / "secret.jpg"
    noise().save(path)
    path.chmod(0)
    with pytest.raises(ImageLoadError, match="secret.jpg: permission denied"):
        load_image(path)


def test_permission_error_while_opening_is_reported_as_such(tmp_path, monkeypatch):
    """The same path as above, reached as root too: the OS refusing the open."""
    path = tmp_path / "secret.jpg"
    noise().save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images_module.Image, "open", refuse)
    with pytest.raises(ImageLoadError, match="secret.jpg: permission denied"):
        load_image(path)


# ------------------------------------------------------------------------------------ read, as RGB uint8
def test_one_pixel_and_very_large_images_are_read_and_scored(tiny_weights, tmp_path, capsys):
    Image.new("RGB", (1, 1), RED).save(tmp_path / "dot.png")
    assert load_image(tmp_path / "dot.png").tolist() == [[list(RED)]]
    Image.new("RGB", (8000, 6000), (10, 20, 30)).save(tmp_path / "big.jpg", quality=50)  # 48 MP, under the limit
    big = load_image(tmp_path / "big.jpg")
    assert big.shape == (6000, 8000, 3) and abs(int(big[3000, 4000, 0]) - 10) <= 2
    del big
    images = [str(tmp_path / "dot.png"), str(tmp_path / "big.jpg")]
    assert infer.main(images + ["--weights", str(tiny_weights), "--quiet"]) == 0
    assert [line.split("\t")[2] for line in capsys.readouterr().out.splitlines()] == images


def test_extreme_aspect_ratios_are_scored_without_blowing_up(tiny_weights, tmp_path, capsys):
    """A 1x60000 strip is 60 kP, under any pixel limit; resized by its short side it would be 9 GB."""
    images = []
    for name, size in (("wide.png", (60_000, 1)), ("tall.png", (1, 60_000))):
        Image.new("RGB", size, RED).save(tmp_path / name)
        images.append(str(tmp_path / name))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert infer.main(images + ["--weights", str(tiny_weights), "--quiet"]) == 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300 * 1024  # KiB
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("mode, fmt, value, expected", [
    ("L", "PNG", 128, (128, 128, 128)),
    ("1", "PNG", 1, (255, 255, 255)),
    ("P", "PNG", None, RED),
    ("RGBA", "PNG", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: composited on white
    ("RGBA", "WEBP", (255, 0, 0, 255), RED),
    ("LA", "PNG", (0, 255), (0, 0, 0)),
    ("CMYK", "JPEG", (0, 255, 255, 0), RED),
    ("CMYK", "TIFF", (0, 255, 255, 0), RED),
    ("I;16", "PNG", 65535, (255, 255, 255)),
    ("I", "TIFF", 1000, (3, 3, 3)),  # 1000 / 257
    ("F", "TIFF", 7.0, (7, 7, 7)),
    ("YCbCr", "JPEG", (76, 85, 255), RED),
])
def test_every_mode_is_read_as_rgb(tmp_path, mode, fmt, value, expected):
    path = tmp_path / f"image.{fmt.lower()}"
    if mode == "P":
        image = Image.new("RGB", (12, 8), RED).convert("P")
    else:
        image = Image.new(mode, (12, 8), value)
    image.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    got = load_image(path)
    assert got.shape == (8, 12, 3) and got.dtype == np.uint8
    assert np.abs(got[4, 6].astype(int) - expected).max() <= 3, got[4, 6]


def test_palette_with_transparency_and_16_bit_rgb(tmp_path):
    image = Image.new("P", (6, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.save(tmp_path / "clear.png", transparency=1)
    assert load_image(tmp_path / "clear.png")[0, 0].tolist() == [255, 255, 255]
    pixels = np.zeros((4, 6, 3), ">u2")
    pixels[..., 0] = 65535  # red at full 16-bit scale
    raw = b"".join(b"\0" + row.tobytes() for row in pixels)
    (tmp_path / "deep.png").write_bytes(png_bytes(6, 4, bit_depth=16, color_type=2, raw=raw))
    assert load_image(tmp_path / "deep.png")[0, 0].tolist() == list(RED)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_its_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as img:
        assert getattr(img, "n_frames", 1) == 2
    assert load_image(path)[8, 8].tolist() == list(RED)


def test_exif_orientation_6_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    image.save(path, quality=95, exif=exif)
    got = load_image(path).astype(int)
    assert got.shape == (40, 20, 3)  # portrait now
    assert np.abs(got[5, 10] - RED).max() < 40 and np.abs(got[35, 10] - BLUE).max() < 40  # left went to the top


def test_avif_is_read_when_pillow_can(tmp_path):
    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support (the refusal is tested in test_bad_file_is_refused_naming_it)")
    path = tmp_path / "photo.avif"
    Image.new("RGB", (16, 16), RED).save(path, quality=90)
    assert np.abs(load_image(path)[8, 8].astype(int) - RED).max() < 16


def test_spaces_and_non_ascii_names(tmp_path):
    folder = tmp_path / "my photos ü"
    folder.mkdir()
    path = folder / "été 写真 #1.png"
    Image.new("RGB", (4, 4), RED).save(path)
    assert load_image(path)[0, 0].tolist() == list(RED)
    assert load_image(str(path)).shape == (4, 4, 3)


# ------------------------------------------------------------------------------------------ labels CSVs
@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"img_name,target\n", "has a header but no rows"),
    (b"name,target\na.jpg,0\n", r"missing column\(s\) \['img_name'\]"),
    (b"img_name,target\na.jpg,0\nb.jpg,1\na.jpg,0\n", "row 4: img_name 'a.jpg' is listed twice"),
    (b"img_name,target\n\xff\xfe\x00a.jpg,0\n", "not a readable CSV"),
    (b'img_name,target\n"a.jpg,0\n', "not a readable CSV"),
])
def test_bad_labels_csv_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "list.csv"
    path.write_bytes(content)
    with pytest.raises(LabelsError, match=message) as info:
        read_labels(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [
    "img_name,target\r\na.jpg,0\r\nb c.jpg,1\r\n",  # CRLF
    "\ufeffimg_name,target\na.jpg,0\nb c.jpg,1\n",  # a byte-order mark, as spreadsheets write
    " img_name , target\na.jpg,0\nb c.jpg,1\n",
])
def test_labels_csv_variants_are_read(tmp_path, content):
    path = tmp_path / "list.csv"
    path.write_bytes(content.encode("utf-8"))
    df = read_labels(path)
    assert list(df["img_name"]) == ["a.jpg", "b c.jpg"] and list(df["target"]) == [0, 1]


# ---------------------------------------------------------------------------------- through infer.py
@pytest.fixture
def mixed_folder(tmp_path):
    """Four good images (one with a non-ASCII name, one 1x1, one CMYK) and every bad file at once."""
    folder = tmp_path / "in put"
    folder.mkdir()
    noise(seed=1).save(folder / "a good.jpg")
    Image.new("RGB", (1, 1), RED).save(folder / "b_dot.png")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "c_cmyk.jpg")
    noise(seed=2).save(folder / "d_日本.webp")
    for name, (make, _) in BAD_FILES.items():
        if name != "folder.jpg":  # a folder inside a folder is searched, not scored
            make(folder / name)
    return folder


def test_batch_goes_on_past_every_bad_file(tiny_weights, mixed_folder, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    code = infer.main([str(mixed_folder), "--weights", str(tiny_weights), "--submission", str(out), "--quiet",
                       "--batch-size", "3"])
    err = capsys.readouterr().err
    assert code == 1
    bad = [n for n in BAD_FILES if n != "folder.jpg"]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert sorted(line.split(": ")[1] for line in errors) == sorted(str(mixed_folder / n) for n in bad)
    assert f"{len(bad)} of {len(bad) + 4} images could not be scored" in err
    assert "Traceback" not in err
    # every input gets a row (a submission with missing rows is rejected): the unreadable ones hold --fill
    df = pd.read_csv(out).set_index("img_name")
    good = ["a good.jpg", "b_dot.png", "c_cmyk.jpg", "d_日本.webp"]
    assert sorted(df.index) == sorted(good + bad)
    assert (df.loc[bad, "y_pred"] == 0.5).all()
    assert df.loc[good, "y_pred"].between(0, 1).all()
    assert "rows hold --fill 0.5" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in put", "sub.csv"]  # no partial or temp file left


def test_fill_none_leaves_unreadable_images_out_and_fill_takes_a_value(tiny_weights, mixed_folder, tmp_path, capsys):
    good = ["a good.jpg", "b_dot.png", "c_cmyk.jpg", "d_日本.webp"]
    out = tmp_path / "none.csv"
    code = infer.main([str(mixed_folder), "--weights", str(tiny_weights), "--submission", str(out), "--quiet",
                       "--fill", "none"])
    assert code == 1 and sorted(pd.read_csv(out)["img_name"]) == sorted(good)
    out = tmp_path / "zero.csv"
    assert infer.main([str(mixed_folder), "--weights", str(tiny_weights), "--submission", str(out), "--quiet",
                       "--fill", "0"]) == 1
    df = pd.read_csv(out).set_index("img_name")
    assert (df.drop(index=good)["y_pred"] == 0).all() and len(df) > len(good)
    capsys.readouterr()
    assert infer.main([str(mixed_folder), "--weights", str(tiny_weights), "--submission", str(tmp_path / "x.csv"),
                       "--fill", "1.5"]) == 2
    assert "--fill must be a probability" in capsys.readouterr().err


def test_debug_shows_the_traceback_of_a_bad_file(tiny_weights, mixed_folder, capsys):
    code = infer.main([str(mixed_folder / "cut.png"), str(mixed_folder / "a good.jpg"), "--weights",
                       str(tiny_weights), "--quiet", "--debug"])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" in captured.err and "cut.png: cannot decode image" in captured.err
    assert captured.out.strip().endswith("a good.jpg")


@pytest.mark.parametrize("content, message", [
    ("", "list.csv: file is empty"),
    ("name\na.jpg\n", r"list.csv: missing column\(s\) \['img_name'\]"),
    ("img_name\na.jpg\na.jpg\n", "list.csv: row 3: img_name 'a.jpg' is listed twice"),
])
def test_bad_csv_list_is_one_error_line(tiny_weights, tmp_path, capsys, content, message):
    (tmp_path / "list.csv").write_text(content)
    assert infer.main([str(tmp_path / "list.csv"), "--weights", str(tiny_weights), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_csv_list_with_crlf_non_ascii_and_missing_rows(tiny_weights, tmp_path, capsys):
    noise().save(tmp_path / "ünï cödé.jpg")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "list.csv").write_bytes("img_name\r\nünï cödé.jpg\r\ngone.jpg\r\ndir.jpg\r\n".encode())
    out = tmp_path / "sub.csv"
    assert infer.main([str(tmp_path / "list.csv"), "--weights", str(tiny_weights), "--submission", str(out),
                       "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "gone.jpg: file not found" in err and "dir.jpg: not a regular file" in err
    assert "2 of 3 images could not be scored" in err
    df = pd.read_csv(out)
    assert df["img_name"].tolist() == ["ünï cödé.jpg", "gone.jpg", "dir.jpg"]  # input order, unreadable filled
    assert df["y_pred"].tolist()[1:] == [0.5, 0.5]


def test_folder_named_like_an_image(tiny_weights, tmp_path, capsys):
    (tmp_path / "x.jpg").mkdir()
    assert infer.main([str(tmp_path / "x.jpg") + "/", "--weights", str(tiny_weights)]) == 2
    assert "x.jpg/: folder holds no image files" in capsys.readouterr().err
    noise().save(tmp_path / "x.jpg" / "inside.png")
    assert infer.main([str(tmp_path / "*.jpg"), "--weights", str(tiny_weights)]) == 2  # a glob skips folders
    assert "pattern matches no image files" in capsys.readouterr().err


def test_duplicate_names_cannot_make_a_submission(tiny_weights, tmp_path, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        noise().save(tmp_path / sub / "same.jpg")
    args = [str(tmp_path / "a"), str(tmp_path / "b"), "--weights", str(tiny_weights), "--quiet"]
    assert infer.main(args + ["--submission", str(tmp_path / "sub.csv")]) == 2
    assert "same.jpg: listed twice in the input" in capsys.readouterr().err
    assert infer.main(args) == 0  # printing needs no unique names


def test_file_names_that_are_not_utf8(tiny_weights, tmp_path, capsys):
    """Linux names are bytes; one that is not UTF-8 is scored and written back as the same bytes."""
    folder = tmp_path / "in"
    folder.mkdir()
    try:
        noise().save(folder / os.fsdecode(b"bad\xff name.jpg"))
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    noise().save(folder / "ok.jpg")
    out = tmp_path / "sub.csv"
    assert infer.main([str(folder), "--weights", str(tiny_weights), "--submission", str(out), "--quiet"]) == 0
    assert out.read_bytes().splitlines()[1].startswith(b"bad\xff name.jpg,")
