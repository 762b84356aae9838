"""The table reader: every format (gzipped text too), and one-line errors that name what the caller reads."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.tables import TABLE_EXTENSIONS, read_table

ROWS = [{"image": "a.png", "label": "cat"}, {"image": "b.png", "label": "dog"}]


@pytest.mark.parametrize("name", ["list.csv", "list.tsv", "list.jsonl", "list.json", "list.parquet", "list.csv.gz"])
def test_every_format_reads_the_same_rows(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        text = ("image\tlabel\n" + "".join(f"{r['image']}\t{r['label']}\n" for r in ROWS) if ".tsv" in name
                else "image,label\n" + "".join(f"{r['image']},{r['label']}\n" for r in ROWS) if ".csv" in name
                else "".join(f'{{"image": "{r["image"]}", "label": "{r["label"]}"}}\n' for r in ROWS))
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    assert read_table(str(path)).to_pylist() == ROWS
    assert name.removesuffix(".gz").endswith(TABLE_EXTENSIONS)


def test_errors_start_with_what_the_table_is(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("  \n")
    (tmp_path / "folder.csv").mkdir()
    cases = {"x.xlsx": "image list {} must end in", "missing.csv": "image list {} does not exist",
             "empty.csv": "image list {} is empty", "folder.csv": "image list {} is a folder"}
    for name, message in cases.items():
        location = str(tmp_path / name)
        with pytest.raises(UserError) as caught:
            read_table(location, what="image list")
        assert str(caught.value).startswith(message.format(location)), caught.value
