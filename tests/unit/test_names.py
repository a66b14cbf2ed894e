"""Output names no two inputs share, whatever the names and whichever comes first, and the move of outputs an
older textlabel named otherwise (records.part_name, plan.misnamed, sweep.renaming / move_misnamed)."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
from textlabel import plan, storage, sweep
from textlabel.manifest import Manifest
from textlabel.records import FileRecord, Status, owner, part_name, records_table

# Names that look like parts, like escaped names, like both, or like neither; S3 keys too (a key and a key
# below it, a newline, digits that are not ASCII).
ADVERSARIAL = [
    "a.parquet", "a.part-00000.parquet", "a.part-00001.parquet", "a.part-00000~.parquet", "a.part-00000~~.parquet",
    "a~.parquet", "a.part-0.parquet", "a.part-0~.parquet", "a.part-00000.part-00000.parquet",
    "a.part-00000~.part-00000.parquet", "a.part-100000.parquet", "a.part-012345.parquet", "a.part-.parquet",
    "a.parquet/x.parquet", "a.parquet/x.part-00000.parquet", "a.part-00000.parquet/b.parquet", "d/a.parquet",
    "d/a.part-00000.parquet", "a.part-00000\n.parquet", "a.part-00000\n~.parquet", "a.part-\u0660\u0660\u0660\u0660\u0660.parquet",
    ".part-00000.parquet", "a.part-00000.parquet.parquet", "a.PART-00000.parquet",
]


def outputs(name: str, most_parts: int = 3) -> set[str]:
    """Every output name ``name`` can have: its own, or each part of it cut into 2 .. most_parts parts."""
    return {part_name(name, 0, 1)} | {part_name(name, k, n) for n in range(2, most_parts + 1) for k in range(n)}


def night(store: dict[str, str], name: str, parts: int) -> None:
    """Label ``name`` into ``parts`` outputs, failing on any output name another input's output has."""
    for k in range(parts):
        out = part_name(name, k, parts)
        assert store.setdefault(out, name) == name, f"{name} part {k} overwrites {store[out]}'s output {out}"


def test_no_input_overwrites_another_inputs_output_in_either_order():
    for first, then in itertools.permutations(ADVERSARIAL, 2):  # each pair, both ways round
        for parts_first, parts_then in [(1, 1), (1, 3), (3, 1), (3, 3)]:
            store: dict[str, str] = {}
            night(store, first, parts_first)
            night(store, then, parts_then)


def test_the_issue_case_and_names_that_mirror_their_inputs():
    assert part_name("a.parquet", 0, 1) == "a.parquet" and part_name("d/a.parquet", 1, 2) == "d/a.part-00001.parquet"
    assert part_name("a.part-00000.parquet", 0, 1) == "a.part-00000~.parquet"  # a.parquet's first part keeps its name
    assert part_name("a.part-00000.parquet", 1, 2) == "a.part-00000~.part-00001.parquet"
    assert part_name("a.part-00000~.parquet", 0, 1) == "a.part-00000~~.parquet"
    assert part_name("a~.parquet", 0, 1) == "a~.parquet"  # a "~" alone escapes nothing


def random_name(rng: random.Random) -> str:
    pieces = ["a", "b", ".", "part-", "0", "1", "00000", "~", "/", ".parquet", "\n", "\u0661", "-"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 7))) + ".parquet"


def test_names_are_injective_and_owner_inverts_them_over_generated_names():
    rng = random.Random(27)
    names = set(ADVERSARIAL) | {random_name(rng) for _ in range(20_000)}
    seen: dict[str, str] = {}
    for name in names:
        for out in outputs(name):
            assert seen.setdefault(out, name) == name, f"{name} and {seen[out]} share output {out}"
            assert owner(out) == name
    assert owner(part_name("a.parquet", 123456, 200000)) == "a.parquet"
    for junk in ["a.part-00000.parquet.x", "a.part-0000.part-00001.parquet", "a.part-00000.part-0001.parquet",
                 "a.part-1.parquet", "a.part-01234567.parquet"]:  # what part_name never writes
        found = owner(junk)
        assert found is None or junk in outputs(found)


def rec(name: str, outputs: list[str], status: Status = Status.DONE) -> FileRecord:
    return FileRecord(name, "etag:1", 10, status, outputs, 5, 5, model="m", run="r0")


def facts(name: str, part: str = "0/1") -> dict[str, str]:
    return {"input": name, "part": part}


def move(*records: FileRecord, facts_by_name: dict[str, dict[str, str] | None]) -> sweep.Renaming:
    table = records_table(list(records))
    found = plan.misnamed(table)
    held = plan.holders(table, sorted({n for m in found for n in (*m.record.outputs, *m.names)}))
    return sweep.renaming(found, held, facts_by_name, "now")


def test_only_outputs_an_older_textlabel_named_as_another_inputs_are_misnamed():
    table = records_table([rec("a.parquet", ["a.part-00000.parquet", "a.part-00001.parquet"]), rec("b.parquet", ["b.parquet"]),
                           rec("c.part-1.parquet", ["c.part-1.parquet"]),  # a name no other input's output can have
                           rec("d.part-00000.parquet", ["d.part-00000~.parquet"]),  # named as today
                           rec("e.part-00000.parquet", ["e.part-00000.parquet"])])
    assert [(m.record.input, m.names) for m in plan.misnamed(table)] == [("e.part-00000.parquet", ("e.part-00000~.parquet",))]


