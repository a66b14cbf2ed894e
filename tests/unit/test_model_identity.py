"""A model's identity is its content (model.identity): the same model at another path is the same model; another
label map, tokenizer, temperature or weights is another; identities an older textlabel recorded (its path and
weights) still name the same weights (model.same_model), in the manifest's check and in the sweep's adoption."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from textlabel import label, plan, storage, sweep
from textlabel import model as model_lib
from textlabel.config import ConfigError
from textlabel.records import FileRecord, Status, records_table

SHAPE = re.compile(r"sha256:[0-9a-f]{16} \(config (?P<config>[0-9a-f]{8}), tokenizer (?P<tokenizer>[0-9a-f]{8}), "
                   r"(?P<calibration>uncalibrated|temperature [0-9.]+)\) \[(?P<weights>model\.safetensors sha256:[0-9a-f]{16})\]")


def parts(identity: str) -> dict[str, str]:
    """An identity's readable parts (its leading hash aside)."""
    return SHAPE.fullmatch(identity).groupdict()


def copy(tiny_model: str, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / name))


def edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, **changes}, indent=1))


def legacy(path: str, current: str) -> str:
    """What textlabel recorded for the model ``current`` at ``path`` before identities were content."""
    return path + current[current.rindex(" ["):]


def test_the_same_model_at_another_path_is_the_same_model(tiny_model, tmp_path):
    first = model_lib.identity(tiny_model)
    assert SHAPE.fullmatch(first), first
    assert str(tiny_model) not in first
    moved = copy(tiny_model, tmp_path, "moved")
    edit_json(moved / "config.json", transformers_version="9.9.9")  # saved again by another transformers
    edit_json(moved / "tokenizer_config.json", is_local=False)  # loaded from elsewhere before it was saved
    assert model_lib.identity(str(moved)) == model_lib.identity(f"file://{moved}") == first


def test_a_changed_label_map_tokenizer_temperature_or_weights_is_another_model(tiny_model, tmp_path):
    first = model_lib.identity(tiny_model)
    relabelled = copy(tiny_model, tmp_path, "labels")
    edit_json(relabelled / "config.json", id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
    cased = copy(tiny_model, tmp_path, "tokenizer")
    edit_json(cased / "tokenizer_config.json", do_lower_case=False)
    calibrated = copy(tiny_model, tmp_path, "calibrated")
    model_lib.write_extras(str(calibrated), {"tasks": [{"name": "label", "temperature": 1.5}]}, [])
    retrained = copy(tiny_model, tmp_path, "weights")
    data = bytearray((retrained / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (retrained / "model.safetensors").write_bytes(bytes(data))
    found = {name: model_lib.identity(str(path)) for name, path in
             [("labels", relabelled), ("tokenizer", cased), ("calibrated", calibrated), ("weights", retrained)]}
    assert len(set(found.values()) | {first}) == 5
    assert "temperature 1.5" in found["calibrated"]
    changed = {name: [k for k, v in parts(found[name]).items() if v != parts(first)[k]] for name in found}
    assert changed == {"labels": ["config"], "tokenizer": ["tokenizer"], "calibrated": ["calibration"],
                       "weights": ["weights"]}


def test_an_identity_recorded_before_is_the_same_model_when_its_weights_are(tiny_model, tmp_path):
    current = model_lib.identity(tiny_model)
    assert model_lib.same_model(current, current)
    assert model_lib.same_model(legacy("/old/home/of/the/model", current), current)
    assert model_lib.same_model(legacy("models:/sentiment/2", current), current)  # a registered version's, before
    assert not model_lib.same_model("/old/home [model.safetensors sha256:0000000000000000]", current)
    calibrated = copy(tiny_model, tmp_path, "calibrated")
    model_lib.write_extras(str(calibrated), {"tasks": [{"name": "label", "temperature": 2.0}]}, [])
    other = model_lib.identity(str(calibrated))  # today's form: its content decides, though the weights are the same
    assert not model_lib.same_model(other, current) and not model_lib.same_model(current, other)
    assert not model_lib.same_model("bert-base-uncased", current)


def night(tiny_model: str, recorded: list[str], **options) -> SimpleNamespace:
    records = [FileRecord(f"f{i}.parquet", "etag:1", 10, Status.DONE, [f"f{i}.parquet"], 1, 1, model=m)
               for i, m in enumerate(recorded)]
    cfg = SimpleNamespace(input="s3://corpus/", output="s3://labels/", relabel=False, keep_old_labels=False, **options)
    return SimpleNamespace(cfg=cfg, manifest=SimpleNamespace(input="s3://corpus/", state=records_table(records)),
                           model_id=model_lib.identity(tiny_model))


def test_a_manifest_of_older_identities_keeps_working_and_another_model_is_refused(tiny_model, tmp_path):
    current = model_lib.identity(tiny_model)
    label._check_manifest(night(tiny_model, [legacy("/models/v1", current), current]))
    calibrated = copy(tiny_model, tmp_path, "calibrated")
    model_lib.write_extras(str(calibrated), {"tasks": [{"name": "label", "temperature": 2.0}]}, [])
    other = model_lib.identity(str(calibrated))
    with pytest.raises(ConfigError, match="another model"):
        label._check_manifest(night(tiny_model, [current, other]))
    with pytest.raises(ConfigError, match="another model"):
        label._check_manifest(night(tiny_model, ["/models/v0 [model.safetensors sha256:0000000000000000]"]))


def test_a_killed_runs_outputs_under_an_older_identity_are_adopted(tiny_model, tmp_path):
    current = model_lib.identity(tiny_model)
    out = storage.resolve(str(tmp_path / "out"))
    meta = {"input": "a.parquet", "input_version": "etag:1", "part": "0/1", "model": legacy("/models/v1", current),
            "run": "r0", "rows_in": "1", "rows_skipped": "{}", "rows_truncated": "0"}
    table = pa.table({"text": ["x"]}).replace_schema_metadata({f"textlabel.{k}": v for k, v in meta.items()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(out.join("a.parquet"), sink.getvalue().to_pybytes())
    selection = plan.Selection([plan.Listed("a.parquet", "in/a.parquet", 10, "etag:1")], 0, [], orphans=["a.parquet"])
    adopted, stray = sweep.adopt(out, selection, current, relabel=False)
    assert [(r.input, r.outputs, r.model) for r in adopted] == [("a.parquet", ["a.parquet"], current)] and stray == []
