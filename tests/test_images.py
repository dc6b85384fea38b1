import io

import numpy as np
import pytest
import torch
from PIL import Image

from geosurge_index.geometry import CLIP_MEAN, CLIP_STD, TEN_CROP_SCALE, clip_normalise, crop_plan
from geosurge_index.images import (
    ImageDecodeError,
    Preprocess,
    class_map_path,
    decode_image,
    decode_image_with_size,
    load_class_map,
    open_class_map,
    probe_image,
)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decodes_supported_formats_to_rgb(fmt):
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    assert abs(int(out.getpixel((5, 5))[0]) - 200) < 8


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_converts_modes(mode, tmp_path):
    img = Image.new("RGB", (16, 16), (0, 128, 255)).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encode(img, fmt))
    assert decode_image(path).mode == "RGB"


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decode_image(_encode(img, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_encode(img, "JPEG", exif=exif))
    assert out.size == (20, 40)


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"", "zero_bytes"),
        (b"hello, I am text", "not_an_image"),
    ],
)
def test_bad_bytes_have_kinds(data, kind):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.kind == kind


def test_truncated_jpeg():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.kind == "truncated"


def test_pixel_cap_rejects_bombs_before_decoding():
    data = _encode(Image.new("RGB", (300, 300)), "PNG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, max_pixels=300 * 299)
    assert err.value.kind == "too_many_pixels"


def test_missing_path_is_unreadable(tmp_path):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(tmp_path / "nope.jpg")
    assert err.value.kind == "unreadable" and "nope.jpg" in str(err.value)


def test_gif_is_unsupported():
    with pytest.raises(ImageDecodeError) as err:
        decode_image(_encode(Image.new("P", (4, 4)), "GIF"))
    assert err.value.kind == "unsupported_format"


def test_preprocess_shapes_and_normalisation():
    img = Image.new("RGB", (90, 60), (255, 255, 255))
    crop = Preprocess(32).resize_crop(img)
    assert crop.size == (32, 32)
    arr = clip_normalise(np.asarray(crop)[None])
    assert tuple(arr.shape) == (1, 3, 32, 32) and arr.dtype == torch.float32
    np.testing.assert_allclose(arr[0, :, 0, 0].numpy(), (1 - CLIP_MEAN) / CLIP_STD, rtol=1e-5)
    tens = Preprocess(32).ten_crop_pixels(img)
    assert tens.shape == (10, 32, 32, 3) and tens.dtype == np.uint8


def test_class_map_is_aligned_with_the_image_crop(tmp_path):
    # A map whose left half is class 3 and right half class 7, on a wide image: the centre
    # crop keeps both halves, split in the middle.
    m = np.zeros((40, 80), dtype=np.uint8)
    m[:, :40] = 3
    m[:, 40:] = 7
    path = class_map_path(tmp_path / "photo.jpg")
    assert path.name == "photo.classmap.png"
    Image.fromarray(m, "L").save(path)
    out = load_class_map(path, 20)
    assert out.shape == (20, 20)
    assert (out[:, :10] == 3).all() and (out[:, 10:] == 7).all()


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but holds almost no data: decoding it would fail."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("orientation,seen", [(1, (640, 480)), (6, (480, 640)), (8, (480, 640)), (3, (640, 480))])
def test_true_size_after_exif_rotation_when_draft_decoding_shrank_it(orientation, seen):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.effect_noise((640, 480), 40).convert("RGB"), "JPEG", exif=exif)
    out = decode_image_with_size(data, draft_size=64)
    assert max(out.image.size) < 640  # DCT scaling decoded it smaller ...
    assert out.image.size[0] < out.image.size[1] if seen[0] < seen[1] else out.image.size[0] > out.image.size[1]
    assert (out.width, out.height) == seen  # ... and the photo's size as seen is still reported
    full = decode_image_with_size(data)
    assert full.image.size == seen == (full.width, full.height)
    assert decode_image(data, draft_size=64).size == out.image.size


def test_true_size_of_png_and_pil_inputs_with_exif():
    exif = Image.Exif()
    exif[0x0112] = 6
    png = _encode(Image.new("RGB", (40, 20)), "PNG", exif=exif)
    out = decode_image_with_size(png)
    assert out.image.size == (20, 40) and (out.width, out.height) == (20, 40)
    pil = Image.open(io.BytesIO(_encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif)))
    out = decode_image_with_size(pil)
    assert (out.width, out.height) == (20, 40) == out.image.size


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_probe_reads_the_header_only():
    with pytest.raises(ImageDecodeError) as err:  # 108 MP: over the default cap, under Pillow's own limit
        probe_image(_png_header(12000, 9000))
    assert err.value.kind == "too_many_pixels" and "12000x9000" in err.value.message
    # under a higher cap the header is fine: nothing was decoded (the pixel data is not there)
    data = _png_header(3000, 2000)
    with pytest.raises(ImageDecodeError) as err:
        probe_image(data, max_pixels=5_000_000)
    assert err.value.kind == "too_many_pixels"
    with probe_image(data, max_pixels=6_000_000) as img:
        assert img.size == (3000, 2000)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, max_pixels=6_000_000)
    assert err.value.kind == "truncated"
    for bad, kind in [(b"", "zero_bytes"), (b"text", "not_an_image"),
                      (_encode(Image.new("P", (4, 4)), "GIF"), "unsupported_format")]:
        with pytest.raises(ImageDecodeError) as err:
            probe_image(bad)
        assert err.value.kind == kind


