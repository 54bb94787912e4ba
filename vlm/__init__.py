"""Give a small pretrained text-only LLM vision, the BLIP-2 way.

Frozen image backbone -> cached patch embeddings -> Q-Former -> MLP projector -> frozen LLM + LoRA.
"""

__version__ = "0.1.0"
