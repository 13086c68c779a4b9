import os

import pytest
import torch
from hypothesis import settings

# Triton kernels are tested through its interpreter on CPU-only machines; triton reads the switch
# when it is first imported, so it is set before any test module can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI-sized property tests by default; NORMLAB_HYPOTHESIS_EXAMPLES=1000 for a deep run.
settings.register_profile(
    "normlab",
    max_examples=int(os.environ.get("NORMLAB_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    derandomize=True,
)
settings.load_profile("normlab")

# One intra-op thread: small ops run fastest and most predictably that way on 2 shared cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    # Tests that draw from torch's global generator get the same numbers on every run (a plugin
    # seeds it differently per process, which made a few tolerance checks flaky).
    torch.manual_seed(0)

