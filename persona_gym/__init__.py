"""persona-gym: recommender-system environments whose users are persona-LoRA small language models.

``import persona_gym`` registers the environments (``PersonaML100K-v0``, ``PersonaML1M-v0``).
"""

__version__ = "0.1.0"
