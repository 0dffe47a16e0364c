"""Quick check that the archive fixture works on both databases."""

from __future__ import annotations

from pathlib import Path

from pydicom.data import get_testdata_file

from stockade.archive import Archive
from stockade.index.base import Outcome
from stockade.ingest import Origin


def test_store_pydicom_ct(archive: Archive) -> None:
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    result = archive.store_file(data, Origin(via="import"))
    assert result.outcome is Outcome.STORED
    again = archive.store_file(data, Origin(via="import"))
    assert again.outcome is Outcome.DUPLICATE
    assert archive.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    report = archive.verify()
    assert report.ok and report.checked == 1
