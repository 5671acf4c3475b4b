"""The media routes: a segment's thumbnail (`/api/thumbnail/{segment}`, JPEG of its middle frame) and the video
file itself (`GET|HEAD /api/video/{file}`, with HTTP range requests, 206 / 416, for seeking in `<video>`).

Only files recorded in the index can be read, and only by their numeric id: no request carries a path, so
there is nothing to traverse. A file is served only while it still is the file that was indexed
(`VideoIndex.open_video`: a regular file inside the indexed folder, with the size, mtime, device and inode
recorded when it was indexed); otherwise 404 (gone) or 409 (changed). The bytes sent are read from the
descriptor that was checked, so a link swapped after the check cannot redirect them.
"""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from fastapi import APIRouter, Header
from fastapi import Path as PathParam
from fastapi.responses import Response, StreamingResponse
from PIL import Image

from stanvid.errors import StanvidError
from stanvid.search.index import IndexedFileError, VideoIndex
from stanvid.search.server.common import MAX_ID, BadRequest, IndexDep, Settings, binary, errors, public
from stanvid.video.decode import VIDEO_MEDIA_TYPES

_CHUNK = 1 << 18
_RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})", re.ASCII)  # 18 digits: beyond any file, within int64
_VIDEO_TYPES = [*dict.fromkeys(VIDEO_MEDIA_TYPES.values()), "application/octet-stream"]
_VIDEO_RESPONSES = {
    200: binary(_VIDEO_TYPES, "the whole file"),
    206: binary(_VIDEO_TYPES, "the requested range"),
    **errors(400, 404, 409, 416, 503),
}


def media_router(settings: Settings) -> APIRouter:
    router = APIRouter()
    thumbnails = _thumbnail_cache(settings.thumbnail_size)

    @router.get(
        "/api/thumbnail/{segment_id}",
        response_class=Response,
        responses={200: binary(["image/jpeg"], "JPEG of the middle frame"), **errors(400, 404, 409, 503)},
    )
    def thumbnail(index: IndexDep, segment_id: int = PathParam(ge=0, le=MAX_ID)) -> Response:
        sid = segment_id
        if index.segment(sid) is None:
            raise BadRequest(404, f"no segment with id {sid} in this index")
        try:
            data = thumbnails(index, sid)
        except IndexedFileError as exc:
            raise BadRequest(404 if exc.gone else 409, f"segment {sid}: {public(index, str(exc))}") from exc
        except StanvidError as exc:  # the file can no longer be decoded
            raise BadRequest(
                409, f"cannot read the frame of segment {sid}: {public(index, str(exc))}"
            ) from exc
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @router.get("/api/video/{file_id}", response_class=Response, responses=_VIDEO_RESPONSES)
    def video_get(
        index: IndexDep,
        file_id: int = PathParam(ge=0, le=MAX_ID),
        byte_range: str | None = Header(None, alias="range", include_in_schema=False),
    ) -> Response:
        return serve_video(index, file_id, byte_range, head=False)

    @router.head("/api/video/{file_id}", response_class=Response, responses=_VIDEO_RESPONSES)
    def video_head(
        index: IndexDep,
        file_id: int = PathParam(ge=0, le=MAX_ID),
        byte_range: str | None = Header(None, alias="range", include_in_schema=False),
    ) -> Response:
        """The headers a GET would answer (type, length, ranges), without the body: players probe with it."""
        return serve_video(index, file_id, byte_range, head=True)

    return router


def _thumbnail_cache(size: int) -> Callable[[VideoIndex, int], bytes]:
    """JPEG bytes of a segment's middle frame, the last 512 kept, keyed by the index's store id and the
    segment id: segment ids are never reused within an index and a segment's frame never changes (a changed
    file gets new segments), so an entry stays right across generations; the route checks first that the
    segment is in the generation of the request."""
    cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
    lock = threading.Lock()

    def thumbnail_bytes(index: VideoIndex, segment_id: int) -> bytes:
        key = (str(index.meta["store"].get("store")), segment_id)
        with lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        frame = index.middle_frame(segment_id, size=size)  # (H, W, 3) uint8
        buf = io.BytesIO()
        Image.fromarray(frame.numpy()).save(buf, format="JPEG", quality=85)
        with lock:
            cache[key] = buf.getvalue()
            while len(cache) > 512:
                cache.popitem(last=False)
        return buf.getvalue()

    return thumbnail_bytes


def serve_video(index: VideoIndex, fid: int, range_header: str | None, head: bool) -> Response:
    """The indexed file `fid` (or one range of it), streamed from the descriptor `open_video` checked."""
    try:
        opened = index.open_video(fid)
    except IndexedFileError as exc:
        raise BadRequest(404 if exc.gone else 409, public(index, str(exc))) from exc
    if opened is None:
        raise BadRequest(404, f"no file with id {fid} in this index")
    file, st, relpath = opened
    try:
        size = st.st_size
        media_type = VIDEO_MEDIA_TYPES.get(Path(relpath).suffix.lower(), "application/octet-stream")
        headers = {"Accept-Ranges": "bytes"}
        status, start, length = 200, 0, size
        if range_header is not None:
            start, end = parse_range(range_header, size)
            status, length = 206, end - start + 1
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(length)
    except BaseException:
        file.close()
        raise
    if head:
        file.close()
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(_read(file, start, length), status, headers=headers, media_type=media_type)


def parse_range(header: str, size: int) -> tuple[int, int]:
    """First and last byte (inclusive) of a single `bytes=` range (RFC 9110 14.1.2); 416 when unsatisfiable."""
    unsatisfiable = {"Content-Range": f"bytes */{size}"}
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise BadRequest(
            416, f"unsupported Range header {header[:60]!r}: one 'bytes=start-end' range", unsatisfiable
        )
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise BadRequest(416, f"range {header!r} selects no bytes of a {size}-byte file", unsatisfiable)
        return max(0, size - length), size - 1
    start = int(first)
    if last != "" and int(last) < start:
        raise BadRequest(416, f"range {header!r} ends before it starts", unsatisfiable)
    if start >= size:
        raise BadRequest(416, f"range {header!r} starts past the end of the {size}-byte file", unsatisfiable)
    return start, size - 1 if last == "" else min(int(last), size - 1)


def _read(file: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    """`length` bytes from `start` of an open file (the one `open_video` checked), closed at the end."""
    with file as f:
        f.seek(start)
        while length > 0:
            data = f.read(min(_CHUNK, length))
            if not data:  # the file shrank while being sent
                return
            length -= len(data)
            yield data
