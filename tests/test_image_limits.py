"""What a file's structure says (where a JPEG or PNG ends) and what an image's geometry may cost.

A JPEG is truncated only when its data ends before the end-of-image marker: what follows the
marker (the video of a phone's motion photo) is ignored, as decoders ignore it. An image of any
aspect ratio is resized in memory bounded by the crop, with torchvision's geometry.
"""

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import ExifTags, Image

import extract_features
from pipeline import data as D
from pipeline import imagefile as F
from pipeline import readers as R
from pipeline.models import Preprocess, split_backbone

from .conftest import SIZE, extract_args, jpeg_bytes

ROOT = Path(__file__).resolve().parent.parent
PRE = Preprocess(int(SIZE["resize"]), int(SIZE["crop"]))
DEFAULT = Preprocess(256, 224)


def _mp4_like(n: int = 300_000) -> bytes:
    """What a motion photo appends after the image: an MP4 (an ftyp box, then media bytes)."""
    media = np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes()
    return struct.pack(">I", 24) + b"ftypmp42" + b"\0\0\0\0mp42isom" + media


def _with_exif_thumbnail(image: bytes, thumbnail: bytes) -> tuple[bytes, int]:
    """`image` with an APP1 Exif segment holding `thumbnail` (a whole JPEG, FF D9 included), as
    cameras write it; and the offset just past the thumbnail in the result."""
    ifd1 = struct.pack(">H", 3) + b"".join(
        struct.pack(">HHII", tag, kind, 1, value) for tag, kind, value in (
            (0x0103, 3, 6 << 16),  # Compression: JPEG (a SHORT, left-aligned)
            (0x0201, 4, 56),  # JPEGInterchangeFormat: where the thumbnail starts
            (0x0202, 4, len(thumbnail)),  # JPEGInterchangeFormatLength
        )) + struct.pack(">I", 0)
    tiff = b"MM\0*" + struct.pack(">I", 8) + struct.pack(">HI", 0, 14) + ifd1 + thumbnail
    payload = b"Exif\0\0" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload
    return image[:2] + app1 + image[2:], 2 + 4 + 6 + len(tiff)


def _photo(photos, h=120, w=160) -> np.ndarray:
    return photos[0][100:100 + h, 200:200 + w]


def _store(out: Path, split: str = "train") -> dict[str, tuple[bool, str, np.ndarray]]:
    """file -> (ok, reason, features) of a finished store."""
    g = zarr.open_group(str(out), mode="r")[split]
    assert g["chunk_done"][:].all()
    return {f: (bool(ok), str(why), feat) for f, ok, why, feat in
            zip(g["files"][:], g["ok"][:], g["reasons"][:], g["features"][:], strict=True)}


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _reference(model, img: Image.Image) -> np.ndarray:
    """torchvision's whole Resize + CenterCrop (`data.pil_transform`), then the backbone."""
    backbone, _, _ = split_backbone(model)
    with torch.no_grad():
        return backbone.eval()(D.pil_transform(img, PRE)[None]).numpy()[0]


# ---------------------------------------------------------------------------------------------
# Where a JPEG or PNG ends