def test_ten_crop_pixels_and_their_normalisation():
    img = Image.effect_noise((90, 60), 60).convert("RGB")
    pre = Preprocess(32)
    px = pre.ten_crop_pixels(img)
    assert px.shape == (10, 32, 32, 3) and px.dtype == np.uint8
    np.testing.assert_array_equal(px[5], px[0][:, ::-1])  # the mirrors follow the five crops
    # the corners and the centre of one bicubic resize to TEN_CROP_SCALE x 32 on the short side
    short = round(32 * TEN_CROP_SCALE)
    big = np.asarray(img.resize((int(short * 90 / 60), short), Image.BICUBIC))  # long side rounded down, as CLIP
    np.testing.assert_array_equal(px[0], big[:32, :32])
    np.testing.assert_array_equal(px[3], big[-32:, -32:])
    want = ((px / np.float32(255.0) - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(clip_normalise(px).numpy(), want, atol=1e-6)


def _class_coloured(w: int, h: int, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """An image whose colour encodes a class id in blocks of 40 x 40 pixels (id * 5 in every
    channel: 0..50), and its class map at half the resolution (as `geosurge segment` stores maps
    at the segmenter's size, not the image's)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 11, (h // 40, w // 40)).astype(np.uint8)
    full = ids.repeat(40, 0).repeat(40, 1)
    img = Image.fromarray(np.repeat(full[..., None] * 5, 3, axis=2), "RGB")
    return img, Image.fromarray(full, "L").resize((w // 2, h // 2), Image.NEAREST)


@pytest.mark.parametrize("ten", [False, True])
@pytest.mark.parametrize("w,h", [(400, 240), (240, 400), (320, 320)])
def test_class_map_cut_by_the_geometry_aligns_with_its_image(w, h, ten):
    img, cmap = _class_coloured(w, h)
    plan = crop_plan(*img.size, 64, ten=ten)
    px = plan.cut_pixels(img)
    maps = plan.cut_class_map(cmap)
    assert px.shape == (plan.n_crops, 64, 64, 3) and maps.shape == (plan.n_crops, 64, 64)
    v = px[..., 0].astype(int)
    # Away from block edges (where bicubic blends two colours) a pixel equals its 8 neighbours and
    # says its class: there it must be the map's class.
    pad = np.pad(v, ((0, 0), (1, 1), (1, 1)), mode="edge")
    flat = np.ones(v.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            flat &= pad[:, dy:dy + 64, dx:dx + 64] == v
    flat &= v % 5 == 0
    assert flat.mean() > 0.3
    np.testing.assert_array_equal((v // 5)[flat], maps[flat])


def test_class_map_cut_like_its_image_in_the_reader_stage(tmp_path):
    from geosurge_index.locate.decode import DecodeSpec, decode_any

    img, cmap = _class_coloured(400, 240, seed=1)
    img.save(tmp_path / "a.png")
    cmap.save(class_map_path(tmp_path / "a.png"))
    for ten in (False, True):
        d = decode_any(tmp_path / "a.png", DecodeSpec(64, ten_crop=ten))
        assert d.error is None and d.class_map is not None
        plan = crop_plan(400, 240, 64, ten=ten)
        np.testing.assert_array_equal(d.class_map, plan.cut_class_map(cmap)[0 if not ten else slice(None)])
        np.testing.assert_array_equal(d.pixels, plan.cut_pixels(img)[0 if not ten else slice(None)])


def test_open_class_map_from_bytes_and_refuses_rgb(tmp_path):
    m = np.arange(12, dtype=np.uint8).reshape(3, 4)
    data = _encode(Image.fromarray(m, "L"), "PNG")
    np.testing.assert_array_equal(np.asarray(open_class_map(data)), m)
    assert load_class_map(data, 3).shape == (3, 3)
    with pytest.raises(ImageDecodeError) as err:
        open_class_map(_encode(Image.new("RGB", (4, 4)), "PNG"))
    assert err.value.kind == "bad_class_map"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_above_pillows_own_limit_is_honoured():
    """Pillow refuses > 2 x Image.MAX_IMAGE_PIXELS (179 MP) on its own; a higher cap of ours wins,
    for that decode only (Pillow's global limit is left as it was)."""
    from _locate_fixtures import bomb_png
    from PIL import Image

    data = bomb_png(15000, 15000)  # 225 MP, header only
    limit = Image.MAX_IMAGE_PIXELS
    assert probe_image(data, max_pixels=300_000_000).size == (15000, 15000)
    assert Image.MAX_IMAGE_PIXELS == limit
    with pytest.raises(ImageDecodeError) as err:  # our cap still applies, with our message
        probe_image(data, max_pixels=200_000_000)
    assert err.value.kind == "too_many_pixels" and "cap of 200000000" in err.value.message
    with pytest.raises(ImageDecodeError, match="too_many_pixels"):
        probe_image(data)  # the default cap (100 MP)


def _heic_bytes() -> bytes:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    return _encode(Image.new("RGB", (80, 60), (200, 30, 30)), "HEIF")


def test_heic_is_decoded_with_the_heif_extra():
    img = decode_image(_heic_bytes())
    assert img.size == (80, 60) and img.mode == "RGB"
    assert abs(int(np.asarray(img)[30, 40, 0]) - 200) < 12


def test_heic_without_the_extra_is_unsupported_format_not_not_an_image(tmp_path):
    """Without pillow-heif (hidden from a fresh interpreter) a HEIC file says what it is and how
    to read it, instead of `not_an_image`."""
    import subprocess
    import sys

    (tmp_path / "x.heic").write_bytes(_heic_bytes())
    code = ("import sys; sys.modules['pillow_heif'] = None\n"
            "from geosurge_index.images import ImageDecodeError, decode_image\n"
            f"try:\n    decode_image({str(tmp_path / 'x.heic')!r})\n"
            "except ImageDecodeError as e:\n    print(e.kind, '|', e.message)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("unsupported_format | "), out.stdout + out.stderr
    assert "HEIC" in out.stdout and "geosurge-index[heif]" in out.stdout
