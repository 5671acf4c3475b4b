"""Search your own videos: an embedding index over a folder, FAISS for vectors and SQLite for everything else.

An index is a directory:

    INDEX/index.sqlite          files (path, size, mtime, duration, fps, ...), segments (file, start, end,
                                embedding), the model identity and the settings it was built with
    INDEX/vectors-<gen>.faiss   the FAISS index over the segment embeddings, for generation <gen> of the rows
    INDEX/shards/               per-rank SQLite files while a `torchrun` build is under way

SQLite is the source of truth: embeddings are committed there with their metadata, a few files at a time (a
file's segments always in the same transaction as its row), so an interrupted run keeps everything committed.
Every commit that changes the segments bumps a generation counter; the FAISS file carries the generation in its
name and is written to a temporary file and renamed, so it is either the one for the current rows or absent, and
an absent one is rebuilt from SQLite (at the end of the next run, or in memory when opening).

Embeddings are L2-normalized, so the FAISS inner product is the cosine similarity CLIP ranks by. The vector
index is exact (`IndexFlatIP`) up to `approx_threshold` vectors and an inverted file (`IndexIVFFlat`) above:
it needs no graph to maintain, trains in seconds on a sample and its `nprobe` trades recall for speed
(benchmarks/index.py measures both at 10k and 1M vectors).

The model that built the index is recorded (its source and a SHA-256 of its config and weights); a query with
any other model is refused, because its text embeddings would live in another space and rank at random.

Hostile or damaged input never becomes a traceback or a silent wrong answer: a vector file that does not match
the SQLite side (its SHA-256, generation and count are recorded when it is written) or cannot be read is rebuilt
from SQLite; a damaged database names its file and what to do; `build_index` repairs what it can (rows whose
embeddings are damaged or orphaned are dropped and re-encoded) and holds a lock on the index folder, so two runs
never do the same work. A symbolic link is indexed only when it resolves inside the folder, and `open_video`
hands out a file only while it still is the one indexed (a regular file inside the folder, same size, mtime,
device and inode).

The precision it encoded in (`stanvid.precision`) is recorded too, and only informs: embeddings are stored as
float32 whatever it was, and a query in another precision with the same model lands in the same space (the
tests bound the drift).

An open index answers each call from one generation and follows the runs that update it, without a restart
(`snapshot`: one generation read whole in one SQLite read transaction; `follow`: the check and the swap).

The package, one module per concern: `store` (SQLite schema, meta record, validation and repair), `vectors`
(the embedding store), `ann` and `maintain` (the vector index files: kinds, training, updates), `snapshot` and
`follow` (reading a generation; following updates), `clips` (segments, the frames sampled in them, reading and
encoding a clip), `identity` (the model that built an index), `walk` (which files of the folder are indexed),
`loader` and `writer` (decoding ahead of the model; encoding and committing), `moment_store` (each file's
moment features, `stanvid.search.moments`), `shards` (the ranks of a
`torchrun` build), `imports` (`--from-embeddings`), `build` (`build_index`, in named steps) and
`video_index` (`VideoIndex`). Every public name is importable from here.
"""

from stanvid.errors import IndexedFileError, VideoIndexError
from stanvid.search.index.ann import (
    DEFAULT_APPROX_THRESHOLD,
    DEFAULT_RERANK,
    INDEX_KINDS,
    TARGET_RECALL,
    make_vector_index,
)
from stanvid.search.index.build import build_index
from stanvid.search.index.clips import (
    MAX_SEGMENTS_PER_FILE,
    MIN_SEGMENT_SECONDS,
    encode_clips,
    read_clip,
    segment_bounds,
    segment_frame_indices,
    segments_with_frames,
)
from stanvid.search.index.identity import model_fingerprint
from stanvid.search.index.records import IndexReport, SearchResult, Segment
from stanvid.search.index.store import DB_NAME, FORMAT_VERSION, LOCK_NAME, SHARD_DIR
from stanvid.search.index.video_index import VideoIndex, open_index, search_index
from stanvid.search.index.walk import VIDEO_EXTENSIONS, find_videos

__all__ = [
    "DB_NAME",
    "DEFAULT_APPROX_THRESHOLD",
    "DEFAULT_RERANK",
    "FORMAT_VERSION",
    "INDEX_KINDS",
    "LOCK_NAME",
    "MAX_SEGMENTS_PER_FILE",
    "MIN_SEGMENT_SECONDS",
    "SHARD_DIR",
    "TARGET_RECALL",
    "VIDEO_EXTENSIONS",
    "IndexReport",
    "IndexedFileError",
    "SearchResult",
    "Segment",
    "VideoIndex",
    "VideoIndexError",
    "build_index",
    "encode_clips",
    "find_videos",
    "make_vector_index",
    "model_fingerprint",
    "open_index",
    "read_clip",
    "search_index",
    "segment_bounds",
    "segment_frame_indices",
    "segments_with_frames",
]
