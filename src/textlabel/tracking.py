"""MLflow, opt-in: a training run's settings, epochs, report and model in a tracking server; the model registry.

Nothing here imports MLflow unless tracking is configured (``--mlflow-tracking-uri`` or ``MLFLOW_TRACKING_URI``).
Only MLflow's client is used (``MlflowClient`` with an explicit tracking URI, no process-global state), so the
driver and the rank-0 worker log to the same run by its id.

A training output remembers its MLflow run in ``OUTPUT/mlflow_run.json``: a resumed run logs into the same one.
A registered model is named ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; the labelling job resolves that
once, on the driver, to the version's artifact (``resolve``).

A tracking URI may carry ``user:password@``: MLflow's client connects with it, and everything written or logged
here (params, tags, ``mlflow_run.json``, what metrics.json records, messages) holds it redacted (redact.py).
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import unquote, urlparse

from textlabel import storage
from textlabel.config import ConfigError
from textlabel.redact import redact, redact_values

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
MODEL_ARTIFACT = "model"
REGISTRY_PREFIX = "models:/"


@dataclasses.dataclass
class Run:
    """Where a training run logs: the tracking server and the run's id."""

    tracking_uri: str
    experiment: str
    run_id: str

    @property
    def model_uri(self) -> str:
        return f"runs:/{self.run_id}/{MODEL_ARTIFACT}"


@dataclasses.dataclass
class Registered:
    """A registered model version, resolved: what the labelling job loads and records."""

    name: str
    version: str
    alias: str | None
    source: str  # the version's artifact: s3://..., a local directory, or its address on the tracking server

    def describe(self, alias: bool = True) -> str:
        return f"models:/{self.name}/{self.version}" + (f" (@{self.alias})" if self.alias and alias else "")

    def record(self) -> dict[str, str | None]:
        """What the summary records of it (the source redacted: a served one carries the tracking URI's userinfo)."""
        return {"name": self.name, "version": self.version, "alias": self.alias, "source": redact(self.source)}


def tracking_uri(option: str | None) -> str | None:
    """The tracking server: --mlflow-tracking-uri, else MLFLOW_TRACKING_URI, else None (no tracking). A malformed
    one is a ConfigError naming where it came from."""
    uri = option or os.environ.get("MLFLOW_TRACKING_URI") or None
    problem = uri_problem(uri) if uri else None
    if problem:
        source = "--mlflow-tracking-uri" if option else "MLFLOW_TRACKING_URI"
        raise ConfigError([f"{source} {redact(uri)}: {problem}; give it as http(s)://[user:password@]host[:port] "
                           "(percent-encode '@', ':', '/', '?' and '#' inside a user name or password)"])
    return uri


def uri_problem(uri: str) -> str | None:
    """What makes a tracking URI unusable before a request is sent (urllib and MLflow raise a traceback on it),
    or None. The text names no part of the userinfo."""
    parts = urlparse(uri)
    if not parts.netloc:
        return None  # file:, sqlite:, databricks: MLflow's client says what is wrong with one of those
    if parts.scheme in ("http", "https") and not parts.hostname:
        return "it names no host"
    try:
        parts.port
    except ValueError:  # (its text would quote the port, which may be part of a password)
        return "its port is not a number from 0 to 65535 (or its password holds an unencoded '/', '?' or '#')"
    if parts.netloc.endswith(":"):
        return "its ':' is followed by no port"
    return None


def _client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError([f"MLflow tracking ({redact(uri)}) needs MLflow's client: pip install -e '.[mlflow]' from the "
                           "repository (or pip install mlflow-skinny); cluster.yaml installs it"]) from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def health_request(uri: str) -> urllib.request.Request:
    """The request that probes an http(s) tracking server's ``/health``: a ``user:password@`` goes as a Basic
    Authorization header, as MLflow's client (requests) sends it; urllib would take it for the host."""
    parts = urlparse(uri)
    host = parts.netloc.rpartition("@")[2]
    url = parts._replace(netloc=host).geturl().rstrip("/") + "/health"
    request = urllib.request.Request(url)
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    return request


def _reachable(client, uri: str) -> None:
    """Fail in seconds, naming the server, rather than after training (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return  # a local store (file:, sqlite:) or a managed one: MLflow's client says what is wrong with it
    try:
        with urllib.request.urlopen(health_request(uri), timeout=10):
            return
    except urllib.error.HTTPError:
        return  # it answers (a proxy in front may not serve /health): the client's calls will say more
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise ConfigError([f"--mlflow-tracking-uri {redact(uri)}: the tracking server does not answer "
                           f"({redact(str(exc))}); start it, or fix the URI"]) from None


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """A run's settings as MLflow params (strings, at most 6,000 characters each; URI credentials redacted)."""
    return {k: redact(str(v))[:6000] for k, v in sorted(config.items())}


