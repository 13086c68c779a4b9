"""The lab: experiments that measure claims about normalization, a results store, sweeps, a report.

Submodules (imported on demand, so ``import normlab.lab`` stays light):

- :mod:`normlab.lab.experiment` -- the Experiment protocol, RunResult, Verdict, compare.
- :mod:`normlab.lab.datasets` -- digits, MNIST and CIFAR-10 loaders.
- :mod:`normlab.lab.store` -- the SQLite results store.
- :mod:`normlab.lab.sweep` -- run (experiment, config, seed) tasks on a process pool or Ray.
- :mod:`normlab.lab.report` -- the HTML report and the terminal verdict table.
- :mod:`normlab.lab.runner` -- orchestration: run what is missing, then verdicts and report.
"""

__all__: list[str] = []
