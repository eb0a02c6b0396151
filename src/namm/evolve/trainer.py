"""The evolution loop: CMA-ES over NAMM parameters on training tasks, resumable and staged.

A run directory holds everything needed to continue:

* ``run.json`` — the configuration and where the run started from (``--init-from``);
* ``normalization/`` — the all-zero NAMM checkpoint carrying the frozen feature statistics,
  calibrated once at the start (docs/algorithm.md §4) or inherited from the previous stage;
* ``state/`` — CMA-ES state (safetensors + JSON, see :mod:`namm.evolve.cmaes`) and the trainer
  counters, replaced atomically after every generation;
* ``best/`` — the NAMM checkpoint of the best CMA-ES *mean* evaluated so far (an
  ``--init-checkpoint`` start is scored first, as generation 0);
* ``means/gen-NNNN/`` — the NAMM checkpoint of every evaluated mean, the candidates to choose from
  by a validation under real eviction (``benchmarks/real_loglik.py``);
* ``log.jsonl``, ``log.csv``, ``curve.png`` — one row per generation and the training curve.

Prompts of a generation are drawn from a fixed pool per task with a generator seeded by the
run seed and the generation number, so a resumed run makes the same draws as one that never
stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from namm.evolve.cmaes import CMAES, CMAESConfig
from namm.evolve.distributed import Workers
from namm.evolve.fitness import (ANSWER_STATISTICS, AnswerScorer, MemoryTerm, PopulationScorer, Scores, TrainingPrompt, answer_fitness,
                                 normalised_fitness, tokenize_samples)
from namm.evolve.log import TrainingLog
from namm.policies.base import check_schedule
from namm.policies.namm.checkpoint import calibration_record, check_pool

RUN_FILE = "run.json"
TRAINER_STATE = "trainer.json"


@dataclass
class EvolveConfig:
    """Everything that defines an evolution stage (saved in ``run.json``)."""

    model: str
    tasks: list[str]
    length: int | list[int]  # prompt length(s); a task's pool is spread evenly over them
    generations: int
    prompts_per_task: int = 8
    train_prompts: int = 32  # fixed pool of prompts per task; each generation draws from it
    population: int = 32
    elite: int | None = None  # default: half the population
    sigma0: float = 0.065
    separable: bool = False
    mean_lr: float = 1.0  # learning rate of the CMA-ES mean (docs/algorithm.md §9)
    eval_every: int = 10
    eval_batch_size: int = 4
    seed: int = 0
    memory_target: float | None = None
    memory_weight: float = 1.0
    n_up: int = 512
    scorer: str = "bam"
    hidden: list[int] | None = None  # hidden sizes of the "mlp" scorer (default: linear)
    batched: bool = True
    init_from: str | None = None
    init_checkpoint: str | None = None  # fresh CMA-ES whose mean starts at this checkpoint's parameters
    fitness: str = "task"  # "loglik"/"margin" (answer statistic vs full cache) or "task" (task metric ratio)
    evaluator: str = "real"  # "proxy" (recorded once per prompt, answer statistics only) or "real" (real eviction)
    budgets: list[float] | None = None  # budget mode: each generation draws a budget in [lo, hi]
    question_after_compression: bool = False  # query-agnostic: compress each context before its question
    schedule: str = "progressive"  # or "prompt-end": one compression, at the end of each prompt (context)
    pool: int | None = None  # neighbour pool of the selection (docs/algorithm.md §6); None: the start's, else 1

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("at least one training task is needed")
        if self.fitness not in (*ANSWER_STATISTICS, "task"):
            raise ValueError(f"--fitness must be one of {', '.join(ANSWER_STATISTICS)}, task; got {self.fitness!r}")
        if self.evaluator not in ("proxy", "real"):
            raise ValueError(f"--evaluator must be 'proxy' or 'real', got {self.evaluator!r}")
        if self.evaluator == "proxy" and self.fitness not in ANSWER_STATISTICS:
            raise ValueError("the proxy evaluator scores teacher-forced answers: use --fitness loglik or margin")
        if self.budgets is not None:
            self.budgets = [float(b) for b in self.budgets]
            if len(self.budgets) != 2 or not 0 < self.budgets[0] <= self.budgets[1] <= 1:
                raise ValueError(f"--budgets must be two fractions 0 < lo <= hi <= 1, got {self.budgets}")
            if self.memory_target is not None:
                raise ValueError("budget mode holds the memory fixed: drop --memory-target")
        check_schedule(self.schedule)
        if self.pool is not None:
            check_pool(self.pool, "--pool")
        if self.init_from and self.init_checkpoint:
            raise ValueError("give --init-from (a run's CMA-ES state) or --init-checkpoint (a NAMM's parameters), "
                             "not both")
        if self.scorer != "mlp" and self.hidden:
            raise ValueError("--hidden sizes apply to the mlp scorer only")
        for name, value in [("length", min(self.lengths)), ("generations", self.generations),
                            ("prompts-per-task", self.prompts_per_task), ("eval-every", self.eval_every),
                            ("eval-batch-size", self.eval_batch_size), ("train-prompts", self.train_prompts)]:
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if self.prompts_per_task > self.train_prompts:
            raise ValueError(f"--prompts-per-task ({self.prompts_per_task}) exceeds --train-prompts "
                             f"({self.train_prompts})")
        if min(self.lengths) <= self.n_up:
            raise ValueError(f"--length ({min(self.lengths)}) must exceed --n-up ({self.n_up}): shorter prompts see "
                             f"no memory update, so every NAMM keeps everything")
        if self.elite is None:
            self.elite = self.population // 2
        CMAESConfig(num_params=1, popsize=self.population, elite=self.elite, sigma0=self.sigma0,
                    mean_lr=self.mean_lr)  # validates
        self.memory  # validates the memory term

    @property
    def lengths(self) -> list[int]:
        return [self.length] if isinstance(self.length, int) else [int(n) for n in self.length]

    @property
    def scorer_spec(self) -> str | dict:
        return {"kind": "mlp", "hidden": list(self.hidden or [])} if self.scorer == "mlp" else self.scorer

    @property
    def mode(self) -> str:
        return "threshold" if self.budgets is None else "budget"

    @property
    def memory(self) -> MemoryTerm | None:
        return None if self.memory_target is None else MemoryTerm(self.memory_target, self.memory_weight)


@dataclass
class TrainerState:
    """Counters saved beside the CMA-ES state."""

    stage_generation: int = 0
    best_fitness: float | None = None
    best_generation: int | None = None
    wall_s: float = 0.0
    full_cache: dict[str, float] = field(default_factory=dict)


def build_policy(checkpoint: str | Path, config: EvolveConfig):
    from namm.policies.registry import make_policy

    return make_policy("namm", checkpoint=str(checkpoint), n_up=config.n_up, scorer=config.scorer_spec,
                       schedule=config.schedule, pool=config.pool)


class Trainer:
    """Runs (or resumes) one evolution stage in ``out``."""

    def __init__(self, config: EvolveConfig, out: str | Path, model, tokenizer, workers: Workers | None = None,
                 progress: bool = True, model_name: str | None = None, record_cache: str | Path | None = None):
        self.config, self.out = config, Path(out)
        self.record_cache = record_cache  # the proxy's recordings, kept on this machine (not part of the run)
        self.model, self.tokenizer = model, tokenizer
        self.workers = workers or Workers()
        self.progress = progress and self.workers.is_main
        self.model_name = model_name or config.model
        self.pool = self._prompt_pool()
        self.tasks = torch.tensor([p.task for p in self.pool])
        self.state = TrainerState()
        self.cmaes: CMAES | None = None
        self.policy = None
        self.scorer: PopulationScorer | None = None
        self.log = TrainingLog(self.out)

    # ---- setup ---------------------------------------------------------------------------

    def _prompt_pool(self) -> list[TrainingPrompt]:
        from namm.tasks.registry import get_task

        samples = []
        lengths = self.config.lengths
        for t, name in enumerate(self.config.tasks):
            task = get_task(name)
            for j, length in enumerate(lengths):
                count = self.config.train_prompts // len(lengths) + (j < self.config.train_prompts % len(lengths))
                if count:
                    samples += [(t, s) for s in task.samples(self.tokenizer, length, count, seed=self.config.seed)]
        return tokenize_samples(self.tokenizer, self.model, samples, self.config.question_after_compression)

    def start(self) -> None:
        """Fresh stage: calibrate (or inherit) the normalisation, build or inherit CMA-ES, save."""
        from namm.policies.namm.calibration import statistics_name
        from namm.policies.namm.checkpoint import load_namm_checkpoint, save_namm_checkpoint
        from namm.policies.namm.scorers import make_scorer

        if self.workers.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RUN_FILE).write_text(json.dumps({"config": asdict(self.config)}, indent=1))
        if self.config.init_from:
            previous = Path(self.config.init_from)
            self.cmaes = CMAES.load(previous / "state")
            self._check_inherited(self.cmaes.config)
            norm = load_namm_checkpoint(str(previous / "normalization"))
            mean, std, namm_config, calibration = norm.mean, norm.std, norm.config, calibration_record(norm)
            num_params = self.cmaes.config.num_params
        elif self.config.init_checkpoint:
            start = load_namm_checkpoint(self.config.init_checkpoint)
            mean, std, namm_config, calibration = start.mean, start.std, start.config, calibration_record(start)
            params = self._start_params(start.params, namm_config["scorer"])
            namm_config = {**namm_config, "scorer": make_scorer(self.config.scorer_spec, 1).config()}
            num_params = params.numel()
            self.cmaes = self._new_cmaes(num_params, params)
        else:
            mean, std = self._calibrate()
            calibration = {"kind": "calibration", "model": self.model_name, "task": self.config.tasks[0],
                           "statistics": statistics_name(robust=False)}
            probe = build_policy("zeros", self.config)
            num_params, namm_config = probe.num_params, probe.config()
            self.cmaes = self._new_cmaes(num_params)
        if self.config.pool is not None:  # the stage's pool, so a later --init-from stage inherits it
            namm_config = {**namm_config, "selection": {**namm_config.get("selection", {}), "pool": self.config.pool}}
        if self.workers.is_main:
            save_namm_checkpoint(self.out / "normalization", torch.zeros(num_params), mean, std, namm_config,
                                 self._provenance(self.cmaes.generation, fitness=None, calibration=calibration))
            self._save_state()
        self._barrier()
        self.build_scorer()
        if self.config.init_checkpoint:
            self.evaluate_start()

    def _start_params(self, params: torch.Tensor, scorer: dict) -> torch.Tensor:
        """The ``--init-checkpoint`` parameters for this run's scorer: as they are when the scorers
        match; a linear mlp start lifted exactly into a one-hidden-layer run (``lift_linear``)."""
        from namm.policies.namm.scorers import lift_linear, make_scorer

        target = make_scorer(self.config.scorer_spec, params.numel() - 1)
        if scorer == target.config():
            return params
        if scorer == {"kind": "mlp", "hidden": []} and target.kind == "mlp" and len(target.hidden) == 1:
            return lift_linear(params, target, seed=self.config.seed)
        raise ValueError(f"--init-checkpoint {self.config.init_checkpoint} has scorer {scorer}; "
                         f"this run evolves {self.config.scorer_spec} (only a linear mlp lifts to one hidden layer)")

    def evaluate_start(self) -> None:
        """Score the ``--init-checkpoint`` start on the whole prompt pool before the first generation:
        it is logged as generation 0 and becomes ``best/``, so ``best/`` is never worse than the start
        on the training prompts."""
        start = time.perf_counter()
        row = {"generation": self.cmaes.generation, "stage_generation": 0, **self.evaluate_mean()}
        row["wall_s"] = time.perf_counter() - start
        self.state.wall_s += row["wall_s"]
        row["total_wall_s"] = self.state.wall_s
        self._record(row)

    def _record(self, row: dict) -> None:
        """Log ``row`` and save the state (the main process), then wait for the others."""
        self.state.full_cache = dict(self.scorer.full_cache)
        if self.workers.is_main:
            self.log.append(row)
            self.log.plot(fitness=self.config.fitness)
            self._save_state()
        self._barrier()

    def _new_cmaes(self, num_params: int, mean: torch.Tensor | None = None) -> CMAES:
        """A fresh CMA-ES (step size ``sigma0``, identity covariance) centred on ``mean`` (zeros by default)."""
        return CMAES(CMAESConfig(num_params=num_params, popsize=self.config.population, elite=self.config.elite,
                                 sigma0=self.config.sigma0, separable=self.config.separable,
                                 mean_lr=self.config.mean_lr, seed=self.config.seed),
                     mean=mean)

    def resume(self) -> None:
        """Continue the stage saved in ``out`` exactly where it stopped."""
        state_dir = self.out / "state"
        self.cmaes = CMAES.load(state_dir)
        saved = json.loads((state_dir / TRAINER_STATE).read_text())
        self.state = TrainerState(**saved)
        self.build_scorer()

    def _check_inherited(self, cma: CMAESConfig) -> None:
        before = (cma.popsize, cma.elite, cma.separable, cma.mean_lr)
        now = (self.config.population, self.config.elite, self.config.separable, self.config.mean_lr)
        if before != now:
            raise ValueError(f"the --init-from run used (population, elite, separable, mean-lr) = {before}; a stage "
                             f"keeps its CMA-ES state, so it must use the same (got {now})")

    def _calibrate(self):
        from namm.policies.namm.calibration import calibrate_normalization

        first_task = [p.token_ids for p in self.pool if p.task == 0]
        return calibrate_normalization(self.model, first_task, n_up=self.config.n_up, progress=self.progress)

    def build_scorer(self) -> None:
        """The policy from the run's saved normalisation and the scorer of its evaluator and fitness."""
        self.policy = build_policy(self.out / "normalization", self.config)
        if self.config.evaluator == "proxy":
            from namm.evolve.proxy import ProxyScorer
            from namm.evolve.record_store import RecordStore

            store = RecordStore(self.record_cache) if self.record_cache else None
            self.scorer = ProxyScorer(self.model, self.policy, self.workers, progress=self.progress,
                                      statistic=self.config.fitness, store=store)
        elif self.config.fitness in ANSWER_STATISTICS:
            self.scorer = AnswerScorer(self.model, self.tokenizer, self.policy, self.workers, progress=self.progress,
                                       statistic=self.config.fitness)
        else:
            self.scorer = PopulationScorer(self.model, self.tokenizer, self.policy, self.workers, progress=self.progress)
        if self.config.evaluator == "real":  # proxy references differ from real ones: not carried over
            self.scorer.full_cache.update(self.state.full_cache)

    def fitness(self, scores, full, tasks) -> torch.Tensor:
        """(P,) fitness of (P, n) scores against the (n,) full-cache values (see ``config.fitness``)."""
        combine = answer_fitness if self.config.fitness in ANSWER_STATISTICS else normalised_fitness
        return combine(scores.scores, full, tasks, scores.cache_fraction, self.config.memory)

    def generation_budget(self, generation: int) -> float | None:
        """Budget mode: the budget of ``generation``, drawn uniformly in ``config.budgets`` from a
        generator seeded by the run seed and the generation (the same after a resume)."""
        if self.config.budgets is None:
            return None
        lo, hi = self.config.budgets
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + generation + 500_009)
        return round(lo + (hi - lo) * float(torch.rand((), generator=gen)), 4)

    def eval_budgets(self) -> list[float | None]:
        """Budgets the CMA-ES mean is evaluated at: both ends of the range (None: threshold mode)."""
        return [None] if self.config.budgets is None else list(dict.fromkeys(self.config.budgets))

    def _provenance(self, generation: int, fitness: float | None, calibration: dict | None = None) -> dict:
        """What a saved checkpoint records about the run and how its normalisation statistics were
        measured (``calibration``; default: the record of the built policy's statistics, if any)."""
        if calibration is None and self.policy is not None:
            calibration = calibration_record(self.policy.loaded_checkpoint)
        provenance = {"model": self.model_name, "tasks": self.config.tasks, "length": self.config.length,
                      "generation": generation, "mean_fitness": fitness, "population": self.config.population,
                      "separable": self.config.separable, "seed": self.config.seed, "trainer": "namm evolve",
                      "fitness": self.config.fitness, "evaluator": self.config.evaluator, "mode": self.config.mode,
                      "budgets": self.config.budgets, "schedule": self.config.schedule,
                      "protocol": "query-agnostic" if self.config.question_after_compression else "query-aware"}
        if calibration is not None:
            provenance["normalization"] = calibration
        return provenance

    # ---- the loop ------------------------------------------------------------------------

    def generation_prompts(self, generation: int) -> list[TrainingPrompt]:
        """The prompts every member of ``generation`` is scored on (same for all members)."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + generation)
        chosen = []
        for t in range(len(self.config.tasks)):
            ids = [i for i, p in enumerate(self.pool) if p.task == t]
            pick = torch.randperm(len(ids), generator=gen)[: self.config.prompts_per_task]
            chosen += [self.pool[ids[k]] for k in sorted(pick.tolist())]
        return chosen

    def step(self) -> dict:
        """One generation: ask, score, tell; every ``eval_every`` generations score the mean."""
        start = time.perf_counter()
        generation = self.cmaes.generation
        prompts = self.generation_prompts(generation)
        full = self.scorer.full(prompts, self.config.eval_batch_size)
        params = self.cmaes.ask()
        budget = self.generation_budget(generation)
        self.policy.set_budget(budget)
        result = self.scorer.members(params, prompts, batched=self.config.batched)
        self.policy.set_budget(None)
        tasks = torch.tensor([p.task for p in prompts])
        fitness = self.fitness(result, full, tasks)
        self.cmaes.tell(fitness)
        self.state.stage_generation += 1
        row = {
            "generation": self.cmaes.generation, "stage_generation": self.state.stage_generation, "budget": budget,
            "fitness_best": float(fitness.max()), "fitness_mean": float(fitness.mean()),
            "fitness_median": float(fitness.median()), "sigma": self.cmaes.sigma,
            "cache_fraction_mean": float(result.cache_fraction.mean()),
            "cache_fraction_best": float(result.cache_fraction[int(fitness.argmax())].mean()),
            "score_mean": float(result.scores.mean()), "full_score_mean": float(full.mean()),
            "member_fitness": [round(float(f), 5) for f in fitness],
            "member_cache_fraction": [round(float(c), 5) for c in result.cache_fraction.mean(1)],
        }
        last = self.state.stage_generation >= self.config.generations
        if self.state.stage_generation % self.config.eval_every == 0 or last:
            row.update(self.evaluate_mean())
        self.state.wall_s += time.perf_counter() - start
        row["wall_s"] = time.perf_counter() - start
        row["total_wall_s"] = self.state.wall_s
        self._record(row)
        return row

    def evaluate_mean(self) -> dict:
        """Score the CMA-ES mean on the whole prompt pool, save it in ``means/`` and keep it as ``best/``
        if it is the best."""
        full = self.scorer.full(self.pool, self.config.eval_batch_size)
        mean = self.cmaes.mean
        results = []
        for budget in self.eval_budgets():
            self.policy.set_budget(budget)
            results.append(self.scorer.vector(mean, self.pool, self.config.eval_batch_size))
        self.policy.set_budget(None)
        result = Scores(torch.cat([r.scores for r in results], 1), torch.cat([r.cache_fraction for r in results], 1))
        fitness = float(self.fitness(result, full.repeat(len(results)), self.tasks.repeat(len(results)))[0])
        improved = self.state.best_fitness is None or fitness > self.state.best_fitness
        if improved:
            self.state.best_fitness, self.state.best_generation = fitness, self.cmaes.generation
        if self.workers.is_main:
            provenance = self._provenance(self.cmaes.generation, fitness)
            provenance.update(mean_cache_fraction=float(result.cache_fraction.mean()),
                              mean_score=float(result.scores.mean()), full_score=float(full.mean()))
            candidate = self.out / "means" / f"gen-{self.cmaes.generation:04d}"
            self._save_checkpoint(candidate, mean, provenance)
            if improved:
                self._save_checkpoint(self.out / "best", mean, provenance)
        return {"eval_fitness": fitness, "eval_cache_fraction": float(result.cache_fraction.mean()),
                "eval_score": float(result.scores.mean()), "eval_full_score": float(full.mean()),
                "eval_improved": improved}

    def run(self) -> None:
        """Run generations until this stage has ``config.generations`` of them."""
        left = self.config.generations - self.state.stage_generation
        with tqdm(total=self.config.generations, initial=self.state.stage_generation, desc="evolve",
                  unit="gen", disable=not self.progress) as bar:
            for _ in range(max(left, 0)):
                row = self.step()
                bar.set_postfix(best=f"{row['fitness_best']:.3f}", mean=f"{row['fitness_mean']:.3f}",
                                cache=f"{row['cache_fraction_mean']:.2f}", sigma=f"{row['sigma']:.4f}")
                bar.update()

    # ---- saving --------------------------------------------------------------------------

    def _save_checkpoint(self, target: Path, params: torch.Tensor, provenance: dict) -> None:
        """Write ``params`` as a NAMM checkpoint in ``target``, replacing it atomically."""
        from namm.policies.namm.checkpoint import save_namm_checkpoint

        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        norm = self.policy.normalization
        config = self.policy.config()
        if self.config.budgets is not None:
            config["selection"].update(mode="budget", budgets=self.config.budgets)
        save_namm_checkpoint(tmp, params, norm.mean, norm.std, config, provenance)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    def _save_state(self) -> None:
        tmp, final = self.out / "state.tmp", self.out / "state"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.cmaes.save(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(self.state), indent=1))
        old = self.out / "state.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _barrier(self) -> None:
        if self.workers.world > 1:
            import torch.distributed as dist

            dist.barrier()


def load_run_config(out: str | Path) -> EvolveConfig:
    """The configuration saved in a run directory (for ``--resume``)."""
    file = Path(out) / RUN_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no evolution run in {out} (missing {RUN_FILE})")
    try:
        return EvolveConfig(**json.loads(file.read_text())["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"malformed {file}: {err}") from None
