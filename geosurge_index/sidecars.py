"""XMP sidecars that photo managers read: one per untagged, confidently located photo.

GPS goes where the managers look for it, the EXIF schema of XMP: `exif:GPSLatitude` /
`exif:GPSLongitude` as "DDD,MM.mmmmmmk" (k = N/S/E/W; XMP specification part 2, EXIF schema),
with `exif:GPSVersionID` and `exif:GPSMapDatum`; digiKam, darktable, Lightroom, immich (through
exiftool) and PhotoPrism read them. Beside it, this project's namespace (`NS_GEOSURGE`, prefix
`geosurge`) says that the position is an estimate: `geosurge:Estimated`, `Probability`,
`CellToken`, `CellLevel`, `CapKm`, `CapLevel`, `IndexId`, `Date`, `Software`.

Rules:
- an original photo is never opened for writing; only `.xmp` files are written;
- a photo whose EXIF carries valid GPS is skipped (`tagged`), so is a row without a prediction
  (`error`), below `--min-probability` (`low_probability`: the calibrated `confidence` when the
  rows have it, `row_probability`; with `--within-km KM`, the calibrated probability that the true
  point lies within KM of the estimate, `p_within_<KM>km`, read before any cap), not in `--only`
  (`not_selected`), or
  from inside a tar shard (`no_file`), or whose sidecar another photo of the run already takes
  (`name_clash`: photo.jpg and photo.png with --naming photo.xmp);
- an existing sidecar (either naming, beside the photo; the target with `--dest`) is merged into:
  every other element and attribute is kept; if it already holds GPS the photo is skipped
  (`gps_present`) unless `--force`; a file that is not well-formed XMP is left untouched and
  reported (`invalid_xmp`);
- every write goes to a temporary file in the same folder, fsynced, then `os.replace`d: a killed
  run leaves whole sidecars or none (a rerun removes its stray temporaries);
- a destination that cannot be written is a `UserError` naming it.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geosurge_index.confidence import row_probability
from geosurge_index.errors import UserError
from geosurge_index.privacy import Cap, apply_cap

NS_X = "adobe:ns:meta/"
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_EXIF = "http://ns.adobe.com/exif/1.0/"
NS_GEOSURGE = "http://ns.geosurge-index.invalid/estimate/1.0/"  # .invalid: a name, never fetched
PREFIXES = {"x": NS_X, "rdf": NS_RDF, "exif": NS_EXIF, "geosurge": NS_GEOSURGE}
NAMINGS = ("photo.jpg.xmp", "photo.xmp")  # digiKam/darktable/immich's first choice; Lightroom's
DEFAULT_MIN_PROBABILITY = 0.5
XPACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
XPACKET_END = '\n<?xpacket end="w"?>\n'
TMP_MARK = ".geosurge-tmp-"
GPS_PROPS = ("GPSLatitude", "GPSLongitude")
OUR_EXIF = ("GPSLatitude", "GPSLongitude", "GPSVersionID", "GPSMapDatum")
OUTCOMES = ("written", "merged", "would_write", "tagged", "error", "low_probability", "not_selected",
            "no_file", "gps_present", "invalid_xmp", "name_clash")


@dataclass
class SidecarReport:
    """What a `write_sidecars` run did: counts per outcome and the files behind the odd ones."""

    counts: Counter = field(default_factory=Counter)
    written: list[str] = field(default_factory=list)  # sidecar paths written or merged
    invalid: list[str] = field(default_factory=list)  # sidecars left untouched: not valid XMP
    gps_present: list[str] = field(default_factory=list)
    dry_run: bool = False
    claimed: set[str] = field(default_factory=set, repr=False)  # sidecars this run has decided on

    def summary(self) -> str:
        c = self.counts
        head = (f"sidecars: {c['would_write']} would be written (dry run)" if self.dry_run else
                f"sidecars: {c['written']} written ({c['merged']} merged into existing sidecars)")
        skipped = [(k, c[k]) for k in OUTCOMES[3:] if c[k]]
        lines = [head + (", skipped: " + ", ".join(f"{k} {v}" for k, v in skipped) if skipped else "")]
        if self.invalid:
            lines.append("  not valid XMP, left untouched: " + ", ".join(self.invalid[:10])
                         + (f" (+{len(self.invalid) - 10} more)" if len(self.invalid) > 10 else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"counts": {k: self.counts[k] for k in OUTCOMES}, "invalid_xmp": self.invalid,
                "gps_present": self.gps_present, "dry_run": self.dry_run}


# -- values -----------------------------------------------------------------------------------------

def xmp_coordinate(value: float, positive: str, negative: str) -> str:
    """Decimal degrees -> the XMP EXIF form "DDD,MM.mmmmmmk" (minutes to 1e-6: 2e-8 degrees)."""
    micro = round(abs(float(value)) * 60 * 1_000_000)  # whole micro-minutes: no 60.000000 minutes
    deg, rest = divmod(micro, 60 * 1_000_000)
    return f"{deg},{rest // 1_000_000:02d}.{rest % 1_000_000:06d}{positive if value >= 0 else negative}"


def parse_xmp_coordinate(text: str) -> float:
    """"DDD,MM.mmk" or "DDD,MM,SSk" -> decimal degrees (for tests and merges)."""
    m = re.fullmatch(r"\s*(\d+),(\d+(?:\.\d+)?)(?:,(\d+(?:\.\d+)?))?([NSEW])\s*", text)
    if not m:
        raise ValueError(f"not an XMP GPS coordinate: {text!r}")
    deg = float(m.group(1)) + float(m.group(2)) / 60 + (float(m.group(3)) / 3600 if m.group(3) else 0)
    return -deg if m.group(4) in "SW" else deg


def sidecar_name(photo: Path, naming: str) -> Path:
    if naming == "photo.jpg.xmp":
        return photo.with_name(photo.name + ".xmp")
    if naming == "photo.xmp":
        return photo.with_suffix(".xmp")
    raise UserError(f"--naming {naming!r}: expected one of {', '.join(NAMINGS)}")


# -- XMP documents ----------------------------------------------------------------------------------

class InvalidXmp(ValueError):
    pass


def _q(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


def parse_xmp(data: bytes) -> tuple[ET.Element, dict[str, str]]:
    """An XMP packet -> (its root element: x:xmpmeta or rdf:RDF, its namespace prefixes).
    InvalidXmp when it is not well-formed XML, has a DOCTYPE (entities), or holds no rdf:RDF."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise InvalidXmp("a DOCTYPE or ENTITY declaration (not allowed in XMP)")
    prefixes: dict[str, str] = {}
    import io

    try:
        parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
        for _event, item in ET.iterparse(io.BytesIO(data), events=("start-ns",)):
            prefix, uri = item
            prefixes.setdefault(prefix, uri)
        parser.feed(data)
        root = parser.close()
    except ET.ParseError as err:
        raise InvalidXmp(f"not well-formed XML: {err}") from None
    if root.tag == _q(NS_RDF, "RDF"):
        return root, prefixes
    if root.tag != _q(NS_X, "xmpmeta") or root.find(_q(NS_RDF, "RDF")) is None:
        raise InvalidXmp(f"the root is {root.tag}, not x:xmpmeta holding rdf:RDF")
    return root, prefixes


