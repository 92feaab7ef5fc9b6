"""End-to-end experiments built from the library's stages (``vpmoe experiment ...``)."""
