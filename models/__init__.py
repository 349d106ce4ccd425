"""Package data: the model manifest (``manifest.toml``) and the default quality model."""

if __name__ != "crfiqa.models":  # the folder is on sys.path (run from the repo root): one name per module, or
    # isinstance/except checks between the two copies fail silently.
    raise ImportError(f"import crfiqa.models, not {__name__}")
