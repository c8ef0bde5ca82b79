"""predictions/ and the streamed listing: sorted paged listing, windows with the
done-set checked per window, --limit, the gallery's running sample, and
compaction (also while a run writes), on local disk and the S3 endpoint."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import re
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deconvnet import storage
from deconvnet.inference.modes import default_labelling_key, for_mode, labelling_key
from pipeline import gallery, layout, rows
from pipeline.config import SegmentJobConfig
from pipeline.listing import Window, first_segment, windows
from pipeline.predictions.compaction import compact
from pipeline.predictions.done import DoneIndex, Labelling
from pipeline.predictions.parts import latest_rows, read_predictions, visible_parts
from pipeline.predictions.writer import PredictionWriter


def labelling(model_id: str = "m1", **settings) -> Labelling:
    """A run's model and key: the default settings, or those `for_mode` gets."""
    return Labelling(model_id, labelling_key(for_mode(**settings), model_id))


def prediction_rows(uris: list[str], run_id: str, model_id: str = "m1", status: str = "ok",
                    seen: dict[str, tuple[int, str]] | None = None, key: str | None = None) -> pa.Table:
    """Rows as the write stage returns them; `seen`: the (size, version) each input had;
    `key`: their labelling key (the model's with the default settings)."""
    n = len(uris)
    batch = {"image_uri": uris, "mask_uri": [f"m/{u}" for u in uris], "overlay_uri": [""] * n,
             "status": [status] * n, "error": [""] * n, "permanent": [False] * n, "width": [4] * n,
             "height": [3] * n, "class_pixels": np.tile(np.array([10, 2], np.int64), (n, 1)),
             "mean_confidence": [0.5] * n, "uncertainty": [0.25] * n, "num_proposals": [1] * n,
             "source_size": [(seen or {}).get(u, (1, ""))[0] for u in uris],
             "source_version": [(seen or {}).get(u, (1, "v1"))[1] for u in uris],
             "model_id": [model_id] * n, "labelling_key": [key or default_labelling_key(model_id)] * n,
             "run_id": [run_id] * n, "seconds": [0.1] * n}
    return rows.table_from_batch({k: np.asarray(v) for k, v in batch.items()}, ("background", "cat"))


def write_run(output: str, run_id: str, uris: list[str], rows_per_part: int = 2, **kw) -> list[str]:
    w = PredictionWriter(output, run_id, rows_per_part)
    for i in range(0, len(uris), rows_per_part):
        w.add(prediction_rows(uris[i:i + rows_per_part], run_id, **kw))
    w.flush()
    return w.parts


def identities(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table["image_uri"].to_pylist(), table["run_id"].to_pylist()))


# --- the layout -----------------------------------------------------------------------


def test_the_layout_names_every_path_under_the_output(tmp_path):
    out = "s3://b/labels/"
    assert layout.mask_uri(out, "a/x.jpeg") == "s3://b/labels/masks/a/x.png"
    assert layout.overlay_uri(out, "a/x.jpeg") == "s3://b/labels/overlays/a/x.jpg"
    assert layout.compacted_part_uri(out, "c1") == "s3://b/labels/predictions/compact-c1.parquet"
    assert layout.run_record_uri(out, "r1") == "s3://b/labels/runs/r1.json"
    assert layout.gallery_uri(out) == "s3://b/labels/index.html"
    assert layout.evaluation_uri(out) == "s3://b/labels/eval"
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", layout.new_run_id())
    parts = write_run(str(tmp_path / "out"), "20260101T000000Z-aaaaaa", ["a", "b", "c"])
    assert [p[len(str(tmp_path)):] for p in parts] == [f"/out/predictions/20260101T000000Z-aaaaaa-part-0000{i}.parquet"
                                                        for i in range(2)]
    assert not any(map(layout.is_compacted, parts)) and layout.is_compacted(layout.compacted_part_uri(out, "c1"))


# --- the row --------------------------------------------------------------------------


def test_a_batch_becomes_rows_of_the_one_schema():
    t = prediction_rows(["a.jpg", "b.jpg"], "r1")
    assert t.schema == rows.SCHEMA and t.num_rows == 2
    assert t["classes"].to_pylist() == [["background", "cat"]] * 2 and t["class_pixels"][0].as_py() == [10, 2]
    assert set(rows.STAGE_COLUMNS) | set(rows.DERIVED) == set(rows.SCHEMA.names)
    with pytest.raises(ValueError, match="not prediction columns: nope"):
        rows.columns(["image_uri", "nope"])


