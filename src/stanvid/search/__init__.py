"""The search layer: your own videos, indexed and searched.

`index` (the index package: SQLite store, vector files, building and updating, `VideoIndex`), `query`
(text / image / example-clip queries and grouping by file), `rerank` (the Mug-STAN re-rank over per-frame
vectors), `moments` (the start and end of what a query describes, from per-frame vectors the index keeps),
`moment_export` (cutting moments out of files), `moment_eval` (R1 and mAP as QVHighlights defines them), `embed` (`stanvid embed`: embeddings as files), `classify` (zero-shot classification of a folder)
and `server` (the FastAPI app, one router per concern, and the web page in `web/`).

May import: the shared top modules, `stanvid.video`, `stanvid.models`, `stanvid.checkpoints` and
`stanvid.data`. Never `stanvid.training`, the demo or the CLI.

The query function is `stanvid.search.query.search` (also `VideoIndex.query`); this package's own name is the
layer, which is why the top-level `stanvid` namespace does not export a function called `search`.
"""
