"""Training objectives: adversarial losses, R1, density regularisation (Stage-1, paper appendix B);
the Stage-2 regularisers (eq. 19-22) join them here."""

from .config import RegularizerConfig
from .gan import d_nonsaturating, g_nonsaturating, r1_penalty
from .density import density_regularization

__all__ = ["RegularizerConfig", "d_nonsaturating", "g_nonsaturating", "r1_penalty", "density_regularization"]
