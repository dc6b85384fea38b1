"""Reading coordinate tables: column detection, validation, error messages that name the rows."""

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geosurge_index.coords import coordinates_from_arrays, read_coordinates, validate_latlon
from geosurge_index.errors import UserError


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("header", ["lat,lon", "latitude,longitude", "LAT,LON", "Latitude,Lng", " lat , LONG "])
def test_column_names_in_any_case(tmp_path, header):
    path = write(tmp_path, "c.csv", f"{header}\n1.5,2.5\n-3,4\n")
    coords = read_coordinates(path)
    assert coords.lat.tolist() == [1.5, -3.0] and coords.lon.tolist() == [2.5, 4.0]
    assert coords.rows.tolist() == [0, 1] and coords.n_input == 2 and coords.n_skipped_invalid == 0


def test_lon_before_lat_and_ids_kept_as_strings(tmp_path):
    path = write(tmp_path, "c.csv", "name,lon,lat,other\n007.jpg,10,20,x\n8,11,21,y\n")
    coords = read_coordinates(path)
    assert coords.lat.tolist() == [20, 21] and coords.lon.tolist() == [10, 11]
    assert coords.id_column == "name" and coords.ids.tolist() == ["007.jpg", "8"]


def test_parquet_and_gzip(tmp_path):
    pq.write_table(pa.table({"LAT": [1.0, 2.0], "LON": [3.0, 4.0], "IMG_ID": ["a", "b"]}), tmp_path / "c.parquet")
    coords = read_coordinates(tmp_path / "c.parquet")
    assert coords.lat.tolist() == [1.0, 2.0] and coords.ids.tolist() == ["a", "b"]
    with gzip.open(tmp_path / "c.csv.gz", "wt") as f:
        f.write("lat,lon\n5,6\n")
    assert read_coordinates(tmp_path / "c.csv.gz").lon.tolist() == [6.0]


def test_missing_and_ambiguous_columns(tmp_path):
    with pytest.raises(UserError, match="no longitude column.*columns are \\['lat', 'x'\\]"):
        read_coordinates(write(tmp_path, "a.csv", "lat,x\n1,2\n"))
    with pytest.raises(UserError, match="several latitude columns"):
        read_coordinates(write(tmp_path, "b.csv", "lat,LAT,lon\n1,1,2\n"))
    with pytest.raises(UserError, match="no column named 'y'"):
        read_coordinates(write(tmp_path, "c.csv", "lat,lon\n1,2\n"), lat_column="y")
    with pytest.raises(UserError, match="no such file"):
        read_coordinates(tmp_path / "missing.csv")


def test_nan_and_empty_rows_are_named(tmp_path):
    path = write(tmp_path, "c.csv", "lat,lon\n1,2\n,3\n4,NaN\n5,6\n")
    with pytest.raises(UserError) as err:
        read_coordinates(path)
    text = str(err.value)
    assert str(path) in text and "2 of 4 rows" in text
    assert "row 1: latitude is missing" in text and "row 2: longitude is missing" in text
    coords = read_coordinates(path, skip_invalid=True)
    assert coords.rows.tolist() == [0, 3] and coords.n_skipped_invalid == 2 and coords.n_input == 4


def test_out_of_range_rows_are_named(tmp_path):
    path = write(tmp_path, "c.csv", "lat,lon\n90,180\n-90.5,0\n0,180.01\n-90,-180\n")
    with pytest.raises(UserError, match=r"row 1: latitude -90.5 outside \[-90, 90\]; row 2: longitude 180.01"):
        read_coordinates(path)
    assert read_coordinates(path, skip_invalid=True).rows.tolist() == [0, 3]


def test_non_numeric_values_are_named(tmp_path):
    path = write(tmp_path, "c.csv", "lat,lon\n1,2\nabc,3\n4, 5e1 \n")
    with pytest.raises(UserError, match="row 1: latitude is not a number: 'abc'"):
        read_coordinates(path)
    coords = read_coordinates(path, skip_invalid=True)
    assert coords.lat.tolist() == [1.0, 4.0] and coords.lon.tolist() == [2.0, 50.0]
    pq.write_table(pa.table({"lat": [True], "lon": [1.0]}), tmp_path / "b.parquet")
    with pytest.raises(UserError, match="type bool, not a number"):
        read_coordinates(tmp_path / "b.parquet")


def test_many_bad_rows_are_summarised():
    lat = np.full(30, np.nan)
    with pytest.raises(UserError, match=r"30 of 30 rows .* \(and 20 more\)"):
        validate_latlon(lat, np.zeros(30))


def test_arrays():
    coords = coordinates_from_arrays([1, np.inf, 3], [4, 5, 6], ids=["a", "b", "c"], skip_invalid=True)
    assert coords.rows.tolist() == [0, 2] and coords.ids.tolist() == ["a", "c"] and coords.n_skipped_invalid == 1
    with pytest.raises(UserError, match="row 1: latitude is infinite"):
        coordinates_from_arrays([1, np.inf], [4, 5])
