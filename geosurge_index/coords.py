"""Reading coordinate tables (CSV or Parquet): latitude/longitude column detection and validation.

Every reader of coordinates (partition, evaluation, coverage) goes through `read_coordinates`, so
they all accept the same column names and reject the same bad rows with the same message.
Row numbers in messages and in `Coordinates.rows` are 0-based data rows (the header excluded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geosurge_index.errors import UserError

LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "lng", "long", "longitude")
ID_NAMES = ("id", "img_id", "image_id", "name", "key", "path", "filename")
_MAX_SHOWN = 10
_NUMBER = r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$"


@dataclass(frozen=True)
class Coordinates:
    """Valid points of a coordinate table, in input order."""

    lat: np.ndarray  # float64 (n,), degrees in [-90, 90]
    lon: np.ndarray  # float64 (n,), degrees in [-180, 180]
    rows: np.ndarray  # int64 (n,), 0-based input row of each point
    ids: np.ndarray | None  # str (n,) from the id column, when the table has one
    source: str  # where the points came from (the path)
    n_input: int  # rows in the input, valid or not
    n_skipped_invalid: int  # invalid rows left out (only with skip_invalid)
    lat_column: str | None = None
    lon_column: str | None = None
    id_column: str | None = None

    def __len__(self) -> int:
        return len(self.lat)


def find_column(names: list[str], candidates: tuple[str, ...], what: str, source: str) -> str:
    """The one column whose name, in any case, is among `candidates` (earlier ones win)."""
    lowered: dict[str, list[str]] = {}
    for name in names:
        lowered.setdefault(name.strip().lower(), []).append(name)
    for candidate in candidates:
        found = lowered.get(candidate, [])
        if len(found) > 1:
            raise UserError(f"{source}: several {what} columns {found}; name the one to use")
        if found:
            return found[0]
    raise UserError(
        f"{source}: no {what} column (looked for {', '.join(candidates)} in any case; "
        f"columns are {names})"
    )


def invalid_reasons(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Per row: '' when the point is valid, else why not (object array of str)."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    reasons = np.full(lat.shape, "", dtype=object)
    with np.errstate(invalid="ignore"):
        checks = [
            (np.isnan(lat), lambda k: "latitude is missing/NaN"),
            (np.isnan(lon), lambda k: "longitude is missing/NaN"),
            (np.isinf(lat), lambda k: "latitude is infinite"),
            (np.isinf(lon), lambda k: "longitude is infinite"),
            (np.isfinite(lat) & (np.abs(lat) > 90), lambda k: f"latitude {float(lat[k])!r} outside [-90, 90]"),
            (np.isfinite(lon) & (np.abs(lon) > 180), lambda k: f"longitude {float(lon[k])!r} outside [-180, 180]"),
        ]
    for mask, say in checks:
        for k in np.flatnonzero(mask & (reasons == "")):
            reasons[k] = say(k)
    return reasons


def validate_latlon(
    lat,
    lon,
    *,
    source: str = "coordinates",
    skip_invalid: bool = False,
    extra_reasons: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask of valid rows. Without `skip_invalid`, any invalid row raises a UserError
    that names the first rows and why each is invalid."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.shape != lon.shape or lat.ndim != 1:
        raise UserError(f"{source}: latitude and longitude must be 1-d arrays of one length, "
                        f"got shapes {lat.shape} and {lon.shape}")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
    if extra_reasons is not None:
        valid &= extra_reasons == ""
    if valid.all() or skip_invalid:
        return valid
    bad = np.flatnonzero(~valid)
    reasons = invalid_reasons(lat[bad[:_MAX_SHOWN]], lon[bad[:_MAX_SHOWN]])
    if extra_reasons is not None:
        extra = extra_reasons[bad[:_MAX_SHOWN]]
        reasons = np.where(extra != "", extra, reasons)
    shown = "; ".join(f"row {row}: {why}" for row, why in zip(bad[:_MAX_SHOWN].tolist(), reasons, strict=True))
    more = f" (and {len(bad) - _MAX_SHOWN} more)" if len(bad) > _MAX_SHOWN else ""
    raise UserError(
        f"{source}: {len(bad)} of {len(lat)} rows have invalid coordinates (0-based data rows): "
        f"{shown}{more}. Fix them, or skip them (--skip-invalid, skip_invalid=True)."
    )


def coordinates_from_arrays(
    lat, lon, *, ids=None, source: str = "coordinates", skip_invalid: bool = False
) -> Coordinates:
    """Validate in-memory arrays the same way files are validated."""
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    valid = validate_latlon(lat, lon, source=source, skip_invalid=skip_invalid)
    rows = np.flatnonzero(valid).astype(np.int64)
    id_arr = None if ids is None else np.asarray(ids, dtype=str)[valid]
    return Coordinates(lat[valid], lon[valid], rows, id_arr, source, len(lat), int((~valid).sum()))


def _table_columns(path: Path) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if _is_parquet(path):
            return list(pq.read_schema(path).names)
        with pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 16)) as reader:
            return list(reader.schema.names)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: cannot read as {'Parquet' if _is_parquet(path) else 'CSV'}: {err}") from None


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _to_float(column, name: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 values and per-row problems ('' when fine) of an Arrow column of any type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(column)
    problems = np.full(n, "", dtype=object)
    if pa.types.is_floating(column.type) or pa.types.is_integer(column.type) \
            or pa.types.is_decimal(column.type) or pa.types.is_null(column.type):
        # nulls come back as NaN and are reported as missing
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), problems
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        problems[:] = f"{name} column has type {column.type}, not a number"
        return np.full(n, np.nan), problems
    text = pc.utf8_trim_whitespace(column)
    numeric = pc.fill_null(pc.match_substring_regex(text, _NUMBER), False).to_numpy(zero_copy_only=False)
    present = pc.fill_null(pc.not_equal(text, ""), False).to_numpy(zero_copy_only=False)
    strings = text.to_numpy(zero_copy_only=False)
    values = np.full(n, np.nan)
    values[numeric] = strings[numeric].astype(np.float64)
    for k in np.flatnonzero(present & ~numeric)[: _MAX_SHOWN]:
        problems[k] = f"{name} is not a number: {strings[k]!r}"
    problems[present & ~numeric & (problems == "")] = f"{name} is not a number"
    return values, problems


def read_coordinates(
    path: str | Path,
    *,
    lat_column: str | None = None,
    lon_column: str | None = None,
    id_column: str | None = None,
    skip_invalid: bool = False,
) -> Coordinates:
    """Read points from a CSV (optionally compressed, e.g. .csv.gz) or Parquet file.

    Columns are found by name in any case: latitude from lat/latitude, longitude from
    lon/lng/long/longitude, an optional id from id/img_id/image_id/name/key/path/filename
    (unless given explicitly). Invalid rows (missing, NaN, non-numeric, |lat| > 90,
    |lon| > 180) raise a UserError naming them, or are left out and counted with `skip_invalid`.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise UserError(f"{source}: no such file")
    names = _table_columns(path)
    lat_name = lat_column or find_column(names, LAT_NAMES, "latitude", source)
    lon_name = lon_column or find_column(names, LON_NAMES, "longitude", source)
    for given in (lat_name, lon_name, id_column):
        if given is not None and given not in names:
            raise UserError(f"{source}: no column named {given!r} (columns are {names})")
    if id_column is None:
        try:
            id_column = find_column(names, ID_NAMES, "id", source)
        except UserError:
            id_column = None
    wanted = [c for c in dict.fromkeys([lat_name, lon_name, id_column]) if c is not None]
    try:
        if _is_parquet(path):
            table = pq.read_table(path, columns=wanted)
        else:
            types = {id_column: pa.string()} if id_column else {}
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                include_columns=wanted, column_types=types, strings_can_be_null=True))
    except (OSError, ValueError) as err:
        raise UserError(f"{source}: cannot read: {err}") from None
    lat, lat_problems = _to_float(table.column(lat_name), "latitude")
    lon, lon_problems = _to_float(table.column(lon_name), "longitude")
    problems = np.where(lat_problems != "", lat_problems, lon_problems)
    valid = validate_latlon(lat, lon, source=source, skip_invalid=skip_invalid, extra_reasons=problems)
    ids = None
    if id_column:
        import pyarrow.compute as pc

        column = pc.fill_null(table.column(id_column).cast(pa.string()), "")
        ids = column.to_numpy(zero_copy_only=False)[valid]
    return Coordinates(
        lat=lat[valid], lon=lon[valid], rows=np.flatnonzero(valid).astype(np.int64), ids=ids,
        source=source, n_input=len(lat), n_skipped_invalid=int((~valid).sum()),
        lat_column=lat_name, lon_column=lon_name, id_column=id_column,
    )
