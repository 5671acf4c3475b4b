"""`stanvid serve`: the FastAPI app over an open index, its routers (search, media, info) and the web page."""