def _rdf(root: ET.Element) -> ET.Element:
    return root if root.tag == _q(NS_RDF, "RDF") else root.find(_q(NS_RDF, "RDF"))


def xmp_gps(root: ET.Element) -> tuple[str, str] | None:
    """The exif:GPSLatitude/GPSLongitude an XMP document holds (attributes or elements), or None."""
    found: dict[str, str] = {}
    for desc in _rdf(root).iter(_q(NS_RDF, "Description")):
        for prop in GPS_PROPS:
            v = desc.get(_q(NS_EXIF, prop))
            if v is None:
                el = desc.find(_q(NS_EXIF, prop))
                v = None if el is None else (el.text or "")
            if v is not None:
                found.setdefault(prop, v)
    return (found.get("GPSLatitude", ""), found.get("GPSLongitude", "")) if found else None


def _strip(desc: ET.Element, ns: str, names: tuple[str, ...] | None) -> None:
    for key in list(desc.attrib):
        if key.startswith(f"{{{ns}}}") and (names is None or key.split("}", 1)[1] in names):
            del desc.attrib[key]
    for child in list(desc):
        if isinstance(child.tag, str) and child.tag.startswith(f"{{{ns}}}") and (
                names is None or child.tag.split("}", 1)[1] in names):
            desc.remove(child)


def new_xmp() -> ET.Element:
    root = ET.Element(_q(NS_X, "xmpmeta"))
    rdf = ET.SubElement(root, _q(NS_RDF, "RDF"))
    ET.SubElement(rdf, _q(NS_RDF, "Description"), {_q(NS_RDF, "about"): ""})
    return root


def set_estimate(root: ET.Element, props: dict[str, str], exif: dict[str, str]) -> None:
    """Put our GPS and estimate properties on the document's first rdf:Description (replacing
    any GPS and geosurge properties there were; everything else stays)."""
    rdf = _rdf(root)
    descs = list(rdf.iter(_q(NS_RDF, "Description")))
    for d in descs:
        _strip(d, NS_EXIF, OUR_EXIF)
        _strip(d, NS_GEOSURGE, None)
    desc = descs[0] if descs else ET.SubElement(rdf, _q(NS_RDF, "Description"), {_q(NS_RDF, "about"): ""})
    for k, v in exif.items():
        desc.set(_q(NS_EXIF, k), v)
    for k, v in props.items():
        desc.set(_q(NS_GEOSURGE, k), v)


