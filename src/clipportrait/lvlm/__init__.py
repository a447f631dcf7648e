"""CLIP through open_clip (`build_clip`, `ClipEncoder`), the project's small CLIP (`clipportrait-tiny`,
trained by task=train_lvlm), prompt templates, zero-shot evaluation and the text-embedding cache."""

from .cache import TextEmbeddingCache
from .clip import ClipEncoder, build_clip, card_path, preprocess_images
from .config import LVLM_KINDS, LVLMConfig
from .prompts import PROMPT_TEMPLATES, class_prompts, synthetic_attributes

__all__ = ["LVLMConfig", "LVLM_KINDS", "ClipEncoder", "build_clip", "card_path", "preprocess_images",
           "TextEmbeddingCache", "PROMPT_TEMPLATES", "class_prompts", "synthetic_attributes"]
