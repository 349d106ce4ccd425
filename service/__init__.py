"""Torch-free inference library: decode, detect, align, score; the CLI and the HTTP API sit on top."""