def serialise(root: ET.Element, prefixes: dict[str, str]) -> bytes:
    for prefix, uri in {**prefixes, **PREFIXES}.items():
        if prefix and not re.fullmatch(r"ns\d+", prefix):
            try:
                ET.register_namespace(prefix, uri)
            except ValueError:
                pass
    body = ET.tostring(root, encoding="unicode")
    return (XPACKET_BEGIN + body + XPACKET_END).encode("utf-8")


# -- files ------------------------------------------------------------------------------------------

def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (temporary in the same folder, fsync, rename)."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"cannot write sidecars in {path.parent}: {os.strerror(err.errno)} (a read-only "
                            "folder or file system; choose a writable one with --dest)") from None
        raise


def _remove_stale_temporaries(folder: Path) -> None:
    try:
        for p in folder.glob(f".*{TMP_MARK}*"):
            p.unlink(missing_ok=True)
    except OSError:
        pass


def read_only_list(path: str | os.PathLike) -> set[str]:
    """`--only FILE`: one id or path per line (what `geosurge review` exports); blank lines and
    lines starting with # are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"--only {path}: cannot read it ({err.strerror})") from None
    return {s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")}


# -- the run ----------------------------------------------------------------------------------------

PRED_COLUMNS = ("id", "path", "lat", "lon", "probability", "error", "exif_gps_valid", "cap_km", "cap_level",
                "cap_token", "confidence", "calibrated")



def read_rows(pred_dir: str | os.PathLike) -> pa.Table:
    """Every prediction row of a PRED_DIR (all columns; for capping and sidecars)."""
    from geosurge_index.pred_store import PredStore

    shards = PredStore(pred_dir).shard_paths()
    if not Path(pred_dir).is_dir():
        raise UserError(f"PRED_DIR {pred_dir} is not a folder")
    if not shards:
        raise UserError(f"PRED_DIR {pred_dir} holds no prediction shards (part-*.parquet)")
    return pq.read_table(shards)


def run_index(pred_dir, index_dir=None) -> tuple[str | None, str | None]:
    """(INDEX_DIR, index id) of a PRED_DIR's run (`--index` overrides the recorded folder)."""
    from geosurge_index.pred_store import read_run

    run = read_run(pred_dir) or {}
    return (str(index_dir) if index_dir else run.get("index_dir")), run.get("index_id")


def capped_rows(table: pa.Table, cap: Cap | None, index_dir: str | None, pred_dir) -> pa.Table:
    """Rows capped with `cap` (the one rule, `privacy.apply_cap`), over the run's index."""
    if not cap:
        return table
    if not index_dir or not Path(index_dir).is_dir():
        raise UserError(f"a precision cap needs the run's index (recorded: {index_dir}); name it with --index")
    from geosurge_index.index import read_tree

    return apply_cap(table, read_tree(index_dir, 7), cap)


def _relative(photo: Path, roots: list[Path]) -> Path:
    for root in roots:
        base = root if root.is_dir() else root.parent
        try:
            return photo.resolve().relative_to(base.resolve())
        except ValueError:
            continue
    return Path(*photo.resolve().parts[1:])


def write_sidecars(pred_dir, *, dest=None, min_probability: float = DEFAULT_MIN_PROBABILITY,
                   cap: Cap | None = None, naming: str = NAMINGS[0], dry_run: bool = False,
                   only: set[str] | None = None, force: bool = False, index_dir=None,
                   within_km: float | None = None) -> SidecarReport:
    """One XMP sidecar per untagged, confidently located photo of PRED_DIR (module docstring).
    With `within_km`, `min_probability` applies to P(true point within that distance of the
    uncapped estimate) (`p_within_<km>km`) instead of the cell probability."""
    from geosurge_index.calibration import WITHIN_KM, within_column
    from geosurge_index.pred_store import read_run
    from geosurge_index.progress import bar

    if naming not in NAMINGS:
        raise UserError(f"--naming {naming!r}: expected one of {', '.join(NAMINGS)}")
    if not 0 <= min_probability <= 1:
        raise UserError(f"--min-probability {min_probability}: must lie in 0..1")
    if within_km is not None and float(within_km) not in WITHIN_KM:
        raise UserError(f"--within-km {within_km:g}: expected one of {', '.join(f'{t:g}' for t in WITHIN_KM)}")
    dest_dir = Path(dest) if dest is not None else None
    if dest_dir is not None and not dry_run:
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--dest {dest_dir}: cannot create it ({os.strerror(err.errno or 0)})") from None
    index, index_id = run_index(pred_dir, index_dir)
    rows = read_rows(pred_dir)
    within = None
    if within_km is not None:  # read before the cap, which withholds it (the decision is the estimate's)
        name = within_column(within_km)
        if name not in rows.column_names:
            raise UserError(f"--within-km {within_km:g}: {pred_dir} has no {name} column (a run from before "
                            "it; locate again, or use --min-probability alone)")
        within = rows.column(name).to_pylist()
    table = capped_rows(rows, cap, index, pred_dir)
    roots = [Path(p) for p in ((read_run(pred_dir) or {}).get("inputs") or [])]
    report = SidecarReport(dry_run=dry_run)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    cols = {c: (table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows)
            for c in PRED_COLUMNS}
    level_cols = [f"cell_l{lv}" for lv in range(1, 8) if f"cell_l{lv}" in table.column_names]
    tokens = {lv: table.column(f"token_l{lv}").to_pylist() for lv in range(1, 8)
              if f"token_l{lv}" in table.column_names}
    cleaned: set[Path] = set()
    with bar(total=table.num_rows, desc="sidecars", unit="photo") as pbar:
        for i in range(table.num_rows):
            pbar.update(1)
            row = {c: cols[c][i] for c in PRED_COLUMNS}
            if within is not None:
                row[within_column(within_km)] = within[i]
            outcome, target = _decide(row, only, min_probability, within_km)
            if outcome is None:
                photo = Path(row["path"])
                target = (dest_dir / _relative(photo, roots)) if dest_dir is not None else photo
                outcome = _write_one(row, photo, target, dest_dir is not None, naming, force, dry_run, report,
                                     _estimate_props(row, tokens, level_cols, i, cap, index_id, now), cleaned)
            report.counts[outcome] += 1
    return report


