"""Dataset curation at cluster scale: ``crfiqa curate`` scores a folder tree, an InsightFace RecordIO or a list of
paths on Ray Data (on CPUs, decode/detect/align and quality in the same tasks; with GPUs, quality in an actor
pool), writes ``scores.parquet``, applies a quality filter and renders a self-contained HTML report.

Only ``cli.py`` is imported by ``crfiqa --help``; Ray and pyarrow (``crfiqa[cluster]``) load when a job runs."""
