"""CR-FIQA training: backbones, ArcFace + certainty-ratio losses, data, the loop, export and import.

Depends on ``crfiqa.service`` for decoding, alignment and the pixel preprocessing, and adds torch.
"""

if __name__ != "crfiqa.training":  # the folder is on sys.path (run from the repo root): one name per module, or
    # isinstance/except checks between the two copies fail silently.
    raise ImportError(f"import crfiqa.training, not {__name__}")
