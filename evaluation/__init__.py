"""Evaluation toolkit: verification protocols, Error-versus-Reject curves (paper ERC and ISO/IEC 29794-1
EDC), identity bootstrap, baselines, cross-quality degradation, reports and plots. Pure NumPy where it can be."""

if __name__ != "crfiqa.evaluation":  # the folder is on sys.path (run from the repo root): one name per module, or
    # isinstance/except checks between the two copies fail silently.
    raise ImportError(f"import crfiqa.evaluation, not {__name__}")
