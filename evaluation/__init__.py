"""Evaluation toolkit: verification protocols, Error-versus-Reject curves (paper ERC and ISO/IEC 29794-1
EDC), identity bootstrap, baselines, cross-quality degradation, reports and plots. Pure NumPy where it can be."""
