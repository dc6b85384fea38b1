import io

import numpy as np
import pytest
from PIL import Image

from geosurge_index.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDecodeError,
    Preprocess,
    class_map_path,
    decode_image,
    load_class_map,
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
    arr = Preprocess(32).to_array(img)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    np.testing.assert_allclose(arr[:, 0, 0], (1 - CLIP_MEAN) / CLIP_STD, rtol=1e-5)
    tens = Preprocess(32).ten_crop_arrays(img)
    assert tens.shape == (10, 3, 32, 32)


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
