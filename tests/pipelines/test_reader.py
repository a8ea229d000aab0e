"""The public sample reader: what it returns agrees with DuckDB and pycocotools on a real run."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.reader import RunDataset
from pipelines.sources import SourceConfig
from pipelines.synthesize import SynthesizeConfig, run
from schemas import open_run
from tests.helpers.coco_fixture import write_coco


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("reader")
    ann = write_coco(base / "data", n_images=5, objects_per_image=3, bad=True)
    out = base / "out"
    run(SynthesizeConfig(SourceConfig("coco", base / "data", ann, "val"), out,
                         masker=MaskerConfig(name="grabcut"), captioner=CaptionerConfig(),
                         unit_size=2, executor="local"))
    return out


def test_samples_match_duckdb_and_pycocotools(run_dir):
    ds = RunDataset(open_run(run_dir), where="keep")
    con = open_run(run_dir).connect()
    expected = con.execute(
        "SELECT image_id, count(*) FROM objects WHERE keep GROUP BY 1 ORDER BY 1").fetchall()
    assert [(ds[i]["image_id"], len(ds[i]["object_ids"])) for i in range(len(ds))] == expected
    s = ds[0]
    height, width = s["image"].shape[:2]
    assert s["masks"].shape == (len(s["object_ids"]), height, width)
    rows = con.execute("SELECT mask, box FROM objects WHERE image_id = ? AND keep "
                       "ORDER BY object_id", [s["image_id"]]).fetchall()
    for mask, (m, _box) in zip(s["masks"], rows, strict=True):
        ref = mask_utils.decode({"size": [m["height"], m["width"]], "counts": m["counts"].encode()})
        np.testing.assert_array_equal(mask, ref.astype(bool))
    np.testing.assert_allclose(s["boxes"], [b for _, b in rows])
    assert all(c and c[0]["provenance"] == "template" for c in s["captions"])


def test_where_selects_and_bad_conditions_are_one_line(run_dir):
    all_objects = RunDataset(run_dir, where="true", masks=False)
    rejected = RunDataset(run_dir, where="status = 'rejected'", masks=False)
    assert len(rejected) < len(all_objects)
    with pytest.raises(ValueError, match="not a condition on objects"):
        RunDataset(run_dir, where="no_such_column > 1")
    with pytest.raises(ValueError, match="not one SQL condition"):
        RunDataset(run_dir, where="keep; DROP TABLE x")


def test_ray_data_reads_the_parts_the_manifest_lists(run_dir, monkeypatch):
    """The card's advice for Ray: read_parquet of the listed parts (a folder glob would merge the
    images and objects tables); needs fsspec's http filesystem importable (aiohttp)."""
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run = open_run(run_dir)
    totals = run.manifest["totals"]
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=1)
    try:
        objects = ray.data.read_parquet(run.files("objects"))
        assert objects.count() == totals["objects"]
        assert "reject_code" in objects.schema().names and "sha256" not in objects.schema().names
    finally:
        ray.shutdown()