def _decide(row: dict, only: set[str] | None, min_probability: float, within_km: float | None = None):
    if only is not None and row["id"] not in only and row["path"] not in only:
        return "not_selected", None
    if row["exif_gps_valid"]:
        return "tagged", None
    if row["error"] is not None or row["lat"] is None:
        return "error", None
    if row_probability(row, within_km) < min_probability:
        return "low_probability", None
    path = row["path"]
    if not path or not os.path.isfile(path):
        return "no_file", None  # a tar member or a file gone: nothing to put a sidecar beside
    return None, None


def _estimate_props(row: dict, tokens: dict, level_cols: list, i: int, cap: Cap | None, index_id, now) -> dict:
    if row["cap_level"] is not None:
        level, token = int(row["cap_level"]), row["cap_token"]
    else:
        known = [lv for lv in sorted(tokens) if tokens[lv][i] is not None]
        level = known[-1] if known else 0
        token = tokens[level][i] if known else ""
    props = {"Estimated": "True", "Probability": f"{row_probability(row):.6f}",
             "CellToken": str(token or ""), "CellLevel": str(level), "Date": now,
             "Software": "geosurge-index", "IndexId": str(index_id or "")}
    km = row["cap_km"]
    if km is not None and not np.isnan(km):
        props["CapKm"] = f"{float(km):g}"
    if cap is not None and cap.level is not None:
        props["CapLevel"] = str(cap.level)
    return props


def _write_one(row, photo: Path, target: Path, to_dest: bool, naming: str, force: bool, dry_run: bool,
               report: SidecarReport, props: dict, cleaned: set) -> str:
    candidates = [sidecar_name(target, naming)] + [sidecar_name(target, n) for n in NAMINGS if n != naming]
    existing = next((c for c in candidates if c.is_file()), None)
    out = existing or candidates[0]
    if str(out) in report.claimed:  # photo.jpg and photo.png share photo.xmp
        return "name_clash"
    report.claimed.add(str(out))
    if out.parent not in cleaned and not dry_run:
        _remove_stale_temporaries(out.parent)
        cleaned.add(out.parent)
    prefixes: dict[str, str] = {}
    if existing is not None:
        try:
            root, prefixes = parse_xmp(existing.read_bytes())
        except InvalidXmp:
            report.invalid.append(str(existing))
            return "invalid_xmp"
        except OSError as err:
            raise UserError(f"cannot read the sidecar {existing}: {err.strerror}") from None
        if xmp_gps(root) is not None and not force:
            report.gps_present.append(str(existing))
            return "gps_present"
    else:
        root = new_xmp()
    exif = {"GPSVersionID": "2.2.0.0", "GPSMapDatum": "WGS-84",
            "GPSLatitude": xmp_coordinate(row["lat"], "N", "S"),
            "GPSLongitude": xmp_coordinate(row["lon"], "E", "W")}
    if dry_run:
        return "would_write"
    set_estimate(root, props, exif)
    if to_dest:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {out.parent}: {os.strerror(err.errno or 0)}") from None
    if out.resolve() == photo.resolve():
        raise UserError(f"refusing to write over the photo {photo}")  # never an original
    atomic_write(out, serialise(root, prefixes))
    report.written.append(str(out))
    if existing is not None:
        report.counts["merged"] += 1
    return "written"
