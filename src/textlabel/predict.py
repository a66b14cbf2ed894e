"""Turning texts into labels: the one inference path of the labelling and the evaluation jobs.

- ``prepare``: a text column to the token windows the model scores (one per row, or with
  ``--long-texts chunk`` several overlapping ones for a long row: chunking.py), truncation
  flags and skip reasons (rows that cannot be labelled keep a reason instead of a label).
  A cell is read in bytes, at most ``read_cap`` of them, before it becomes a Python string.
- ``token_batches``: rows sorted by length and cut into batches of at most
  ``max_tokens`` padded tokens (rows x longest row) and ``max_rows`` rows: one budget gives
  small batches of long rows and large batches of short ones, and bounds memory.
- ``Predictor``: a model (a list of tasks: one for a plain Hugging Face classifier) loaded
  once per process and run by a runtime (runtime.py): fp32 on CPU through ONNX Runtime, int8
  with ``quantize`` (rows whose top two probabilities are closer than ``recheck_margin`` are
  labelled again in full precision, all together at the end of a window), bf16 weights with
  SDPA attention through torch on a GPU, where a batch that runs out of memory is split in
  two and retried. Logits are divided by the model's temperature per task (calibration.py), so
  scores are calibrated probabilities. ``score`` combines a chunked row's windows into its
  probabilities; ``columns`` turns them into the output columns (a row under --min-score keeps
  its score, not its label), which ``output_columns`` names: the one definition of them.
- ``TableLabeller``: the Ray Data callable class the evaluation job maps over its rows.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from textlabel import calibration, chunking
from textlabel import model as model_lib
from textlabel import runtime as runtime_lib
from textlabel.chunking import LongTexts

logger = logging.getLogger(__name__)

# Why a row got no label. Each is counted in the run's summary and written in the skip_reason column.
SKIP_REASONS = {
    "null_text": "the text is null",
    "blank_text": "the text is empty or only whitespace",
    "not_text": "the text column holds non-text values (numbers, lists, ...)",
    "invalid_utf8": "the text's bytes (a string or a binary cell) are not valid UTF-8",
    "low_confidence": "its top score is under --min-score (the score is kept; the label is left to a person)",
}
# Texts are cut at this many characters per allowed token before tokenizing, so a 10 MB row
# cannot stall a batch. Ordinary text averages 4-5 characters a token, so the cut never moves
# the first max_length tokens; a cut row is flagged truncated (it was, by any reading).
CHARS_PER_TOKEN_CAP = 64
ROW_COLUMNS = ("truncated", "chunks", "skip_reason")  # after the tasks' label, label_id, score; chunks: chunk mode only
TASK_COLUMNS = ("label", "label_id", "score")
# Padded tokens per model batch. CPU: 2048 measured fastest for all-MiniLM-L6-v2 (1024 and 4096 slower);
# GPU: enough to fill an H200 with a BERT-base (see benchmarks/gpu_check.py).
DEFAULT_MAX_TOKENS = {"cpu": 2048, "gpu": 65536}


def output_columns(tasks: list[str | None], prefix: str = "", chunked: bool = False) -> list[str]:
    """The columns labelling adds, in order: label, label_id, score (``<task>_...`` for each task of a
    multi-task model), truncated, chunks (windows scored; with --long-texts chunk only), skip_reason; each
    after ``prefix``."""
    names = [f"{prefix}{task + '_' if task else ''}{c}" for task in tasks for c in TASK_COLUMNS]
    return names + [prefix + c for c in ROW_COLUMNS if chunked or c != "chunks"]


@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str | None):
    """The model's tokenizer, once per process (files come from the same cache as the model)."""
    return model_lib.load_tokenizer(model_lib.local_model_dir(model))