def same_server(recorded: str | None, uri: str) -> bool:
    """Whether a recorded tracking URI (redacted; an older record's as given) names the server ``uri`` names: a
    rotated password is the same server."""
    return recorded in (uri, redact(uri))


def epoch_metrics(epoch: dict[str, Any]) -> dict[str, float]:
    """One metrics.json epoch as MLflow metrics: every number, each task's figures as ``val_<task>_<name>`` and
    ``train_<task>_loss``."""
    found = {k: float(v) for k, v in epoch.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
    for task, figures in epoch.get("val_tasks", {}).items():
        found |= {f"val_{task}_{k}": float(figures[k]) for k in ("loss", "accuracy", "macro_f1")}
    for task, loss in epoch.get("train_task_loss", {}).items():
        found[f"train_{task}_loss"] = float(loss)
    return found


def start_run(uri: str, experiment: str, out: storage.Location, config: dict[str, Any]) -> Run:
    """The MLflow run of a training output: the one it already has (a resumed run), else a new one in
    ``experiment`` with the settings as params. Called on the driver before training."""
    client = _client(uri)
    _reachable(client, uri)
    found = out.join(RUN_FILE)
    if storage.exists(found):
        saved = storage.read_json(found)
        if same_server(saved["tracking_uri"], uri):
            client.update_run(saved["run_id"], status="RUNNING")
            logger.info("MLflow: continuing run %s in experiment %r", saved["run_id"], saved["experiment"])
            return Run(uri, saved["experiment"], saved["run_id"])
        logger.warning("MLflow: %s was tracked at %s, this run at %s: starting a new MLflow run", out.url,
                       redact(saved["tracking_uri"]), redact(uri))
    existing = client.get_experiment_by_name(experiment)
    experiment_id = existing.experiment_id if existing else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=out.url.rstrip("/").rsplit("/", 1)[-1],
                            tags={"textlabel.output": redact(out.url)})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat_params(config).items()])
    storage.write_json(found, {"tracking_uri": redact(uri), "experiment": experiment, "run_id": run.info.run_id})
    logger.info("MLflow: run %s in experiment %r at %s", run.info.run_id, experiment, redact(uri))
    return Run(uri, experiment, run.info.run_id)


def log_epoch(run: dict[str, str], epoch: dict[str, Any]) -> None:
    """One epoch's metrics, logged by the rank-0 worker as the epoch ends (step = the epoch's number)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, int(epoch["epoch"])) for k, v in epoch_metrics(epoch).items()]
    try:
        _client(run["tracking_uri"]).log_batch(run["run_id"], metrics=metrics)
    except Exception as exc:  # tracking is a record of the run, never a reason to lose it
        # (redacted here: a worker's lines reach the job's log without the driver's logging filter)
        logger.warning("MLflow: epoch %d's metrics were not logged (%s); they are in the checkpoint", epoch["epoch"],
                       redact(str(exc)))


def finish_run(run: Run, out: storage.Location, metrics: dict[str, Any], register: str | None) -> dict[str, Any]:
    """After training: the report, metrics.json and the model (with its label map) as artifacts, the best epoch's
    figures as summary metrics, the run marked finished; with ``register``, a new version of that registered
    model. Returns what metrics.json records of it."""
    from mlflow.entities import Metric

    client = _client(run.tracking_uri)
    now = int(time.time() * 1000)
    best = {f"best_{k}": v for k, v in epoch_metrics(metrics["validation"]).items() if k.startswith("val_")}
    client.log_batch(run.run_id, metrics=[Metric(k, v, now, int(metrics["best_epoch"])) for k, v in best.items()]
                     + [Metric("best_epoch", float(metrics["best_epoch"]), now, 0)])
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("model", "report"):
            storage.copy_tree(out.join(name), storage.resolve(os.path.join(tmp, name)))
            client.log_artifacts(run.run_id, os.path.join(tmp, name), name)
    labels = {"labels": metrics["labels"], **({"tasks": metrics["tasks"]} if "tasks" in metrics else {})}
    client.log_dict(run.run_id, labels, f"{MODEL_ARTIFACT}/label_map.json")
    client.log_dict(run.run_id, redact_values(metrics), "metrics.json")
    client.set_terminated(run.run_id, "FINISHED")
    record: dict[str, Any] = {"tracking_uri": redact(run.tracking_uri), "experiment": run.experiment, "run_id": run.run_id,
                              "model_uri": run.model_uri}
    if register:  # once per run: a resumed run that registered already keeps its version
        earlier = client.search_model_versions(f"name='{register}' and run_id='{run.run_id}'")
        version = (str(max(int(v.version) for v in earlier)) if earlier
                   else register_version(client, register, run.model_uri, run.run_id))
        record["registered"] = {"name": register, "version": version}
    return record


def register_version(client, name: str, source: str, run_id: str | None) -> str:
    """A new version of registered model ``name`` (created if new) whose artifact is ``source``."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    if source.startswith("runs:/"):
        run_id, path = source[len("runs:/"):].split("/", 1)
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
    version = client.create_model_version(name, source, run_id=run_id)
    logger.info("MLflow: registered %s version %s (%s)", name, version.version, redact(source))
    return str(version.version)