def test_a_misnamed_output_moves_to_its_new_name_without_being_labelled_again():
    x = rec("a.part-00000.parquet", ["a.part-00000.parquet"])
    moving = move(x, facts_by_name={"a.part-00000.parquet": facts("a.part-00000.parquet")})
    assert moving.copies == [("a.part-00000.parquet", "a.part-00000~.parquet")]
    assert [(r.input, r.status, r.outputs) for r in moving.records] == [(x.input, Status.DONE, ["a.part-00000~.parquet"])]
    assert moving.delete == ["a.part-00000.parquet"] and not moving.taken and not moving.lost


def test_the_old_collision_un_vouches_whichever_record_lost_its_labels():
    x = rec("a.part-00000.parquet", ["a.part-00000.parquet"])
    a = rec("a.parquet", ["a.part-00000.parquet", "a.part-00001.parquet"])  # both vouch for one file
    overwritten = move(x, a, facts_by_name={"a.part-00000.parquet": facts("a.parquet", "0/2")})
    assert not overwritten.copies and not overwritten.delete  # a.parquet's file stays, vouched for by it alone
    assert [(r.input, r.status, r.outputs) for r in overwritten.records] == [(x.input, Status.LABELLING, [])]
    assert overwritten.lost == [x.input]
    kept = move(x, a, facts_by_name={"a.part-00000.parquet": facts(x.input)})  # a.parquet's part was overwritten
    assert kept.copies == [("a.part-00000.parquet", "a.part-00000~.parquet")] and kept.lost == ["a.parquet"]
    assert {r.input: r.status for r in kept.records} == {x.input: Status.DONE, "a.parquet": Status.LABELLING}
    assert kept.delete == ["a.part-00000.parquet"]


def test_a_missing_output_and_a_record_being_replaced_drop_the_name_they_do_not_own():
    gone = move(rec("a.part-00000.parquet", ["a.part-00000.parquet"]), facts_by_name={"a.part-00000.parquet": None})
    assert [(r.status, r.outputs) for r in gone.records] == [(Status.LABELLING, [])] and not gone.copies
    replacing = move(rec("a.part-00000.parquet", ["a.part-00000.parquet"], Status.LABELLING), facts_by_name={})
    assert [(r.status, r.outputs) for r in replacing.records] == [(Status.LABELLING, [])]
    assert replacing.delete == ["a.part-00000.parquet"] and not replacing.lost


def test_a_chain_of_escaped_names_moves_one_link_a_night_and_the_owner_of_a_taken_name_waits():
    x = rec("a.part-00000.parquet", ["a.part-00000.parquet"])
    y = rec("a.part-00000~.parquet", ["a.part-00000~.parquet"])  # x's new name is y's old one
    intact = {"a.part-00000.parquet": facts(x.input), "a.part-00000~.parquet": facts(y.input)}
    first = move(x, y, facts_by_name=intact)
    assert first.copies == [("a.part-00000~.parquet", "a.part-00000~~.parquet")] and first.taken == ["a.part-00000.parquet"]
    pending = [plan.Listed(n, n, 1, "etag:1") for n in ["a.parquet", "b.parquet"]]
    assert list(plan.collisions(pending, first.taken)) == ["a.parquet"]
    y_moved = next(r for r in first.records if r.input == y.input)
    second = move(x, y_moved, facts_by_name=intact)
    assert second.copies == [("a.part-00000.parquet", "a.part-00000~.parquet")] and not second.taken


def test_multi_part_outputs_of_an_escaped_input_move_together():
    y = rec("a.part-00000~.parquet", ["a.part-00000~.part-00000.parquet", "a.part-00000~.part-00001.parquet"])
    moving = move(y, facts_by_name={n: facts(y.input, f"{k}/2") for k, n in enumerate(y.outputs)})
    assert moving.records[0].outputs == ["a.part-00000~~.part-00000.parquet", "a.part-00000~~.part-00001.parquet"]
    assert moving.delete == sorted(y.outputs)


def write_output(out: storage.Location, name: str, labelled: str, part: str = "0/1") -> None:
    table = pa.table({"text": ["x"], "label": ["positive"]})
    meta = {"textlabel.input": labelled, "textlabel.part": part, "textlabel.model": "m"}
    storage.write_bytes(out.join(*name.split("/")), _parquet(table.replace_schema_metadata(meta)))


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_the_first_run_moves_misnamed_outputs_on_disk_and_records_them(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    old = Manifest.load(out)
    old.run = "20250101T000000Z-a0a0a0"
    old.claim("s3://corpus/")
    old.write_segment([rec("a.part-00000.parquet", ["a.part-00000.parquet"]), rec("b.parquet", ["b.parquet"])], 1)
    write_output(out, "a.part-00000.parquet", "a.part-00000.parquet")
    write_output(out, "b.parquet", "b.parquet")
    manifest = Manifest.load(out)
    manifest.run = "20250102T000000Z-b1b1b1"
    selection = plan.Selection([plan.Listed("a.parquet", "in/a.parquet", 10, "etag:1")], 2, [])
    run = SimpleNamespace(manifest=manifest, selection=selection, cfg=SimpleNamespace(input="s3://corpus"), lease=None,
                          wrote=False)
    assert sweep.move_misnamed(run) == {} and run.wrote
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["a.part-00000~.parquet", "b.parquet"]
    assert sweep.read_facts(out, "a.part-00000~.parquet")["input"] == "a.part-00000.parquet"
    after = Manifest.load(out).records(["a.part-00000.parquet", "b.parquet"])
    assert after["a.part-00000.parquet"].outputs == ["a.part-00000~.parquet"] and after["b.parquet"].outputs == ["b.parquet"]
    again = SimpleNamespace(manifest=Manifest.load(out), selection=selection, cfg=run.cfg, lease=None, wrote=False)
    assert sweep.move_misnamed(again) == {} and not again.wrote  # nothing left to move: nothing written
