// The search page: one form, a grid of hits, a player that starts at the hit's moment.
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

function play(hit) {
  player.hidden = false;
  nowPlaying.textContent = `${hit.path}  ${formatTime(hit.start)}–${formatTime(hit.end)}`;
  const seek = () => {
    video.currentTime = hit.start;
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
  meta.append(rankSpan, path, times, score);
  item.append(img, meta);
  item.addEventListener("click", () => play(hit));
  item.addEventListener("keydown", (e) => { if (e.key === "Enter") play(hit); });
  return item;
}

async function search(query, k) {
  setStatus("Searching…");
  results.replaceChildren();
  const params = new URLSearchParams({ q: query, k: String(k) });
  history.replaceState(null, "", `?${params}`);
  let response, body;
  try {
    response = await fetch(`/api/search?${params}`);
    body = await response.json();
  } catch (err) {
    setStatus(`Search failed: ${err}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(body.error || `Search failed (HTTP ${response.status})`, true);
    return;
  }
  results.replaceChildren(...body.results.map((hit, i) => card(hit, i + 1)));
  setStatus(body.results.length ? `${body.results.length} results for “${body.query}”` : "No results.");
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const query = queryInput.value.trim();
  if (query) search(query, kSelect.value);
});

// A link with ?q= runs its search on load, so searches can be shared and bookmarked.
const initial = new URLSearchParams(location.search);
if (initial.get("q")) {
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
