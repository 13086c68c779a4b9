"""The registry of the lab's experiments: one :class:`~normlab.lab.experiment.Experiment` per claim.

``ALL`` lists them in the order of the claims table (C1, C2, ...); :func:`get` finds one by its
CLI name. To add an experiment, import its class below and insert an instance into ``ALL`` at
its claim's position (the list is sorted by claim number on import, so the position need not be
exact).
"""

from __future__ import annotations

from normlab.lab.experiment import Experiment
from normlab.lab.experiments.c01_input_standardization import InputStandardization
from normlab.lab.experiments.c02_initialization import Initialization
from normlab.lab.experiments.c03_bn_convergence import BNConvergence
from normlab.lab.experiments.c04_learning_rate import LearningRate
from normlab.lab.experiments.c05_covariate_shift import CovariateShift
from normlab.lab.experiments.c06_gradient_flow_depth import GradientFlowDepth
from normlab.lab.experiments.c07_dead_units import DeadReLUs
from normlab.lab.experiments.c08_regularization import Regularization
from normlab.lab.experiments.c09_batch_size import BatchSize
from normlab.lab.experiments.c10_batch_coupling import BatchCoupling
from normlab.lab.experiments.c11_recurrent import Recurrent
from normlab.lab.experiments.c12_gan import GAN
from normlab.lab.experiments.c13_train_inference_gap import TrainInferenceGap
from normlab.lab.experiments.c14_instance_contrast import InstanceContrast

__all__ = ["ALL", "get", "names"]


def _claim_number(experiment: Experiment) -> int:
    return int(experiment.claim.lstrip("C"))


ALL: list[Experiment] = sorted(
    [
        InputStandardization(),
        Initialization(),
        BNConvergence(),
        LearningRate(),
        CovariateShift(),
        GradientFlowDepth(),
        DeadReLUs(),
        Regularization(),
        BatchSize(),
        BatchCoupling(),
        Recurrent(),
        GAN(),
        TrainInferenceGap(),
        InstanceContrast(),
    ],
    key=_claim_number,
)
"""Every registered experiment, in claim order."""


def names() -> list[str]:
    """The CLI names of all registered experiments, in claim order."""
    return [e.name for e in ALL]


def get(name: str) -> Experiment:
    """The registered experiment called `name`.

    Raises:
        KeyError: no experiment has that name; the message lists the known names.
    """
    for experiment in ALL:
        if experiment.name == name:
            return experiment
    raise KeyError(f"no experiment named {name!r}; known: {', '.join(names())}")
