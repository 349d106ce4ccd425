"""Torch-free inference library: decode, detect, align, score; the CLI and the HTTP API sit on top."""

if __name__ != "crfiqa.service":  # the folder is on sys.path (run from the repo root): one name per module, or
    # isinstance/except checks between the two copies fail silently.
    raise ImportError(f"import crfiqa.service, not {__name__}")