# --- the streamed listing -------------------------------------------------------------


def test_local_listing_streams_in_the_order_of_full_paths(tmp_path):
    names = ["a.jpg", "a/b.jpg", "a-b.jpg", "a/c/d.png", "b.txt", "z/ü x.jpg", "A.JPG", "a0.jpg"]
    for n in names:
        (tmp_path / "in" / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / n).write_bytes(b"x" * len(n))
    root = str(tmp_path / "in")
    got = list(storage.iter_files_detail(root, [".jpg", ".png"]))
    assert [f.uri for f in got] == sorted(f"{root}/{n}" for n in names if not n.endswith(".txt"))
    assert all(f.size == len(f.uri) - len(root) - 1 and f.version for f in got)
    assert storage.list_files_detail(root) == list(storage.iter_files_detail(root))
    every = [f.uri for f in storage.iter_files_detail(root)]
    for i, uri in enumerate(every):  # resuming after any listed URI gives exactly the rest
        assert [f.uri for f in storage.iter_files_detail(root, start_after=uri)] == every[i + 1:]
    assert [f.uri for f in storage.iter_files_detail(root, start_after=f"{root}/a/b")] == every[every.index(
        f"{root}/a/b.jpg"):]  # any URI under the prefix, listed or not


def test_s3_listing_pages_through_more_than_one_page_in_key_order(s3_bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket.removeprefix("s3://")
    keys = [f"in/{i % 7}/{i:05d}.jpg" for i in range(1010)] + ["in//double.jpg", "in/x.txt", "other/y.jpg"]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=b"ab")
    got = [f.uri for f in storage.iter_files_detail(f"{s3_bucket}/in/", [".jpg"])]
    assert got == sorted(f"{s3_bucket}/{k}" for k in keys if k.startswith("in/") and k.endswith(".jpg"))
    assert len(got) == 1011  # two pages of ListObjectsV2
    for i in (0, 5, 999, 1000, 1009, 1010):  # resumed with StartAfter, across the page boundary too
        assert [f.uri for f in storage.iter_files_detail(f"{s3_bucket}/in/", [".jpg"], start_after=got[i])] == \
            got[i + 1:]
    with pytest.raises(FileNotFoundError):
        next(storage.iter_files_detail(f"{s3_bucket}/missing"))


def _inputs(tmp_path, n: int) -> tuple[str, list[str], dict[str, tuple[int, str]]]:
    root = tmp_path / "in"
    for i in range(n):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"{i:03d}.jpg").write_bytes(b"x")
    files = list(storage.iter_files_detail(str(root)))
    return str(root), [f.uri for f in files], {f.uri: (f.size, f.version) for f in files}


def test_windows_skip_what_is_done_across_windows_and_compacted_parts(tmp_path):
    root, uris, seen = _inputs(tmp_path, 20)
    out = str(tmp_path / "out")
    write_run(out, "20260101T000000Z-aaaaaa", uris[0:12:2], seen=seen)  # done by m1, to be compacted
    compact(out)
    write_run(out, "20260102T000000Z-bbbbbb", uris[1:12:2], seen=seen)  # done by m1, a recent run part
    write_run(out, "20260102T000000Z-cccccc", uris[12:16], model_id="m2", seen=seen)  # another model
    write_run(out, "20260102T000000Z-dddddd", uris[16:18], status="error", seen=seen)  # transient errors
    changed = {uris[18]: (5, seen[uris[18]][1])}
    write_run(out, "20260103T000000Z-eeeeee", uris[18:19], seen=changed)  # the file changed since
    cfg = SegmentJobConfig(input=root, output=out, model="unused")
    ws = list(windows(cfg, labelling(), window=3))
    assert [w.seen for w in ws] == [3] * 6 + [2]
    assert sum(w.skipped for w in ws) == 12
    assert [r["image_uri"] for w in ws for r in w.todo] == uris[12:]
    assert {r["rel"] for w in ws for r in w.todo} == {u[len(root) + 1:] for u in uris[12:]}
    # --no-incremental: every image; --limit: the first N in sorted order.
    assert sum(len(w.todo) for w in windows(SegmentJobConfig(input=root, output=out, model="u", incremental=False),
                                            labelling(), window=7)) == 20
    limited = windows(SegmentJobConfig(input=root, output=out, model="u", limit=5, incremental=False), labelling(), 2)
    assert [r["image_uri"] for w in limited for r in w.todo] == uris[:5]