def is_text_type(kind: pa.DataType) -> bool:
    """Whether a column of this Arrow type holds text: strings or bytes (UTF-8 expected), or a dictionary of them."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(check(kind) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
                                         pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view))


def _invalid_utf8(cells: pa.Array) -> np.ndarray:
    """Which cells (large_binary) are not valid UTF-8, checked by Arrow without making Python objects: a valid
    column (the usual case) in one pass, else cell by cell."""
    bad = np.zeros(len(cells), dtype=bool)
    try:
        cells.view(pa.large_string()).validate(full=True)
        return bad
    except pa.ArrowInvalid:
        pass
    for i in range(len(cells)):
        try:
            cells.slice(i, 1).view(pa.large_string()).validate(full=True)
        except pa.ArrowInvalid:
            bad[i] = True
    return bad


def texts_of(column: pa.ChunkedArray | pa.Array, cap: int | None = None
             ) -> tuple[list[str | None], list[str | None], np.ndarray]:
    """The text of each row, or None with the reason it cannot be labelled (SKIP_REASONS); and how many of its
    bytes were not read. A cell is cut to its first ``cap`` bytes before it becomes a Python string, so a 1 GB
    cell costs no more than a short one; it is checked for valid UTF-8 whole, by Arrow, string or binary alike
    (Parquet readers do not check a string column's bytes)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    unread = np.zeros(len(column), dtype=np.int64)
    if not is_text_type(column.type):  # numbers, lists, ...: nothing here is text
        return [None] * len(column), ["null_text" if n else "not_text" for n in column.is_null().to_pylist()], unread
    cells = column.cast(pa.large_binary())
    bad = _invalid_utf8(cells)
    if cap is not None:
        unread = np.maximum(pc.binary_length(cells).fill_null(0).to_numpy() - cap, 0)
        cells = pc.binary_slice(cells, 0, cap)
    texts: list[str | None] = []
    reasons: list[str | None] = []
    for cell, invalid, more in zip(cells.to_pylist(), bad, unread):
        # The whole cell is valid UTF-8: "ignore" drops at most the one character the cap cut in two.
        text = None if cell is None or invalid else cell.decode("utf-8", "ignore")
        blank = text is not None and not more and not text.strip()
        reason = "null_text" if cell is None else "invalid_utf8" if invalid else "blank_text" if blank else None
        texts.append(None if reason else text)
        reasons.append(reason)
    return texts, reasons, unread


@dataclass
class Prepared:
    """Rows ready for the model: the token windows it scores and, per row, how they came about."""

    windows: list[list[int]]  # token ids, special tokens included: one per labelled row, more for a chunked one
    owner: np.ndarray  # the row of each window (ascending)
    truncated: np.ndarray  # bool per row: some of its text was not read
    reasons: list[str | None]  # skip reason per row (None: labelled)
    chunks: np.ndarray  # windows scored per row (0: not labelled)
    dropped: np.ndarray  # windows past --max-chunks per row
    chunked: bool = False  # --long-texts chunk (the output gains a chunks column)

    def __len__(self) -> int:
        return len(self.reasons)

    @classmethod
    def concat(cls, pieces: list["Prepared"], chunked: bool = False) -> "Prepared":
        """Pieces one after another, as one."""
        if not pieces:
            none = np.zeros(0, dtype=np.int64)
            return cls([], none, none.astype(bool), [], none, none, chunked)

        def joined(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in pieces])

        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        return cls([w for p in pieces for w in p.windows], np.concatenate([p.owner + s for p, s in zip(pieces, starts)]),
                   joined("truncated"), [r for p in pieces for r in p.reasons], joined("chunks"), joined("dropped"), chunked)


def read_cap(model: str | None, max_length: int, long: LongTexts | None = None) -> int:
    """Characters of a text worth reading (prepare reads no more bytes of a cell): CHARS_PER_TOKEN_CAP a token
    of one window, or with --long-texts chunk of the --max-chunks windows."""
    if long is None or not long.chunked:
        return CHARS_PER_TOKEN_CAP * max_length
    head, tail = specials(model)
    body = max_length - len(head) - len(tail)
    return CHARS_PER_TOKEN_CAP * chunking.covered(body, long.overlap_for(max_length), long.max_chunks)


def tokenize(model: str | None, texts: list[str | None], max_length: int, unread: np.ndarray | None = None
             ) -> tuple[list[list[int] | None], np.ndarray]:
    """Token ids (unpadded, at most max_length) per text, None for None; and which rows were truncated
    (``unread``: bytes per row already cut off before, texts_of)."""
    tok = tokenizer_for(model)
    cap = read_cap(model, max_length)
    keep = [i for i, t in enumerate(texts) if t is not None]
    cut = [texts[i][:cap] for i in keep]
    plain = {"padding": False, "return_attention_mask": False, "return_token_type_ids": False}
    # One token more than allowed tells a row that fits from one that must be cut.
    ids = tok(cut, truncation=True, max_length=max_length + 1, **plain)["input_ids"] if cut else []
    long = [k for k, row in enumerate(ids) if len(row) > max_length]
    if long:
        for k, row in zip(long, tok([cut[k] for k in long], truncation=True, max_length=max_length, **plain)["input_ids"]):
            ids[k] = row
    out: list[list[int] | None] = [None] * len(texts)
    truncated = np.zeros(len(texts), dtype=bool)
    for k, i in enumerate(keep):
        out[i] = ids[k]
    truncated[[keep[k] for k in long]] = True
    truncated[[i for i in keep if len(texts[i]) > cap]] = True
    if unread is not None:
        truncated |= unread > 0
    return out, truncated


