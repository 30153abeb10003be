"""The feature browser: a read-only web app (FastAPI) over model folders, and its static export."""
