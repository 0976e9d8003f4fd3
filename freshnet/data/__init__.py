"""Getting images: search, download, dedupe, curate, snapshot, review."""
