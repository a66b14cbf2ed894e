"""labeller.py: how an actor cuts what it reads into windows (pure: no Ray, no S3)."""

from __future__ import annotations

import pyarrow as pa



def test_reading_windows_are_cut_by_rows_and_with_chunk_by_text_bytes_too():
    """Pure (no Ray, no S3): a window of long texts ends at the byte budget, so --long-texts chunk cannot hold
    8,192 rows x 64 model windows of token ids at once; ends and errors keep their place."""
    from textlabel.labeller import windows_of

    def rows(n: int, width: int):
        return "rows", (None, pa.record_batch({"text": ["x" * width] * n}))

    events = [rows(100, 10), rows(100, 10), ("end", "a"), rows(50, 20_000), rows(50, 20_000), ("error", "b"), rows(10, 10)]
    by_rows = list(windows_of(iter(events), "text", max_rows=200))
    assert [[k for k, _ in w] for w in by_rows] == [["rows", "rows"], ["end", "rows", "rows", "error", "rows"]]
    by_bytes = list(windows_of(iter(events), "text", max_rows=200, max_text_bytes=1_000_000))
    assert [[k for k, _ in w] for w in by_bytes] == [["rows", "rows"], ["end", "rows"], ["rows"], ["error", "rows"]]
    assert [e for w in by_bytes for e in w] == events  # nothing lost, nothing reordered
