"""s2l_ray: S2L (SmallToLarge) data selection for LLM fine-tuning, distributed on Ray.

Importing the package is cheap on purpose: Ray, torch and transformers load inside the stages.
"""

__version__ = "0.1.0"
