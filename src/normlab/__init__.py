"""normlab: normalization for deep learning, as explicit math and as evidence.

``normlab.functional`` holds the math, ``normlab.nn`` the drop-in ``torch.nn`` modules over it and
``normlab.kernels`` the one place where a fast kernel is chosen.
"""

from normlab import data, functional, init, kernels, nn

__version__ = "0.1.0"
__all__ = ["__version__", "data", "functional", "init", "kernels", "nn"]
