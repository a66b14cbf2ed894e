"""Sizing the predictor actor pool to the machines it runs on.

``--num-actors auto`` (the default): on GPUs, one actor per GPU, each with a few CPUs to
read and tokenize ahead of it; on CPUs, every core busy and none oversubscribed: many actors
of few model threads (``cpu_threads``: one thread per actor up to 15 cores, then one more
per 8 cores, at most MAX_THREADS), as many actors as fit each node's cores. Processes
beat threads for encoders this small: on 2 cores, 2 actors x 1 thread labelled 389.5
rows/s against 372.8 for 1 actor x 2 threads (README, "Measured figures"), and more actors
run more units at once. Explicit ``N`` or ``MIN,MAX`` and
``--cpus-per-actor``/``--threads-per-actor`` override. ``size_pool`` is pure (unit-tested);
``cluster`` asks Ray what there is.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from textlabel.config import ConfigError

logger = logging.getLogger(__name__)

MAX_THREADS = 4  # model threads per CPU actor
GPU_FEED_CPUS = 8  # most CPUs a GPU actor reserves to read and tokenize ahead


@dataclass(frozen=True)
class Cluster:
    """What Ray reports: CPUs and GPUs per alive node."""

    node_cpus: tuple[float, ...]
    node_gpus: tuple[float, ...]

    @property
    def cpus(self) -> float:
        return sum(self.node_cpus)

    @property
    def gpus(self) -> float:
        return sum(self.node_gpus)


@dataclass(frozen=True)
class Pool:
    """The predictor pool a run uses, and why (logged, and in the summary)."""

    min_actors: int
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def size_pool(explicit: tuple[int, int] | None, cluster: Cluster, use_gpu: bool, units: int | None,
              cpus_per_actor: float | None = None, gpus_per_actor: float = 1.0, threads: int | None = None) -> Pool:
    """The pool for ``units`` units of work on ``cluster`` (``explicit``: --num-actors MIN,MAX, None for auto):
    no more actors than units (None: not capped yet). Auto sizes to what the cluster has when the run starts."""
    if use_gpu:
        per_gpu = min((c / g for c, g in zip(cluster.node_cpus, cluster.node_gpus) if g), default=1.0)
        cpus = cpus_per_actor or max(1.0, min(GPU_FEED_CPUS, per_gpu - 1))
        lo = hi = max(1, int(cluster.gpus // gpus_per_actor))
        lo, hi = explicit or (lo, hi)
        why = "as asked" if explicit else f"one per GPU ({cluster.gpus:g} GPUs), {cpus:g} CPUs each to read and tokenize"
        return capped(Pool(lo, hi, cpus, gpus_per_actor, threads or max(1, round(cpus)), why), units)
    if explicit:
        cpus = cpus_per_actor or float(threads or 1)
        return capped(Pool(*explicit, cpus, 0.0, threads or max(1, round(cpus)), "as asked"), units)
    node = max(cluster.node_cpus, default=0.0)
    per_actor = threads or cpu_threads(node)
    cpus = cpus_per_actor or float(per_actor)
    actors = sum(int(c // cpus) for c in cluster.node_cpus) or 1
    why = (f"{cluster.cpus:g} CPUs on {len(cluster.node_cpus)} node(s): {actors} actor(s) x {per_actor} model thread(s)"
           if node >= 1 else "no CPUs yet (an autoscaling cluster): one actor, which waits for a node")
    return capped(Pool(actors, actors, cpus, 0.0, per_actor, why), units)


def cpu_threads(node_cpus: float) -> int:
    """Torch threads per CPU actor on a node of ``node_cpus`` cores: 1 up to 15 cores, then cores // 8, at most
    MAX_THREADS (fewer, bigger actors past that keep memory per node bounded: about 0.6 GB an actor)."""
    return max(1, min(MAX_THREADS, int(node_cpus) // 8))


def capped(pool: Pool, units: int) -> Pool:
    """The pool with no more actors than ``units`` units of work."""
    if units is None:
        return pool
    hi = max(1, min(pool.max_actors, units))
    why = pool.why if hi == pool.max_actors else f"{pool.why}; capped at {units} unit(s) of work"
    return Pool(min(pool.min_actors, hi), hi, pool.cpus_per_actor, pool.gpus_per_actor, pool.threads, why)


def cluster() -> Cluster:
    """The alive nodes' CPUs and GPUs (Ray must be running)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return Cluster(tuple(n["Resources"].get("CPU", 0.0) for n in nodes), tuple(n["Resources"].get("GPU", 0.0) for n in nodes))


def check_fits(pool: Pool, found: Cluster) -> None:
    """Refuse a pool that cannot run on this one-node cluster (a cluster of several nodes may grow: warn)."""
    need = pool.max_actors * pool.cpus_per_actor
    if pool.gpus_per_actor or need <= found.cpus:
        return
    if len(found.node_cpus) > 1 or found.cpus == 0:
        logger.warning("the predictor pool (%d x %g CPUs) may take all %g CPUs the cluster has now",
                       pool.max_actors, pool.cpus_per_actor, found.cpus)
        return
    raise ConfigError([f"{pool.max_actors} predictor actors x --cpus-per-actor {pool.cpus_per_actor} need more than "
                       f"the cluster's {found.cpus:g} CPUs; lower --num-actors or --cpus-per-actor"])


def for_job(options, units: int | None) -> Pool:
    """The pool a job's inference options (config.InferenceOptions) give for ``units`` units on the running
    Ray cluster, checked to fit and logged; with ``units`` None, the pool before the work is cut for it (its
    actors: how many units to cut), neither capped nor checked."""
    found = cluster()
    pool = size_pool(options.actors(), found, options.use_gpu, units, options.cpus_per_actor, options.gpus_per_actor,
                     options.threads_per_actor)
    if units is None:
        return pool
    check_fits(pool, found)
    logger.info("predictor pool: %d-%d actors x %g CPUs, %d model thread(s) each (%s)", pool.min_actors,
                pool.max_actors, pool.cpus_per_actor, pool.threads, pool.why)
    return pool