@functools.lru_cache(maxsize=4)
def specials(model: str | None) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text ([CLS] and [SEP] for BERT; none for GPT-2)."""
    tok = tokenizer_for(model)
    bare = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    at = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    return full[:at], full[at + len(bare):]


def chunk(model: str | None, texts: list[str | None], max_length: int, long: LongTexts,
          unread: np.ndarray | None = None) -> Prepared:
    """Texts as overlapping windows of at most ``max_length`` tokens (chunking.spans), at most ``long.max_chunks`` each
    (``unread``: bytes per row already cut off before, texts_of)."""
    head, tail = specials(model)
    body, overlap = max_length - len(head) - len(tail), long.overlap_for(max_length)
    cap = read_cap(model, max_length, long)  # no more characters than max_chunks windows could use
    keep = [i for i, t in enumerate(texts) if t is not None]
    plain = {"add_special_tokens": False, "padding": False, "return_attention_mask": False, "return_token_type_ids": False,
             "verbose": False}  # no "longer than the model's maximum" warning: the windows are cut below
    ids = tokenizer_for(model)([texts[i][:cap] for i in keep], **plain)["input_ids"] if keep else []
    windows, owner = [], []
    chunks, dropped, truncated = (np.zeros(len(texts), dtype=np.int64) for _ in range(3))
    for i, row in zip(keep, ids):
        cut, lost = chunking.spans(len(row), body, overlap, long.max_chunks)
        left = max(len(texts[i]) - cap, 0) + (int(unread[i]) if unread is not None else 0)
        if left:  # the windows the unread characters would have made, at this text's rate
            lost += math.ceil(left * len(row) / max(1, min(len(texts[i]), cap)) / (body - overlap))
        windows += [head + row[a:b] + tail for a, b in cut]
        owner += [i] * len(cut)
        chunks[i], dropped[i], truncated[i] = len(cut), lost, lost > 0 or left > 0
    return Prepared(windows, np.array(owner, dtype=np.int64), truncated.astype(bool), [], chunks, dropped, True)


def prepare(model: str | None, column: pa.ChunkedArray | pa.Array, max_length: int, long: LongTexts | None = None) -> Prepared:
    """A text column, tokenized into the windows the model scores (no more of a cell read than read_cap)."""
    texts, reasons, unread = texts_of(column, read_cap(model, max_length, long))
    if long is not None and long.chunked:
        prepared = chunk(model, texts, max_length, long, unread)
        prepared.reasons = reasons
        return prepared
    tokens, truncated = tokenize(model, texts, max_length, unread)
    owner = np.array([i for i, t in enumerate(tokens) if t is not None], dtype=np.int64)
    chunks = np.array([t is not None for t in tokens], dtype=np.int64)
    return Prepared([t for t in tokens if t is not None], owner, truncated, reasons, chunks, np.zeros(len(tokens), np.int64))


def token_batches(lengths: np.ndarray, max_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Row indices sorted by length, cut into batches of at most ``max_tokens`` padded tokens (rows x the
    batch's longest row) and ``max_rows`` rows. A row longer than the budget is a batch alone."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and stop - start < max_rows and (stop - start + 1) * lengths[order[stop]] <= max_tokens:
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


@dataclass
class Stats:
    """What the model did (summed into the run's summary)."""

    rows: int = 0  # rows labelled
    windows: int = 0  # token windows scored (a chunked row has several)
    chunked_rows: int = 0  # rows scored in more than one window
    chunks_dropped: int = 0  # windows past --max-chunks, not scored
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0  # rows x longest row, summed: what the model computed
    model_seconds: float = 0.0
    rechecked: int = 0
    oom_splits: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Predictor:
    """A classifier (one or more tasks) loaded once per process: token ids in, probabilities out."""

    def __init__(self, model: str | None, *, use_gpu: bool = False, quantize: bool = False, threads: int = 1,
                 recheck_margin: float = 0.0, max_tokens: int | None = None, max_rows: int = 1024,
                 precision: str | None = None, compile: bool = False, runtime: str = "auto", hooks: dict | None = None,
                 identity: str | None = None):
        """``identity``: the model's content identity (model.identity), which keys its ONNX export in the node's
        cache; without it the export is made anew."""
        import torch

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        device = torch.device("cuda" if use_gpu else "cpu")
        self.precision = precision or ("bf16" if use_gpu else "fp32")
        self.runtime = runtime_lib.choose(runtime, use_gpu, self.precision)
        model_dir = model_lib.local_model_dir(model)
        tokenizer = tokenizer_for(model)
        if self.runtime == "onnx" and runtime_lib.fits_onnx(model_dir):
            # From the node's cache the ONNX files need no torch model: it is loaded only to export one.
            self.tasks = model_lib.tasks_of(model_dir)
            self.full, self.fast, self.onnx_cache = runtime_lib.onnx_engines(
                lambda: model_lib.inference_model(model_dir)[0], len(self.tasks), threads, quantize, identity)
            self.pad_id = model_lib.config_pad_id(model_dir, tokenizer)
        else:
            if self.runtime == "onnx":
                logger.warning("the model's weights are over what one ONNX file holds: running it on torch")
                self.runtime = "torch"
            net, self.tasks = model_lib.inference_model(model_dir)
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            net = net.to(device, dtype=dtype)  # cast once: no autocast over fp32 weights
            if compile:
                net = torch.compile(net, dynamic=True)
            self.full, self.fast = runtime_lib.torch_engines(net, device, quantize)
            self.onnx_cache = {}
            self.pad_id = model_lib.pad_token_id(net, tokenizer)  # a decoder pools the last token before it
        self.temperatures = model_lib.temperatures(model_dir, len(self.tasks))  # 1.0: the softmax as it is
        self.quantize, self.threads = quantize, threads
        self.device = device
        self.recheck_margin = recheck_margin if quantize else 0.0
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS["gpu" if use_gpu else "cpu"]
        self.max_rows = max_rows
        self.hooks = hooks or {}
        self.stats = Stats()

    def facts(self) -> dict:
        """What this predictor runs on and how (runtime.host_facts, the runtime, int8 or not, the ONNX cache)."""
        int8 = runtime_lib.INT8_VARIANTS.get(self.runtime) if self.quantize else None
        return runtime_lib.host_facts() | {"runtime": self.runtime, "precision": self.precision, "threads": self.threads,
                                           "int8": int8, **({"onnx_cache": self.onnx_cache} if self.onnx_cache else {})}

    def _arrays(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Padded token ids and attention mask, built without a Python loop per row (a GPU batch has thousands)."""
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        mask = (np.arange(lengths.max()) < lengths[:, None]).astype(np.int64)
        ids = np.full(mask.shape, self.pad_id, dtype=np.int64)
        ids[mask.astype(bool)] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        return ids, mask

    def _forward(self, net, rows: list[list[int]]) -> list[np.ndarray]:
        limit = self.hooks.get("oom_above_tokens")  # test hook: a device with that little memory
        if limit and len(rows) * max(len(r) for r in rows) > limit:
            raise self.torch.cuda.OutOfMemoryError(f"test hook: {len(rows)} rows over {limit} tokens")
        probs = []
        for logits, temperature in zip(net(*self._arrays(rows)), self.temperatures):
            logits = np.asarray(logits, dtype=np.float32) / temperature  # calibrated (calibration.py)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs.append(e / e.sum(axis=1, keepdims=True))
        return probs

    def _run(self, net, rows: list[list[int]]) -> list[np.ndarray]:
        """Probabilities per task for one batch; a batch that runs out of device memory is split in two."""
        try:
            return self._forward(net, rows)
        except self.torch.cuda.OutOfMemoryError:
            if len(rows) == 1:
                raise
            self.stats.oom_splits += 1
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()
            half = len(rows) // 2
            return [np.concatenate(pair) for pair in zip(self._run(net, rows[:half]), self._run(net, rows[half:]))]

    def _pass(self, net, rows: list[list[int]], probs: list[np.ndarray], which: np.ndarray) -> None:
        lengths = np.array([len(rows[i]) for i in which])
        for batch in token_batches(lengths, self.max_tokens, self.max_rows):
            idx = which[batch]
            for p, q in zip(probs, self._run(net, [rows[i] for i in idx])):
                p[idx] = q
            self.stats.batches += 1
            self.stats.real_tokens += int(lengths[batch].sum())
            self.stats.padded_tokens += len(batch) * int(lengths[batch].max())

    def probabilities(self, rows: list[list[int]]) -> list[np.ndarray]:
        """Class probabilities per task (rows x classes), in the order of ``rows``."""
        start = time.perf_counter()
        probs = [np.zeros((len(rows), len(t.labels)), dtype=np.float32) for t in self.tasks]
        everything = np.arange(len(rows))
        self._pass(self.fast, rows, probs, everything)
        if self.recheck_margin > 0 and len(rows):
            unsure = np.zeros(len(rows), dtype=bool)
            for p in probs:
                if p.shape[1] > 1:
                    top2 = np.sort(p, axis=1)[:, -2:]
                    unsure |= top2[:, 1] - top2[:, 0] < self.recheck_margin
            if unsure.any():  # all of a window's unsure rows together: full batches, not a few rows each
                self._pass(self.full, rows, probs, everything[unsure])
                self.stats.rechecked += int(unsure.sum())
        self.stats.windows += len(rows)
        self.stats.model_seconds += time.perf_counter() - start
        return probs

    def score(self, prepared: Prepared) -> "Scored":
        """Each task's calibrated probabilities for prepared rows; a chunked row's combine its windows'
        (chunking.combine)."""
        present = prepared.chunks > 0
        probs = self.probabilities(prepared.windows)
        if prepared.chunked:
            sizes = np.fromiter(map(len, prepared.windows), dtype=np.int64, count=len(prepared.windows))
            probs = [chunking.combine(p, prepared.owner, len(prepared), sizes=sizes)[present] for p in probs]
        self.stats.rows += int(present.sum())
        self.stats.chunked_rows += int((prepared.chunks > 1).sum())
        self.stats.chunks_dropped += int(prepared.dropped.sum())
        ids, scores = [], []
        for p in probs:
            label_id = np.full(len(present), -1, dtype=np.int64)
            score = np.zeros(len(present), dtype=np.float32)
            label_id[present] = p.argmax(axis=1) if len(p) else []
            score[present] = p.max(axis=1) if len(p) else []
            ids.append(label_id)
            scores.append(score)
        return Scored(ids, scores, present)

    def label(self, prepared: Prepared, prefix: str = "", min_scores: list[np.ndarray | None] | None = None
              ) -> dict[str, pa.Array]:
        """The output columns (output_columns' names) for prepared rows: null labels where a row has no tokens.
        ``min_scores``: per task, a threshold per class (--min-score)."""
        scored = self.score(prepared)
        return self.columns(prepared, scored, prefix, scored.abstentions(min_scores))

    def columns(self, prepared: Prepared, scored: "Scored", prefix: str = "",
                abstained: list[np.ndarray] | None = None) -> dict[str, pa.Array]:
        """The output columns of scored rows. A row ``abstained`` (per task: Scored.abstentions) keeps its score but
        gets no label (skip_reason low_confidence; for a multi-task model, abstained in any task)."""
        names = output_columns([t.name for t in self.tasks], prefix, prepared.chunked)
        out: dict[str, pa.Array] = {}
        missing = ~scored.present
        reasons = list(prepared.reasons)
        for k, (task, label_id, score) in enumerate(zip(self.tasks, scored.ids, scored.scores)):
            unsure = abstained[k] if abstained else np.zeros(len(missing), dtype=bool)
            for i in np.flatnonzero(unsure):
                reasons[i] = "low_confidence"
            labels = np.array(task.labels, dtype=object)
            label_c, id_c, score_c = names[3 * k: 3 * k + 3]
            out[label_c] = pa.array(labels[label_id.clip(min=0)], type=pa.string(), mask=missing | unsure)
            out[id_c] = pa.array(label_id.clip(min=0), mask=missing | unsure)
            out[score_c] = pa.array(score, mask=missing)
        out[prefix + "truncated"] = pa.array(prepared.truncated, mask=missing)
        if prepared.chunked:
            out[prefix + "chunks"] = pa.array(prepared.chunks.astype(np.int32), mask=missing)
        out[prefix + "skip_reason"] = pa.array(reasons, type=pa.string())
        return out


@dataclass
class Scored:
    """Per task, each row's predicted class (-1: not scored) and calibrated top score; which rows were scored."""

    ids: list[np.ndarray]
    scores: list[np.ndarray]
    present: np.ndarray

    def abstentions(self, min_scores: list[np.ndarray | None] | None) -> list[np.ndarray]:
        """Per task, the scored rows whose top score is under their predicted class's --min-score (``min_scores``:
        per task, a threshold per class)."""
        return [calibration.abstains(ids.clip(min=0), scores, min_scores[k] if min_scores else None) & self.present
                for k, (ids, scores) in enumerate(zip(self.ids, self.scores))]


class TableLabeller:
    """Ray Data callable class (the evaluation job): a table with a text column in, with the output columns."""

    def __init__(self, model: str | None, text_column: str, max_length: int, prefix: str, options: dict,
                 long_texts: dict | None = None):
        self.model, self.text_column, self.max_length, self.prefix = model, text_column, max_length, prefix
        self.long = LongTexts(**(long_texts or {}))
        self.predictor = Predictor(model, **options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prepared = prepare(self.model, batch[self.text_column], self.max_length, self.long)
        for name, column in self.predictor.label(prepared, self.prefix).items():
            batch = batch.append_column(name, column)
        return batch
