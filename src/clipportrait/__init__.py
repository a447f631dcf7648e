"""clipportrait: text- and 3D-controllable portrait generators from unlabelled 2D face photos.

Implements CLIPortrait ("Disentangling 3D from Large Vision-Language Models for Controlled
Portrait Generation"); equation numbers in docstrings refer to that paper.
"""

__version__ = "0.1.0"