def test_the_labelling_key_follows_every_setting_that_changes_a_mask():
    from deconvnet.inference.crf import CRFConfig

    default = labelling().key
    assert default == default_labelling_key("m1") == labelling(crf="paper", max_proposals=50).key  # the same twice
    changed = [labelling(crf="none"), labelling(crf="deeplab"), labelling(mode="original"),
               labelling(proposals="selective-search"), labelling(max_proposals=10), labelling(crf_max_side=300),
               labelling(aggregate="mean"), labelling("m2"), Labelling("m1", labelling_key(for_mode(), "m1", "fcn"))]
    keys = [default] + [c.key for c in changed]
    assert len(set(keys)) == len(keys) and all(re.fullmatch(r"[0-9a-f]{16}", k) for k in keys)
    assert labelling_key(for_mode(ensemble="product"), "m1", "fcn") != labelling_key(for_mode(), "m1", "fcn")
    # How the arithmetic is done is not a setting of the mask; the ensemble rule counts only with an FCN.
    assert default == labelling(batch_size=3).key == labelling(dtype="fp32").key == labelling(ensemble="product").key

    @dataclasses.dataclass(frozen=True)
    class Later(CRFConfig):  # a field added later: at its default, every key stays as it was
        sharper: bool = False

    inference = for_mode()
    later = dataclasses.replace(inference, crf=Later(**dataclasses.asdict(inference.crf)))
    assert labelling_key(later, "m1") == default
    assert labelling_key(dataclasses.replace(later, crf=dataclasses.replace(later.crf, sharper=True)), "m1") != default
    # exact (every label, every step) is such a field: --crf-exact labels again.
    assert labelling_key(for_mode(crf_exact=True), "m1") != default


def _todo(cfg: SegmentJobConfig, run: Labelling) -> list[str]:
    return [r["image_uri"] for w in windows(cfg, run, window=4) for r in w.todo]


def test_an_image_is_done_only_when_its_latest_row_has_the_runs_labelling_key(tmp_path):
    root, uris, seen = _inputs(tmp_path, 9)
    out = str(tmp_path / "out")
    cfg = SegmentJobConfig(input=root, output=out, model="unused")
    default, none, deeplab = labelling(), labelling(crf="none"), labelling(crf="deeplab")
    write_run(out, "20260101T000000Z-aaaaaa", uris, seen=seen, key=default.key)
    assert _todo(cfg, default) == [] and _todo(cfg, none) == _todo(cfg, deeplab) == uris
    compact(out)  # the same from a compacted part
    write_run(out, "20260102T000000Z-bbbbbb", uris[:3], seen=seen, key=none.key)
    assert _todo(cfg, none) == uris[3:]
    # masks/ holds `none`'s masks of the first three now: the defaults label them again.
    assert _todo(cfg, default) == uris[:3] and _todo(cfg, deeplab) == uris