def test_a_jpeg_is_truncated_only_when_its_data_ends_before_the_end_marker(photos):
    plain = jpeg_bytes(_photo(photos), quality=90)
    assert F.sniff_extent(plain) == ("jpeg", None, len(plain))
    # a motion photo: the video after the end marker is ignored, and cut off for the decoder
    motion = plain + _mp4_like()
    assert F.sniff_extent(motion) == ("jpeg", None, len(plain))
    scan = plain.index(b"\xff\xda")
    for cut in (len(plain) - 1, len(plain) - 2, (scan + len(plain)) // 2, scan + 20, scan, 400,
                3):
        fmt, problem = F.sniff(plain[:cut])
        assert fmt == "jpeg" and problem.startswith("truncated JPEG"), cut
    # a scan cut short and followed by other data: no end marker where the scan stops
    fmt, problem = F.sniff(plain[:(scan + len(plain)) // 2] + b"\0" * 4096)
    assert problem.startswith("truncated JPEG")


def test_an_exif_thumbnail_does_not_end_the_jpeg_that_holds_it(photos):
    thumbnail = jpeg_bytes(_photo(photos, 30, 40), quality=80)
    data, after_thumbnail = _with_exif_thumbnail(jpeg_bytes(_photo(photos), quality=90),
                                                 thumbnail)
    assert data[after_thumbnail - 2:after_thumbnail] == b"\xff\xd9"
    assert F.sniff(data) == ("jpeg", None)
    with Image.open(io.BytesIO(data)) as img:  # a well-formed Exif block, as PIL reads it
        assert img.getexif().get_ifd(ExifTags.IFD.IFD1)[0x0202] == len(thumbnail)
    scan = data.index(b"\xff\xda", after_thumbnail)
    # the thumbnail's own end marker is at (or near) the end of each of these: still truncated
    for cut in (after_thumbnail, after_thumbnail + 40, scan + 300):
        fmt, problem = F.sniff(data[:cut])
        assert problem is not None and problem.startswith("truncated JPEG"), cut


def test_a_progressive_jpeg_ends_after_its_last_scan(photos):
    data = jpeg_bytes(_photo(photos), quality=90, progressive=True)
    scans = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    assert len(scans) > 2  # several scans, with tables between them
    assert F.sniff_extent(data) == ("jpeg", None, len(data))
    assert F.sniff_extent(data + _mp4_like())[2] == len(data)
    for cut in (scans[1], scans[-1] + 100, len(data) - 2):
        assert F.sniff(data[:cut])[1].startswith("truncated JPEG"), cut


def test_restart_markers_and_stuffed_bytes_do_not_end_the_scan(photos):
    data = jpeg_bytes(_photo(photos), quality=95, restart_marker_blocks=2)
    assert data.count(b"\xff\xd0") and data.count(b"\xff\x00")
    assert F.sniff_extent(data + b"\xff\xd9" * 8) == ("jpeg", None, len(data))
    last_restart = data.rindex(b"\xff\xd7")
    assert F.sniff(data[:last_restart + 2])[1].startswith("truncated JPEG")


def test_the_walk_is_fast_on_a_large_scan():
    """It runs on every file in DALI's worker processes: the scan is searched in C (one Python
    step per marker, not per byte); 15 MB with a stuffed FF in every 5 bytes."""
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    data = b"\xff\xd8" + sos + b"\x12\xff\x00\xff\xd3" * 3_000_000 + b"\xff\xd9"
    start = time.perf_counter()
    assert F.jpeg_end(data) == len(data)
    assert time.perf_counter() - start < 0.5


def test_a_png_ends_at_its_iend_chunk(photos):
    png = jpeg_bytes(_photo(photos), format="PNG")
    assert F.sniff_extent(png + _mp4_like()) == ("png", None, len(png))
    for cut in (len(png) - 12, len(png) // 2, 40):
        fmt, problem = F.sniff(png[:cut])
        assert fmt == "png" and problem.startswith("truncated PNG"), cut


@pytest.mark.parametrize("decoder", ["dali", "pil"])
def test_phone_photos_decode_like_the_plain_jpeg(tmp_path, photos, ckpt, decoder):
    plain = jpeg_bytes(_photo(photos), quality=90)
    progressive = jpeg_bytes(_photo(photos), quality=90, progressive=True)
    thumbnail = jpeg_bytes(_photo(photos, 30, 40), quality=80)
    with_thumbnail, after_thumbnail = _with_exif_thumbnail(plain, thumbnail)
    files = {
        "a/plain.jpg": plain,
        "a/motion.jpg": plain + _mp4_like(),
        "a/maker_data.jpg": plain + b"\0" * 100 + b"\xff\xd8\xff\xe1 maker notes" * 200,
        "a/progressive.jpg": progressive,
        "a/progressive_motion.jpg": progressive + _mp4_like(),
        "b/thumbnail.jpg": with_thumbnail,
        "b/cut_after_thumbnail.jpg": with_thumbnail[:after_thumbnail],
        "b/cut_in_scan.jpg": plain[:len(plain) * 2 // 3],
        "b/plain.png": jpeg_bytes(_photo(photos), format="PNG"),
        "b/png_then_data.png": jpeg_bytes(_photo(photos), format="PNG") + _mp4_like(),
    }
    for name, data in files.items():
        (tmp_path / "data" / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "train" / name).write_bytes(data)
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tmp_path / "data", out, "--splits", "train",
                                              "--decoder", decoder, "--float32")) == 0
    rows = _store(out)
    for name in ("b/cut_after_thumbnail.jpg", "b/cut_in_scan.jpg"):
        ok, why, _ = rows[name]
        assert not ok and why.startswith("truncated JPEG"), (name, why)
    usable = [n for n in files if "cut" not in n]
    assert all(rows[n][0] and rows[n][1] == "" for n in usable), {n: rows[n] for n in usable}
    # what follows the image changes nothing: the features are the plain JPEG's
    for name in ("a/motion.jpg", "a/maker_data.jpg", "b/thumbnail.jpg"):
        np.testing.assert_allclose(rows[name][2], rows["a/plain.jpg"][2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows["a/progressive_motion.jpg"][2],
                               rows["a/progressive.jpg"][2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rows["b/png_then_data.png"][2], rows["b/plain.png"][2],
                               rtol=1e-4, atol=1e-5)
    assert _cosine(rows["a/progressive.jpg"][2], rows["a/plain.jpg"][2]) >= 0.999


def test_the_decoder_gets_the_image_without_what_follows_it(tmp_path, photos):
    plain = jpeg_bytes(_photo(photos), quality=90)
    path = tmp_path / "motion.jpg"
    path.write_bytes(plain + _mp4_like())
    encoded, roi, why, usable = F.prepare(path, PRE.resize, PRE.crop)
    assert usable and why == "" and encoded.tobytes() == plain
    np.testing.assert_array_equal(roi, F.crop_roi(160, 120, PRE.resize, PRE.crop))


# ---------------------------------------------------------------------------------------------
# Memory bounded whatever the geometry


def _strip(photos, width: int, height: int) -> Image.Image:
    """A width x height image of photo content (a band of a photo, resized)."""
    band = photos[1][200:232] if width >= height else photos[1][:, 300:332]
    return Image.fromarray(band).resize((width, height), Image.BILINEAR)


@pytest.mark.parametrize("size", [(3000, 2), (2, 3000), (4000, 3), (1200, 1200)])
def test_extreme_aspect_keeps_torchvision_geometry_at_the_default_size(photos, size):
    img = _strip(photos, *size)
    want = D.pil_transform(img, DEFAULT)  # the whole resized image (98 Mpixels for 3000x2)
    new_h, new_w, _, _ = F.eval_geometry(*size, DEFAULT.resize, DEFAULT.crop)
    got = R.eval_transform(img, DEFAULT)
    if new_h * new_w <= R.FULL_RESIZE_PIXELS:
        assert torch.equal(got, want)  # an ordinary image is torchvision's own output
    else:
        assert _cosine(got, want) >= 0.999
        assert (got - want).abs().max() <= 2.5 / 255 / min(DEFAULT.std)  # a rounding apart
    decoder = R.DaliDecoder(DEFAULT, device="cpu", max_batch=1, num_threads=1)
    encoded = np.frombuffer(jpeg_bytes(np.asarray(img), format="PNG"), dtype=np.uint8)
    (image,), (error,) = decoder.decode([encoded], [F.crop_roi(*size, DEFAULT.resize,
                                                               DEFAULT.crop)])
    assert error is None and _cosine(image, want) >= 0.999


@pytest.mark.parametrize("decoder", ["dali", "pil"])
def test_extreme_aspect_images_match_torchvision_in_the_store(tmp_path, photos, ckpt, model,
                                                             monkeypatch, decoder):
    # every image through the crop-region resize, even where the whole one would be small
    monkeypatch.setattr(R, "FULL_RESIZE_PIXELS", 0)
    sizes = {"a/banner.png": (20000, 1), "a/tower.png": (1, 20000), "b/strip.jpg": (4000, 3),
             "b/thin.jpg": (3000, 2), "b/photo.jpg": (160, 120)}
    images = {}
    for name, size in sizes.items():
        images[name] = _strip(photos, *size)
        path = tmp_path / "data" / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        images[name].save(path, quality=95)
        images[name] = D.pil_decode(path.read_bytes())  # what the decoders see
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tmp_path / "data", out, "--splits", "train",
                                              "--decoder", decoder, "--float32")) == 0
    rows = _store(out)
    for name, img in images.items():
        ok, why, features = rows[name]
        assert ok, why
        assert _cosine(features, _reference(model, img)) >= 0.999, name


def _png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that declares width x height RGB pixels over a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_an_image_beyond_the_pixel_budget_is_quarantined_before_it_is_decoded(tmp_path):
    """The decoded size is bounded by PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS,
    178,956,970 pixels): the header is enough to refuse it, on both paths."""
    assert 2 * Image.MAX_IMAGE_PIXELS == 178_956_970
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(15000, 15000))  # 225 Mpixels (675 MB as RGB) in 100 bytes
    _, _, why, usable = F.prepare(bomb, DEFAULT.resize, DEFAULT.crop)
    assert not usable and why.startswith("undecodable: DecompressionBombError")
    assert "225000000 pixels" in why
    image, why = R._pil_file(bomb, DEFAULT)
    assert image is None and why.startswith("undecodable: DecompressionBombError")


def _peak_rss(tmp_path: Path, data: Path, decoder: str, limit_mb: float) -> float:
    """Peak RSS in MB of stage 1 in a process of its own (any process of the run: DALI's
    workers too); killed as soon as it passes `limit_mb`, so a regression cannot take the
    machine's memory."""
    ckpt = tmp_path / "ckpt.pth"
    if not ckpt.exists():
        from .factories import tiny_net

        torch.save({"state_dict": tiny_net(2).state_dict(), "arch": "tests.factories:tiny_net"},
                   ckpt)
    argv = ["--checkpoint", str(ckpt), "--data-root", str(data), "--out",
            str(tmp_path / f"{data.name}-{decoder}.zarr"), "--splits", "train", "--resize",
            str(DEFAULT.resize), "--crop", str(DEFAULT.crop), "--batch-size", "16",
            "--chunk-rows", "16", "--num-threads", "2", "--decoder", decoder]
    script = ("import json, resource, sys, extract_features\n"
              "rc = extract_features.main(sys.argv[1:])\n"
              "peak = max(resource.getrusage(w).ru_maxrss for w in "
              "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
              "print(json.dumps({'rc': rc, 'peak_kb': peak}))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            rss_kb = next(int(ln.split()[1]) for ln in status.read_text().splitlines()
                          if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            rss_kb = 0
        if rss_kb > limit_mb * 1024:
            proc.kill()
            proc.wait()
            pytest.fail(f"stage 1 passed {limit_mb:.0f} MB ({rss_kb / 1024:.0f} MB) on {data}")
        time.sleep(0.05)
    result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    assert result["rc"] == 0
    return result["peak_kb"] / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("decoder", ["dali", "pil"])
def test_eight_banners_in_a_batch_stay_within_twice_a_normal_batch(tmp_path, photos, decoder):
    """Before: one 20000x1 image at resize 256 was resized to 5,120,000 x 256 pixels (3.9 GB)."""
    rng = np.random.default_rng(0)
    for tree, banners in (("normal", 0), ("banners", 8)):
        for k in range(8):
            path = tmp_path / tree / "train" / "ab"[k % 2] / f"img{k}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photos[k % 2][:400, :500]).save(path, quality=90)
        for k in range(banners):
            pixels = rng.integers(0, 256, (1, 20000, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / tree / "train" / "a" / f"banner{k}.jpg")
    normal = _peak_rss(tmp_path, tmp_path / "normal", decoder, limit_mb=8192)
    banners = _peak_rss(tmp_path, tmp_path / "banners", decoder, limit_mb=2 * normal)
    print(f"{decoder}: peak RSS {normal:.0f} MB (normal batch), {banners:.0f} MB (with banners)")
    assert banners < 2 * normal
