"""Evolution of NAMM parameters with CMA-ES (docs/algorithm.md §9): optimiser, fitness, trainer.

    from namm.evolve import EvolveConfig, Trainer
    trainer = Trainer(EvolveConfig(model="smollm2-135m", tasks=["passkey"], length=1024, generations=50),
                      "runs/x", model, tokenizer)
    trainer.start(); trainer.run()          # or trainer.resume(); trainer.run()

The command line is ``namm evolve`` (see ``namm evolve --help``).
"""

from namm.evolve.cmaes import CMAES, CMAESConfig
from namm.evolve.fitness import MemoryTerm, PopulationScorer, normalised_fitness
from namm.evolve.trainer import EvolveConfig, Trainer

__all__ = ["CMAES", "CMAESConfig", "EvolveConfig", "MemoryTerm", "PopulationScorer", "Trainer", "normalised_fitness"]