def _write_legacy_part(uri: str, table: pa.Table) -> None:
    """A part as runs wrote it before rows had a labelling key."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table.drop_columns(["labelling_key"]), buf, row_group_size=4)
    storage.write_bytes(uri, buf.getvalue())


@pytest.mark.parametrize("compacted", [False, True])
def test_rows_written_before_keys_count_as_done_only_with_the_default_settings(output, tmp_path, compacted):
    root, uris, seen = _inputs(tmp_path, 9)
    cfg = SegmentJobConfig(input=root, output=output, model="unused")
    table = prediction_rows(uris, "20260101T000000Z-aaaaaa", seen=seen)
    # An old run's part, or an old compacted part (sorted, read a row group at a time).
    _write_legacy_part(layout.compacted_part_uri(output, "old") if compacted else
                       layout.run_part_uri(output, "20260101T000000Z-aaaaaa", 0), table)
    assert _todo(cfg, labelling()) == []
    assert _todo(cfg, labelling(crf="none")) == _todo(cfg, labelling(max_proposals=10)) == uris
    assert _todo(cfg, labelling("m2")) == uris
    # They stay readable, the key null, and are compacted with newer parts.
    write_run(output, "20260102T000000Z-bbbbbb", uris[:2], seen=seen, key=labelling(crf="none").key)
    for _ in range(2):
        got = read_predictions(output, ["image_uri", "labelling_key"])
        assert got.num_rows == 11 and got["labelling_key"].null_count == 9
        compact(output)
    assert _todo(cfg, labelling()) == uris[:2] and _todo(cfg, labelling(crf="none")) == uris[2:]


def test_a_single_file_is_its_own_listing(tmp_path):
    root, uris, _ = _inputs(tmp_path, 2)
    (w,) = windows(SegmentJobConfig(input=uris[0], output=str(tmp_path / "o"), model="u"), labelling())
    assert [(r["image_uri"], r["rel"]) for r in w.todo] == [(uris[0], "000.jpg")]


def test_the_running_sample_ends_as_the_gallery_sample_and_has_overlays_for_it():
    uris = [f"s3://b/in/{i:05d}.jpg" for i in range(3000)]
    s, flagged = gallery.RunningSample(12), set()
    for u in uris:  # sorted order, as the listing streams it
        if s.add(u):
            flagged.add(u)
    assert s.uris() == gallery.sample(uris, 12)  # the non-streaming definition
    assert gallery.sample(uris, 12) <= flagged and len(flagged) < 12 * (2 + np.log(3000 / 12))
    random.Random(0).shuffle(uris)
    s2 = gallery.RunningSample(12)
    for u in uris:
        s2.add(u)
    assert s2.uris() == s.uris()


def test_windows_flag_overlays_for_the_gallery_sample(tmp_path):
    root, uris, _ = _inputs(tmp_path, 30)
    cfg = SegmentJobConfig(input=root, output=str(tmp_path / "o"), model="u", gallery=True, gallery_size=4)
    flagged = {r["image_uri"] for w in windows(cfg, labelling(), window=4) for r in w.todo if r["overlay"]}
    assert gallery.sample(uris, 4) <= flagged


def _segments(cfg: SegmentJobConfig, run: Labelling, run_id: str | None = None) -> list[list[Window]]:
    """The listing as a run walks it: segment after segment, each resuming where the last ended."""
    out, segment = [], first_segment(cfg)
    while segment is not None:
        out.append(list(windows(cfg, run, window=4, segment=segment, run_id=run_id)))
        segment = next((w.next_segment for w in out[-1] if w.next_segment), None)
    return out


@pytest.mark.parametrize("size", [1, 3, 5, 30])
def test_segments_list_every_image_once_with_the_skips_limit_and_overlays_of_one_listing(tmp_path, size):
    root, uris, seen = _inputs(tmp_path, 25)
    out = str(tmp_path / "out")
    write_run(out, "20260101T000000Z-aaaaaa", uris[0:12:3], seen=seen)
    compact(out)  # a compacted part the segments seek into
    write_run(out, "20260102T000000Z-bbbbbb", uris[13:20:2], seen=seen)  # a recent run part
    base = dict(input=root, output=out, model="u", gallery=True, gallery_size=4)
    expected = {}
    for extra in ({}, {"limit": 17}):
        whole = list(windows(SegmentJobConfig(**base, **extra, segment_images=10**6), labelling(), window=4))
        segs = _segments(SegmentJobConfig(**base, **extra, segment_images=size), labelling())
        todo = [r for ws in segs for w in ws for r in w.todo]
        expected[len(extra)] = [r for w in whole for r in w.todo]
        assert todo == expected[len(extra)]  # the same rows, overlay flags included
        assert sum(w.seen for ws in segs for w in ws) == sum(w.seen for w in whole) == extra.get("limit", 25)
        assert sum(w.skipped for ws in segs for w in ws) == sum(w.skipped for w in whole) > 0
        assert all(len([r for w in ws for r in w.todo]) <= size for ws in segs)
        assert len(segs) >= -(-len(todo) // size)
    # The run's own parts (of its earlier segments) are not read for the done-set.
    write_run(out, "20260103T000000Z-cccccc", uris, seen=seen)
    assert [r["image_uri"] for ws in _segments(SegmentJobConfig(**base, segment_images=5), labelling(),
                                               run_id="20260103T000000Z-cccccc") for w in ws for r in w.todo] == \
        [r["image_uri"] for r in expected[0]]
    others = _segments(SegmentJobConfig(**base, segment_images=5), labelling())  # another run's rows count
    assert len(others) == 1 and not any(w.todo for w in others[0]) and sum(w.skipped for w in others[0]) == 25


# --- compaction -----------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return storage.join(request.getfixturevalue("s3_bucket"), "out")


def test_compaction_keeps_every_row_once_and_leaves_few_parts(output):
    written = []
    for r in range(6):
        run_id = f"2026010{r}T000000Z-{r:06d}"
        uris = [f"s3://b/in/{r}-{i}.jpg" for i in range(5)] + ["s3://b/in/same.jpg"]
        write_run(output, run_id, uris)
        written += [(u, run_id) for u in uris]
    before = read_predictions(output)
    assert len(visible_parts(output).runs) == 18
    done = compact(output, max_rows=20)
    after = read_predictions(output)
    assert sorted(identities(after)) == sorted(identities(before)) == sorted(written)
    parts = visible_parts(output)
    assert parts.runs == [] and len(parts.compacted) == len(done["written"]) == 2 and not parts.replaced
    assert latest_rows(after).num_rows == 31
    index = DoneIndex(output, labelling())
    assert set(index.lookup("s3://b/in/0", "s3://b/in/1~")) == {f"s3://b/in/{r}-{i}.jpg" for r in (0, 1)
                                                                for i in range(5)}
    assert set(index.lookup("s3://b/in/same.jpg", "s3://b/in/zzz")) == {"s3://b/in/same.jpg"}
    index.close()


def test_a_reader_skips_parts_a_compacted_part_replaces(output):
    write_run(output, "20260101T000000Z-aaaaaa", ["a", "b", "c"], rows_per_part=1)
    saved = {uri: storage.read_bytes(uri) for uri in visible_parts(output).runs}
    compact(output)
    for uri, data in saved.items():  # as if the compactor stopped after writing: the old parts are back
        storage.write_bytes(uri, data)
    assert len(visible_parts(output).replaced) == 3
    assert sorted(identities(read_predictions(output))) == [(u, "20260101T000000Z-aaaaaa") for u in "abc"]
    compact(output)  # deletes the leftovers
    assert visible_parts(output).replaced == []


def test_parts_written_before_a_column_existed_read_it_as_null(output):
    """A part without `uncertainty` (written before it was added) reads, alone, with
    newer parts, by columns and after compaction: the column is null in its rows."""
    old = write_run(output, "20260101T000000Z-aaaaaa", ["a", "b"])
    for uri in old:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri))).drop_columns(["uncertainty"])
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(uri, buf.getvalue())
    write_run(output, "20260102T000000Z-bbbbbb", ["b", "c"])

    def by_image(table: pa.Table) -> dict[tuple[str, str], float | None]:
        return dict(zip(identities(table), table["uncertainty"].to_pylist()))

    want = {("a", "20260101T000000Z-aaaaaa"): None, ("b", "20260101T000000Z-aaaaaa"): None,
            ("b", "20260102T000000Z-bbbbbb"): 0.25, ("c", "20260102T000000Z-bbbbbb"): 0.25}
    everything = read_predictions(output)
    assert everything.schema == rows.SCHEMA and by_image(everything) == want
    assert by_image(read_predictions(output, ["image_uri", "run_id", "uncertainty"])) == want
    compact(output)
    assert not visible_parts(output).runs and by_image(read_predictions(output)) == want


def test_compacting_while_a_run_writes_loses_and_duplicates_nothing(s3_bucket):
    output = storage.join(s3_bucket, "out")
    write_run(output, "20260101T000000Z-aaaaaa", [f"old-{i}" for i in range(40)], rows_per_part=4)
    stop, errors, seen_counts = threading.Event(), [], []
    run_id = "20260102T000000Z-bbbbbb"

    def writer():  # a run, writing a part of 3 rows at a time
        try:
            w = PredictionWriter(output, run_id, 3)
            for i in range(0, 60, 3):
                w.add(prediction_rows([f"new-{k:03d}" for k in range(i, i + 3)], run_id))
                time.sleep(0.1)  # rows arrive over time, as in a run
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def reader():  # a reader in between must never see a row twice
        while not stop.is_set():
            ids = identities(read_predictions(output, ["image_uri", "run_id"]))
            dup = [k for k, n in Counter(ids).items() if n > 1]
            if dup:
                errors.append(AssertionError(f"duplicated: {dup[:3]}"))
            if sum(u.startswith("old-") for u, _ in ids) != 40:
                errors.append(AssertionError("rows of the old run missing"))
            seen_counts.append(len(ids))

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    compactions = 0
    while not stop.is_set():
        compactions += len(compact(output)["written"])
    for t in threads:
        t.join()
    compact(output)
    assert not errors, errors
    final = identities(read_predictions(output, ["image_uri", "run_id"]))
    assert sorted(final) == sorted([(f"old-{i}", "20260101T000000Z-aaaaaa") for i in range(40)] +
                                   [(f"new-{i:03d}", run_id) for i in range(60)])
    assert compactions >= 2 and len(seen_counts) >= 2 and seen_counts == sorted(seen_counts)
    assert len(visible_parts(output).all) == 1
