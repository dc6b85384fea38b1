"""A photo's own GPS, from its EXIF GPS IFD: `read_gps(bytes | path | PIL image) -> GpsTag`.

Never raises: a photo without GPS is `present=False`; GPS that cannot be a position (a latitude
of 91, a zero denominator, a missing N/S or E/W reference, minutes of 60 or more, GPSStatus V
"void", exactly 0,0: what cameras without a fix write) is `present=True, valid=False` with a note
saying why, and is treated as untagged everywhere (locate, `--skip-tagged`, sidecars, eval)."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

from PIL import ExifTags, Image

GPS_IFD = ExifTags.IFD.GPSInfo  # 0x8825
LAT_REF, LAT, LON_REF, LON, STATUS = 1, 2, 3, 4, 9  # GPS IFD tags
TAGGED_ERROR = "skipped_tagged"  # the error kind of a photo left out by --skip-tagged


@dataclass(frozen=True)
class GpsTag:
    """What a photo's EXIF says about where it was taken."""

    present: bool  # the EXIF has a GPS latitude or longitude
    valid: bool  # ... and it is a position (lat/lon set)
    lat: float | None = None
    lon: float | None = None
    note: str | None = None  # why present GPS is not valid, or why the EXIF could not be read


ABSENT = GpsTag(False, False)


def _rational(v) -> float:
    """An EXIF rational (PIL's IFDRational, a (num, den) pair or a number) -> float; NaN for a
    zero denominator."""
    if isinstance(v, tuple) and len(v) == 2:
        num, den = v
        return math.nan if not den else float(num) / float(den)
    den = getattr(v, "denominator", 1)
    if den == 0:
        return math.nan
    return float(v)


def _dms(value, what: str) -> float:
    parts = value if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"{what} has {len(parts)} components (degrees, minutes, seconds expected)")
    nums = [_rational(p) for p in parts]
    if any(math.isnan(x) for x in nums):
        raise ValueError(f"{what} has a zero denominator")
    if any(x < 0 or math.isinf(x) for x in nums):
        raise ValueError(f"{what} has a negative or infinite component")
    if any(x >= 60 for x in nums[1:]):
        raise ValueError(f"{what} has minutes or seconds of 60 or more")
    deg = nums[0] + (nums[1] / 60 if len(nums) > 1 else 0) + (nums[2] / 3600 if len(nums) > 2 else 0)
    return deg


def _ref(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip("\x00 ").upper()


def gps_from_ifd(gps: dict) -> GpsTag:
    """The GPS IFD (tag -> value, as PIL's `getexif().get_ifd(GPS_IFD)`) -> GpsTag."""
    if not gps or (LAT not in gps and LON not in gps):
        return ABSENT
    try:
        if LAT not in gps or LON not in gps:
            raise ValueError("only one of GPSLatitude and GPSLongitude is set")
        lat_ref, lon_ref = _ref(gps.get(LAT_REF)), _ref(gps.get(LON_REF))
        if lat_ref not in ("N", "S"):
            raise ValueError("GPSLatitudeRef is missing" if not lat_ref else f"GPSLatitudeRef is {lat_ref!r}")
        if lon_ref not in ("E", "W"):
            raise ValueError("GPSLongitudeRef is missing" if not lon_ref else f"GPSLongitudeRef is {lon_ref!r}")
        lat = _dms(gps[LAT], "GPSLatitude") * (-1 if lat_ref == "S" else 1)
        lon = _dms(gps[LON], "GPSLongitude") * (-1 if lon_ref == "W" else 1)
        if not abs(lat) <= 90:
            raise ValueError(f"GPSLatitude {lat:g} is beyond 90 degrees")
        if not abs(lon) <= 180:
            raise ValueError(f"GPSLongitude {lon:g} is beyond 180 degrees")
        if _ref(gps.get(STATUS)) == "V":
            raise ValueError("GPSStatus is V (a void measurement)")
        if lat == 0 and lon == 0:
            raise ValueError("0,0: what cameras without a position fix write")
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as err:
        return GpsTag(True, False, None, None, f"malformed EXIF GPS, treated as untagged: {err}")
    return GpsTag(True, True, lat, lon)


def _gps_ifd(im: Image.Image) -> dict:
    """The GPS IFD of an opened image, from its header only. Pillow's `getexif` on a PNG whose
    eXIf chunk is not before the pixels decodes the whole image to find it (outside any pixel
    budget: a 100 MP PNG would cost 300 MB here), so a PNG gives the EXIF of its header or none."""
    if im.format == "PNG":
        raw = im.info.get("exif")
        if not raw:
            return {}
        exif = Image.Exif()
        exif.load(raw if raw[:6] != b"Exif\x00\x00" else raw[6:])
        return dict(exif.get_ifd(GPS_IFD))
    return dict(im.getexif().get_ifd(GPS_IFD))


def read_gps(source) -> GpsTag:
    """A photo (bytes, a path, or an open PIL image) -> its EXIF GPS. Reads the header only
    (never the pixels; see `_gps_ifd`)."""
    try:
        if isinstance(source, Image.Image):
            return gps_from_ifd(_gps_ifd(source))
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        elif isinstance(source, (str, os.PathLike)):
            source = os.fspath(source)
        with Image.open(source) as im:
            return gps_from_ifd(_gps_ifd(im))
    except Exception as err:  # noqa: BLE001 - an unreadable EXIF is no GPS, with a note
        return GpsTag(False, False, None, None, f"EXIF unreadable: {type(err).__name__}: {err}")
