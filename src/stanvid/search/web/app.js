// The search page: a text form and an image drop target, filters (folder or glob, modified dates, length), a grid
// of hits (each with "more like this" and "copies of this") and "more results" for the next page, optionally one
// per video with a timeline strip of its moments, and a player that starts at the hit's moment.
// All text from the server is inserted with textContent, never as HTML.
"use strict";

const form = document.getElementById("search-form");
const queryInput = document.getElementById("query");
const kSelect = document.getElementById("k");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const player = document.getElementById("player");
const video = document.getElementById("video");
const nowPlaying = document.getElementById("now-playing");
const groupBox = document.getElementById("group");
const momentsBox = document.getElementById("moments");
const loopBox = document.getElementById("loop");
let stopAt = null; // a moment playing: { start, end }; playback stops (or loops) at its end
const imageDrop = document.getElementById("image-drop");
const imageInput = document.getElementById("image-input");
const moreButton = document.getElementById("more-results");
const filterInputs = { in: "f-in", after: "f-after", before: "f-before", min_duration: "f-min", max_duration: "f-max" };
let lastSearch = null; // {url, init, what, offset, k}: what "More results" continues

function formatTime(seconds) {
  const s = Math.max(0, seconds);
  const m = Math.floor(s / 60);
  const rest = (s - 60 * m).toFixed(1).padStart(4, "0");
  return `${m}:${rest}`;
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function play(hit, start = hit.start, end = hit.end) {
  player.hidden = false;
  stopAt = hit.export_url ? { start, end } : null; // only a moment has an end to stop at
  nowPlaying.textContent = `${hit.path}  ${formatTime(start)}–${formatTime(end)}`;
  const seek = () => {
    video.currentTime = start;
    video.play().catch(() => {}); // autoplay may be refused; the controls still work
  };
  if (video.dataset.src !== hit.video_url) {
    video.dataset.src = hit.video_url;
    video.src = hit.video_url;
    video.addEventListener("loadedmetadata", seek, { once: true });
  } else {
    seek();
  }
  player.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

function card(hit, rank) {
  const item = document.createElement("li");
  item.className = "result";
  item.tabIndex = 0;
  item.dataset.id = hit.id;
  const img = document.createElement("img");
  img.src = hit.thumbnail_url;
  img.alt = `${hit.path} at ${formatTime(hit.start)}`;
  img.loading = "lazy";
  const meta = document.createElement("div");
  meta.className = "meta";
  const rankSpan = document.createElement("span");
  rankSpan.className = "rank";
  rankSpan.textContent = `#${rank}`;
  const path = document.createElement("div");
  path.className = "path";
  path.textContent = hit.path;
  path.title = hit.path;
  const times = document.createElement("div");
  times.className = "times";
  times.textContent = `${formatTime(hit.start)} – ${formatTime(hit.end)}`;
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = `score ${hit.score.toFixed(3)}`;
  const more = hitButton("more-like", "More like this", "find the moments most similar to this one",
    () => moreLike(hit));
  const copies = hitButton("copies", "Copies of this",
    "other files holding this footage (re-encoded, trimmed, scaled)", () => showCopies(hit));
  meta.append(rankSpan, path, times, score, more, copies);
  if (hit.export_url) meta.append(cutLink(hit));
  item.append(img, meta);
  if (hit.export_url && hit.duration) item.append(momentBar(hit));
  if (hit.timeline && hit.timeline.length > 1) item.append(timelineStrip(hit));
  item.addEventListener("click", () => play(hit));
  item.addEventListener("keydown", (e) => { if (e.key === "Enter") play(hit); });
  return item;
}

// The scores of every segment of a hit's file as bars (taller: more similar); a click plays that segment.
function timelineStrip(hit) {
  const strip = document.createElement("div");
  strip.className = "timeline";
  const scores = hit.timeline.map((t) => t.score);
  const lo = Math.min(...scores);
  const span = Math.max(...scores) - lo || 1;
  for (const seg of hit.timeline) {
    const bar = document.createElement("span");
    bar.className = seg.id === hit.id ? "best" : "";
    bar.style.height = `${20 + 80 * ((seg.score - lo) / span)}%`;
    bar.title = `${formatTime(seg.start)}–${formatTime(seg.end)}  score ${seg.score.toFixed(3)}`;
    bar.addEventListener("click", (e) => {
      e.stopPropagation();
      play(hit, seg.start, seg.end);
    });
    strip.append(bar);
  }
  return strip;
}

// A moment on its file's timeline: the whole file as a track, the moment's span filled; a click plays it.
function momentBar(hit) {
  const track = document.createElement("div");
  track.className = "moment-track";
  track.title = `${formatTime(hit.start)}–${formatTime(hit.end)} of ${formatTime(hit.duration)}`;
  const span = document.createElement("span");
  span.style.left = `${(100 * hit.start) / hit.duration}%`;
  span.style.width = `${Math.max(0.5, (100 * (hit.end - hit.start)) / hit.duration)}%`;
  track.append(span);
  return track;
}

// "Cut": the moment written as a file of its own (the server cuts it; the browser downloads it).
function cutLink(hit) {
  const link = document.createElement("a");
  link.className = "cut";
  link.href = hit.export_url;
  link.textContent = "Cut";
  link.title = "download this moment as a video file";
  link.addEventListener("click", (e) => e.stopPropagation());
  return link;
}

video.addEventListener("timeupdate", () => {
  if (stopAt === null || video.currentTime < stopAt.end) return;
  if (loopBox.checked) {
    video.currentTime = stopAt.start;
  } else {
    video.pause();
    stopAt = null;
  }
});

// One request, its results shown or its error reported; `what` describes the query in the status line.
// With `offset`, the next page of the same search is appended ("More results").
async function runSearch(url, init, what, offset = 0) {
  setStatus("Searching…");
  if (!offset) results.replaceChildren();
  moreButton.hidden = true;
  const paged = offset ? `${url}${url.includes("?") ? "&" : "?"}offset=${offset}` : url;
  let response, body;
  try {
    response = await fetch(paged, init);
    body = await response.json();
  } catch (err) {
    setStatus(`Search failed: ${err}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(body.error || `Search failed (HTTP ${response.status})`, true);
    return;
  }
  results.append(...body.results.map((hit, i) => card(hit, offset + i + 1)));
  const unit = body.moments ? "moments" : body.group === "file" ? "videos" : "results";
  const note = body.moments_note ? ` (${body.moments_note})` : "";
  const shown = offset + body.results.length;
  setStatus(shown ? `${shown} ${unit} ${what}${note}` : "No results.");
  lastSearch = { url, init, what, offset: shown, k: body.k };
  moreButton.hidden = body.results.length < body.k;
}

moreButton.addEventListener("click", () => {
  if (lastSearch) runSearch(lastSearch.url, lastSearch.init, lastSearch.what, lastSearch.offset);
});

// The files that hold this hit's footage, shown in place of the results.
async function showCopies(hit) {
  setStatus("Looking for copies…");
  moreButton.hidden = true;
  let response, body;
  try {
    response = await fetch(`/api/copies/${hit.file_id}`);
    body = await response.json();
  } catch (err) {
    setStatus(`Copies failed: ${err}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(body.error || `Copies failed (HTTP ${response.status})`, true);
    return;
  }
  results.replaceChildren(...body.copies.map((copy, i) => {
    const item = document.createElement("li");
    item.className = "result copy";
    item.tabIndex = 0;
    const text = document.createElement("div");
    text.className = "meta";
    text.textContent = `#${i + 1} ${copy.path}  ${formatTime(copy.start)}–${formatTime(copy.end)} = ` +
      `${formatTime(copy.source_start)}–${formatTime(copy.source_end)} of ${body.path} ` +
      `(${copy.segments} segments, cosine ${copy.score.toFixed(3)})`;
    item.append(text);
    const target = { path: copy.path, video_url: copy.video_url, start: copy.start, end: copy.end };
    item.addEventListener("click", () => play(target));
    return item;
  }));
  setStatus(body.copies.length ? `${body.copies.length} copies of ${body.path}` : `No copies of ${body.path}.`);
}

function commonParams(k) {
  const params = new URLSearchParams({ k: String(k) });
  if (groupBox.checked) params.set("group", "file");
  if (momentsBox.checked) params.set("moments", "true");
  for (const [name, id] of Object.entries(filterInputs)) {
    const value = document.getElementById(id).value.trim();
    if (value) params.set(name, value);
  }
  return params;
}

async function search(query, k) {
  const params = commonParams(k);
  params.set("q", query);
  history.replaceState(null, "", `?${params}`);
  await runSearch(`/api/search?${params}`, undefined, `for “${query}”`);
}

async function moreLike(hit) {
  const params = commonParams(kSelect.value);
  history.replaceState(null, "", `?like=${hit.id}&${params}`);
  await runSearch(`/api/like/${hit.id}?${params}`, undefined, `like ${hit.path} at ${formatTime(hit.start)}`);
}

async function searchImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("That is not an image: drop or paste a picture (PNG, JPEG, ...).", true);
    return;
  }
  const params = commonParams(kSelect.value);
  const init = { method: "POST", body: file, headers: { "Content-Type": file.type } };
  await runSearch(`/api/search/image?${params}`, init, `like the image${file.name ? ` ${file.name}` : ""}`);
}

imageDrop.addEventListener("click", () => imageInput.click());
imageDrop.addEventListener("keydown", (e) => { if (e.key === "Enter") imageInput.click(); });
imageInput.addEventListener("change", () => searchImage(imageInput.files[0]));
imageDrop.addEventListener("dragover", (e) => {
  e.preventDefault();
  imageDrop.classList.add("over");
});
imageDrop.addEventListener("dragleave", () => imageDrop.classList.remove("over"));
imageDrop.addEventListener("drop", (e) => {
  e.preventDefault();
  imageDrop.classList.remove("over");
  searchImage(e.dataTransfer.files[0]);
});
// a pasted picture (e.g. a screenshot) searches at once, wherever the focus is
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
  if (item) {
    e.preventDefault();
    searchImage(item.getAsFile());
  }
});

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const query = queryInput.value.trim();
  if (query) search(query, kSelect.value);
});

// A link with ?q= runs its search on load, so searches can be shared and bookmarked.
const initial = new URLSearchParams(location.search);
if (initial.get("group") === "file") groupBox.checked = true;
if (initial.get("moments") === "true") momentsBox.checked = true;
if (initial.get("like")) {
  const id = initial.get("like");
  runSearch(`/api/like/${encodeURIComponent(id)}?${commonParams(initial.get("k") || kSelect.value)}`,
    undefined, `like segment ${id}`);
} else if (initial.get("q")) {
  queryInput.value = initial.get("q");
  if (initial.get("k")) {
    const k = initial.get("k");
    if (![...kSelect.options].some((o) => o.value === k)) kSelect.add(new Option(k));
    kSelect.value = k;
  }
  search(queryInput.value.trim(), kSelect.value);
} else {
  fetch("/api/info").then((r) => r.json()).then((info) => {
    setStatus(`${info.segments} segments from ${info.files} videos indexed`);
  }).catch(() => {});
}

// A button on a hit's card: its click acts on the hit alone (not the card's own click, which plays it).
function hitButton(className, text, title, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = text;
  button.title = title;
  button.addEventListener("click", (e) => {
    e.stopPropagation();
    action();
  });
  return button;
}
