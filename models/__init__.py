"""Package data: the model manifest (``manifest.toml``) and the default quality model."""
