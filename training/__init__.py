"""CR-FIQA training: backbones, ArcFace + certainty-ratio losses, data, the loop, export and import.

Depends on ``crfiqa.service`` for decoding, alignment and the pixel preprocessing, and adds torch.
"""