def promote(model: str, name: str, aliases: list[str], uri: str | None, experiment: str) -> Registered:
    """``textlabel promote``: register a trained model directory as a new version of ``name``. A model whose
    training run was tracked is registered from that run's artifact; any other is first logged as the artifact
    of a new run in ``experiment``."""
    from textlabel import model as model_lib

    uri = tracking_uri(uri)
    if uri is None:
        raise ConfigError(["promote needs a tracking server: --mlflow-tracking-uri or MLFLOW_TRACKING_URI"])
    model_lib.check_model_dir(model)
    client = _client(uri)
    _reachable(client, uri)
    loc = storage.resolve(model)
    parent = loc.url.rstrip("/").rsplit("/", 1)[0]
    tracked = storage.resolve(parent).join(RUN_FILE)
    saved = storage.read_json(tracked) if storage.exists(tracked) else None
    if saved and same_server(saved["tracking_uri"], uri) and loc.url.rstrip("/").endswith("/" + MODEL_ARTIFACT) and _has_model(client, saved["run_id"]):
        run_id = saved["run_id"]
    else:
        existing = client.get_experiment_by_name(experiment)
        experiment_id = existing.experiment_id if existing else client.create_experiment(experiment)
        run_id = client.create_run(experiment_id, run_name=f"promote {name}", tags={"textlabel.model": redact(loc.url)}).info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            storage.copy_dir(loc, storage.resolve(tmp))
            client.log_artifacts(run_id, tmp, MODEL_ARTIFACT)
        client.set_terminated(run_id, "FINISHED")
    version = register_version(client, name, f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
        logger.info("MLflow: %s@%s is now version %s", name, alias, version)
    return Registered(name, version, aliases[0] if aliases else None, client.get_model_version_download_uri(name, version))


def _has_model(client, run_id: str) -> bool:
    return any(f.path == f"{MODEL_ARTIFACT}/config.json" for f in client.list_artifacts(run_id, MODEL_ARTIFACT))


def is_registered(model: str | None) -> bool:
    return bool(model) and model.startswith(REGISTRY_PREFIX)


def parse_registered(model: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME/VERSION`` -> (NAME, VERSION, None); ``models:/NAME@ALIAS`` -> (NAME, None, ALIAS)."""
    rest = model[len(REGISTRY_PREFIX):].strip("/")
    if "@" in rest and "/" not in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, None, alias
    elif rest.count("/") == 1:
        name, version = rest.split("/")
        if name and version.isdigit():
            return name, version, None
    raise ConfigError([f"--model {model}: expected models:/NAME/VERSION or models:/NAME@ALIAS"])


def resolve(model: str, uri: str | None) -> Registered:
    """A registered model version, resolved once (on the driver) to its artifact. An artifact the storage layer
    reads (s3://, a local directory) is used where it is; one the tracking server serves (``mlflow-artifacts:``)
    becomes its HTTP address on that server, which every actor can fetch from (``served``)."""
    uri = tracking_uri(uri)
    if uri is None:
        raise ConfigError([f"--model {model} needs the tracking server: --mlflow-tracking-uri or MLFLOW_TRACKING_URI"])
    name, version, alias = parse_registered(model)
    client = _client(uri)
    _reachable(client, uri)
    from mlflow.exceptions import MlflowException

    try:
        version = str(client.get_model_version_by_alias(name, alias).version) if alias else version
        source = client.get_model_version_download_uri(name, version)
    except MlflowException as exc:
        raise ConfigError([f"--model {model}: {redact(exc.message)}; list the versions with the MLflow UI or client"]) from None
    if urlparse(source).scheme == "mlflow-artifacts":  # served by the tracking server: its HTTP address
        from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

        source = MlflowArtifactsRepository.resolve_uri(source, uri)
    found = Registered(name, version, alias, source)
    logger.info("--model %s is %s: %s", model, found.describe(), redact(source))
    return found


def served(model: str | None) -> bool:
    """Whether a --model is a registered model's artifact on the tracking server (what ``resolve`` returns for one)."""
    return bool(model) and model.startswith(("http://", "https://")) and "/api/2.0/mlflow-artifacts/artifacts/" in model


def fetch(source: str, target: str) -> None:
    """Download an artifact the tracking server serves (an actor fetching a resolved registered model)."""
    try:
        import mlflow.artifacts
    except ImportError:
        raise RuntimeError(f"{redact(source)}: fetching a model from the MLflow server needs MLflow's client on every node: "
                           "pip install -e '.[mlflow]' (cluster.yaml installs it)") from None
    mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=target)
