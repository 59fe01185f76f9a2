"""`refnet check-port`: read golden fixtures back (manifest, sha256, headers) and compare a port's
output directory with them, tensor by tensor, in canonical order (format: refnet/fixtures.py).
"""
import hashlib
import json
import math
import os

import torch

from refnet.compare import compare_tensors, count_tiers
from refnet.fixtures import MANIFEST, SCHEMA_VERSION
from refnet.tensorfile import ST_DTYPES, decode_safetensors


def read_manifest(directory, what="fixtures"):
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ValueError(f"{what}: directory not found: {directory}")
    if not os.path.isfile(path):
        raise ValueError(f"{what}: missing {path}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.__class__.__name__}); truncated or "
                         f"corrupted?") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r} is not supported; this refnet "
                         f"reads schema_version {SCHEMA_VERSION}")
    if not isinstance(manifest.get("cases"), list):
        raise ValueError(f"{path}: expected a list under 'cases'")
    if what != "port":
        for i, case in enumerate(manifest["cases"]):
            if not isinstance(case, dict) or not {"name", "file", "sha256", "tensors"} <= set(case) \
                    or not isinstance(case["tensors"], list) or not all(
                        isinstance(t, dict) and {"name", "dtype", "shape", "kind"} <= set(t)
                        and (t["kind"] is None or {"rtol", "atol", "ulp_limit"} <= set(t))
                        for t in case["tensors"]):
                raise ValueError(f"{path}: cases[{i}] needs name, file, sha256 and tensors "
                                 f"(each with name, dtype, shape, kind and, when kind is set, "
                                 f"rtol, atol, ulp_limit)")
    return manifest


def load_fixture_case(directory, case):
    """Verify a fixture file's sha256 and header against the manifest -> {name: tensor}."""
    path = os.path.join(directory, case["file"])
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing fixture file (listed in manifest.json)")
    with open(path, "rb") as f:
        blob = f.read()                       # read once: hashed, then decoded
    digest = hashlib.sha256(blob).hexdigest()
    if digest != case["sha256"]:
        raise ValueError(f"{path}: sha256 mismatch (expected {case['sha256'][:16]}…, got "
                         f"{digest[:16]}…): the fixture file is corrupted or truncated")
    tensors, _ = decode_safetensors(blob, path)
    for entry in case["tensors"]:
        t = tensors.get(entry["name"])
        if t is None:
            raise ValueError(f"{path}: tensor {entry['name']!r} listed in manifest.json is missing")
        if ST_DTYPES[t.dtype] != entry["dtype"] or list(t.shape) != entry["shape"]:
            raise ValueError(f"{path}: tensor {entry['name']!r} is {ST_DTYPES[t.dtype]} "
                             f"{list(t.shape)}, manifest.json says {entry['dtype']} {entry['shape']}")
    return tensors


def check_port(port_dir, fixture_dir):
    """Compare a port's output directory with the fixtures.

    Returns a list of rows {case, name, tier, passed, max_abs_diff, max_ulp, tolerance_used (1.0 is
    the edge), note} in canonical
    order (cases in manifest order).  Fixture problems raise ValueError (one line, naming the file);
    a port's missing file/tensor or wrong dtype/shape is a failed row.
    """
    fixtures = read_manifest(fixture_dir, "--fixtures")
    port_manifest = None
    if os.path.isfile(os.path.join(port_dir, MANIFEST)):
        port_manifest = read_manifest(port_dir, "port")
    elif not os.path.isdir(port_dir):
        raise ValueError(f"port: directory not found: {port_dir}")
    port_sha = {c.get("file"): c.get("sha256") for c in (port_manifest or {}).get("cases", [])
                if isinstance(c, dict)}
    rows = []
    for case in fixtures["cases"]:
        ref = load_fixture_case(fixture_dir, case)
        path = os.path.join(port_dir, case["file"])
        checked = [e for e in case["tensors"] if e["kind"] is not None]
        if not os.path.isfile(path):
            rows += [_row(case, e, "fail", note=f"missing file {path}") for e in checked]
            continue
        with open(path, "rb") as f:
            blob = f.read()
        if port_sha.get(case["file"]) and hashlib.sha256(blob).hexdigest() != port_sha[case["file"]]:
            raise ValueError(f"{path}: sha256 does not match the port's manifest.json: the port's "
                             f"output file is corrupted or truncated")
        got, _ = decode_safetensors(blob, path)
        for e in checked:
            t = got.get(e["name"])
            if t is None:
                rows.append(_row(case, e, "fail", note=f"tensor missing from {path}"))
                continue
            if ST_DTYPES[t.dtype] != e["dtype"] or list(t.shape) != e["shape"]:
                rows.append(_row(case, e, "fail", note=f"{path}: tensor {e['name']!r} is "
                                 f"{ST_DTYPES[t.dtype]} {list(t.shape)}, expected {e['dtype']} "
                                 f"{e['shape']}"))
                continue
            v = compare_tensors(e["name"], t, ref[e["name"]], e["kind"], rtol=e["rtol"],
                                atol=e["atol"], ulp_limit=e["ulp_limit"],
                                tier=e.get("required_tier", "tolerance"))
            row = _row(case, e, v.tier, v.passed, v.max_abs_diff, v.max_ulp,
                       "" if v.passed else v.message())
            row["tolerance_used"] = _tolerance_used(t, ref[e["name"]], e["rtol"], e["atol"])
            rows.append(row)
    return rows


def summary(rows):
    """What `refnet check-port` prints under the rows: {"tensors", "passed", "tiers" ({tier:
    count}), "first_differs" (the first row not bitwise, or None), "first_fails" (or None)}."""
    return {"tensors": len(rows), "passed": sum(bool(r["passed"]) for r in rows),
            "tiers": count_tiers(r["tier"] for r in rows),
            "first_differs": next((r for r in rows if r["tier"] != "bitwise"), None),
            "first_fails": next((r for r in rows if not r["passed"]), None)}


def _tolerance_used(a, b, rtol, atol):
    """max |a − b| / (atol + rtol·|b|) over the elements: 1.0 is the edge of the tolerance."""
    if not a.is_floating_point() or not b.numel():
        return None
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    used = torch.where(same, 0.0, (a - b).abs() / (atol + rtol * b.abs()))
    return float(torch.nan_to_num(used, nan=math.inf).max())


def _row(case, entry, tier, passed=False, max_abs_diff=None, max_ulp=None, note=""):
    return {"case": case["name"], "name": entry["name"], "tier": tier, "passed": passed,
            "max_abs_diff": max_abs_diff, "max_ulp": max_ulp, "tolerance_used": None, "note": note}
