"""Config parsing (config.py): options, their checks, --help, the README tables and the shipped configs."""

import dataclasses
import subprocess
import sys

import pytest

from textlabel.config import (ConfigError, EvaluateConfig, LabelConfig, PromoteConfig, SearchConfig, TrainConfig,
                              options_markdown, parse_config)


def parse(argv):
    return parse_config(TrainConfig, argv, "textlabel train", "test")


def test_flags_override_yaml_and_defaults(tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("data: s3://b/train/\noutput: s3://b/out\nepochs: 5\nlearning-rate: 0.001\nuse_gpu: true\n")
    cfg = parse(["--config", str(cfg_file), "--epochs", "7", "--no-use-gpu"])
    assert (cfg.data, cfg.output, cfg.epochs, cfg.learning_rate, cfg.use_gpu) == ("s3://b/train/", "s3://b/out", 7, 0.001, False)
    assert cfg.batch_size == 32 and cfg.max_length == 128 and cfg.num_workers == 2


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse(["--epochs", "0", "--val-fraction", "1.5", "--text-column", "x", "--label-column", "x"])
    text = str(err.value)
    for expected in ["--data is required", "--output is required", "--epochs must be > 0", "--val-fraction", "both 'x'"]:
        assert expected in text


def test_unknown_and_mistyped_yaml_keys_are_named(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("data: x.tsv\noutput: out\nepoch: 3\nbatch_size: many\n")
    with pytest.raises(ConfigError) as err:
        parse(["--config", str(cfg_file)])
    assert "unknown option 'epoch'" in str(err.value)
    assert "'batch_size': expected int" in str(err.value)


def test_help_documents_every_option(repo_root):
    out = subprocess.run([sys.executable, str(repo_root / "jobs/train.py"), "--help"], capture_output=True, text=True, check=True).stdout
    out = " ".join(out.split())
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out
    assert "--config" in out and "Default: the packaged" in out


@pytest.mark.parametrize("cls, beyond", [(TrainConfig, None), (LabelConfig, None), (EvaluateConfig, None),
                                         (SearchConfig, TrainConfig), (PromoteConfig, None)])
def test_readme_documents_every_option(repo_root, cls, beyond):
    assert options_markdown(cls, beyond) in (repo_root / "README.md").read_text()


def test_label_pool_and_option_checks():
    base = ["--model", "m", "--input", "s3://b/in/", "--output", "s3://b/out/"]
    assert parse_label(base + ["--num-actors", "2,8"]).actors() == (2, 8)
    assert parse_label(base).actors() is None  # auto: sized to the cluster when the run starts
    assert parse_label(base + ["--num-actors", "3"]).actors() == (3, 3)
    with pytest.raises(ConfigError) as err:
        parse_label(["--model", "m", "--input", "s3://b/x/", "--output", "s3://b/x/labels", "--num-actors", "3,1",
                     "--quantize", "--use-gpu", "--max-batch-tokens", "0"])
    for expected in ["--num-actors must be auto, N or MIN,MAX", "--quantize is for CPU", "--max-batch-tokens must be > 0",
                     "--output must not be --input or inside it"]:
        assert expected in str(err.value)
    with pytest.raises(ConfigError, match="--compile is for GPU inference"):
        parse_label(base + ["--compile"])


def parse_label(argv):
    return parse_config(LabelConfig, argv, "textlabel label", "test")


@pytest.mark.parametrize("command", ["train", "label", "evaluate", "tune", "promote"])
def test_console_script_runs_each_job(command):
    from pathlib import Path

    script = Path(sys.executable).parent / "textlabel"
    out = subprocess.run([str(script), command, "--help"], capture_output=True, text=True, check=True).stdout
    assert f"usage: textlabel {command}" in out and "--model" in out


@pytest.mark.parametrize("name, cls", [("train.yaml", TrainConfig), ("train-lora.yaml", TrainConfig),
                                       ("label.yaml", LabelConfig)])
def test_every_shipped_config_loads(repo_root, name, cls):
    cfg = parse_config(cls, ["--config", str(repo_root / "jobs/configs" / name)], "t", "t")
    assert cfg.use_gpu


def test_the_shipped_search_space_loads_with_the_shipped_training_config(repo_root):
    configs = repo_root / "jobs" / "configs"
    cfg = parse_config(SearchConfig, ["--config", str(configs / "train.yaml"), "--search-space",
                                      str(configs / "search-space.yaml"), "--num-samples", "16"], "t", "t")
    from textlabel.search import load_space

    assert cfg.num_samples == 16 and set(load_space(cfg.search_space)) == {
        "learning_rate", "head_learning_rate", "batch_size", "warmup_ratio", "max_length"}


def test_lora_options():
    base = ["--data", "d.parquet", "--output", "o"]
    assert parse(base).lora_settings() is None
    assert parse(base + ["--lora", "--lora-target-modules", "q_proj", "--lora-target-modules", "v_proj"]).lora_settings() == {
        "rank": 8, "alpha": 16.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(ConfigError) as refused:
        parse(base + ["--lora-rank", "4"])
    assert "--lora-rank: LoRA options without --lora; add --lora or drop them" in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        parse(base + ["--lora", "--lora-rank", "0", "--lora-dropout", "1"])
    assert "--lora-rank must be > 0, got 0" in str(refused.value) and "--lora-dropout must be in [0, 1)" in str(refused.value)


def test_tasks_from_repeated_label_columns_or_weighted_yaml(tmp_path):
    base = ["--data", "d.parquet", "--output", "o"]
    assert parse(base).task_list() == [("label", 1.0)]
    assert parse(base + ["--label-column", "coarse", "--label-column", "fine"]).task_list() == [("coarse", 1.0), ("fine", 1.0)]
    assert parse(base + ["--tasks", "coarse=0.5", "--tasks", "fine"]).task_list() == [("coarse", 0.5), ("fine", 1.0)]
    cfg_file = tmp_path / "mt.yaml"
    cfg_file.write_text("data: d.parquet\noutput: o\ntasks:\n  - {column: coarse, weight: 0.3}\n  - {column: fine}\n")
    assert parse(["--config", str(cfg_file)]).task_list() == [("coarse", 0.3), ("fine", 1.0)]
    cfg_file.write_text("data: d.parquet\noutput: o\nlabel_column: sentiment\n")  # one column, as before
    assert parse(["--config", str(cfg_file)]).task_list() == [("sentiment", 1.0)]
    with pytest.raises(ConfigError) as err:
        parse(base + ["--label-column", "a", "--tasks", "b=1"])
    assert "either --label-column or --tasks" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse(base + ["--tasks", "a=-1", "--tasks", "a=x"])
    assert "expected COLUMN=WEIGHT" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse(base + ["--label-column", "a", "--label-column", "a"])
    assert "given twice" in str(err.value)


def test_long_text_options_on_every_job(tmp_path):
    base = ["--model", "m", "--input", "s3://b/in/", "--output", "s3://b/out/"]
    long = parse_label(base + ["--long-texts", "chunk", "--max-length", "256"]).long()
    assert (long.chunked, long.overlap_for(256), long.max_chunks) == (True, 64, 64)  # a quarter of the window
    config = tmp_path / "train.yaml"
    config.write_text("data: d.parquet\noutput: out\nlong_texts: chunk\nchunk_overlap: 0\nmax_chunks: 8\n")
    assert parse(["--config", str(config)]).long() == type(long)("chunk", 0, 8)
    with pytest.raises(ConfigError) as err:
        parse_label(base + ["--long-texts", "split", "--chunk-overlap", "65", "--max-chunks", "0"])
    assert [p.split(" ")[0] for p in err.value.problems] == ["--long-texts", "--max-chunks", "--chunk-overlap"]


def test_min_score_is_one_number_or_per_class_from_yaml(tmp_path):
    base = ["--model", "m", "--input", "s3://b/in/", "--output", "s3://b/out/"]
    assert parse_label(base).thresholds(["ham", "spam"]) is None  # never abstain
    assert parse_label(base + ["--min-score", "0.7"]).thresholds(["ham", "spam"]).tolist() == [0.7, 0.7]
    assert parse_label(base + ["--min-score", "spam=0.9,*=0.6"]).thresholds(["ham", "spam"]).tolist() == [0.6, 0.9]
    cfg_file = tmp_path / "label.yaml"
    cfg_file.write_text("min_score: {spam: 0.9}\nmax_drift: 0.1\n")
    cfg = parse_label(base + ["--config", str(cfg_file)])
    assert cfg.thresholds(["ham", "spam"]).tolist() == [0.0, 0.9] and cfg.max_drift == 0.1
    with pytest.raises(ConfigError) as err:
        parse_label(base + ["--min-score", "spam=high", "--max-drift", "0"])
    assert "--min-score must be a score in [0, 1]" in str(err.value) and "--max-drift must be > 0" in str(err.value)
