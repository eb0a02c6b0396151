"""CMA-ES for NAMM parameters: pycma with the paper's defaults, an ask/tell interface over torch
tensors that *maximises* fitness, and a state that saves to safetensors + JSON (no pickle).

Saving: pycma keeps its state as plain attributes (numpy arrays and numbers) of the strategy
object and of three helpers (the sampler holding the covariance, the diagonal scaling and the
step-size adaptation with its path ``ps``). :meth:`CMAES.state` copies every numeric array and
number of those four objects — mean, sigma, paths ``pc``/``ps``, covariance (full ``C`` with its
eigen-basis ``B``/``D`` or the diagonal), counters (``countiter``, ``countevals``, eigen update
counters) — plus the state of the random generator that draws the samples. :meth:`CMAES.from_state`
rebuilds a strategy from the same options and writes these values back, so a resumed run draws
and updates exactly as an uninterrupted one (a test checks it bit for bit). Nothing is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cma
from cma.sigma_adaptation import CMAAdaptSigmaCSA
from cma.utilities import utils as cma_utils
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import Tensor

STATE_TENSORS = "cmaes_state.safetensors"
STATE_JSON = "cmaes_state.json"
# pycma objects whose numeric attributes make up the optimiser state (attribute path from the strategy).
_PARTS = {"es": "", "sampler": "sm", "scaling": "sigma_vec", "step": "adapt_sigma"}


@dataclass
class CMAESConfig:
    """CMA-ES settings; the defaults are the paper's (docs/algorithm.md §9)."""

    num_params: int
    popsize: int = 32
    elite: int = 16  # parents; recombination weights ln((λ+1)/2) − ln(i+1), normalised
    sigma0: float = 0.065
    separable: bool = False  # diagonal covariance (linear time and memory)
    active: bool = True  # active CMA: negative weights for the worst members
    mean_lr: float = 1.0  # learning rate of the mean (pycma's CMA_cmean); < 1 averages noisy steps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_params < 1:
            raise ValueError("num_params must be >= 1")
        if self.popsize < 3:
            raise ValueError(f"population must be >= 3, got {self.popsize}")
        if not 1 <= self.elite <= self.popsize // 2:
            raise ValueError(f"elite must be in [1, population / 2] (the weights ln((λ+1)/2) − ln(i+1) must be "
                             f"positive), got {self.elite} for population {self.popsize}")
        if not self.sigma0 > 0:
            raise ValueError("sigma0 must be > 0")
        if not 0 < self.mean_lr <= 1:
            raise ValueError(f"the mean's learning rate must be in (0, 1], got {self.mean_lr}")


def recombination_weights(popsize: int, elite: int) -> np.ndarray:
    """The positive recombination weights ln((λ+1)/2) − ln(i+1), i < elite, normalised to sum 1."""
    w = math.log((popsize + 1) / 2) - np.log(np.arange(1, elite + 1))
    return w / w.sum()


def _is_number(value: object) -> bool:
    return isinstance(value, (bool, int, float, np.number, np.bool_))


def _plain(value: object) -> object:
    return value.item() if isinstance(value, (np.number, np.bool_)) else value


class _Normal:
    """The sampler's source of standard normal numbers, with a state that serialises to JSON."""

    def __init__(self, seed: int):
        self.generator = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.generator.standard_normal(shape)


class CMAES:
    """Ask/tell CMA-ES over flat parameter vectors (torch float32), maximising fitness.

    Standard CMA-ES throughout: cumulative step-size adaptation (pycma would switch to TPA from
    300 dimensions) and no mirrored sampling (pycma's default below population 6)."""

    def __init__(self, config: CMAESConfig, mean: Tensor | None = None):
        self.config = config
        self.normal = _Normal(config.seed)
        x0 = np.zeros(config.num_params) if mean is None else mean.detach().double().cpu().numpy()
        if x0.shape != (config.num_params,):
            raise ValueError(f"initial mean has shape {tuple(x0.shape)}, expected ({config.num_params},)")
        options = {
            "popsize": config.popsize, "CMA_mu": config.elite, "CMA_active": config.active,
            "CMA_cmean": config.mean_lr, "CMA_diagonal": config.separable, "CMA_mirrors": 0, "randn": self.normal,
            "AdaptSigma": CMAAdaptSigmaCSA,  # standard cumulative step-size adaptation at any dimension
            "seed": float("nan"), "verbose": -9, "verb_disp": 0, "verb_log": 0, "tolx": 0, "tolfun": 0,
            "tolfunhist": 0, "tolstagnation": 1 << 62, "tolflatfitness": 1 << 62, "maxiter": float("inf"),
            "maxfevals": float("inf"), "tolconditioncov": float("inf"),
        }
        self.es = cma.CMAEvolutionStrategy(x0, config.sigma0, options)
        expected = recombination_weights(config.popsize, config.elite)
        if not np.allclose(self.es.sp.weights.positive_weights, expected):
            raise RuntimeError("pycma recombination weights differ from ln((λ+1)/2) − ln(i+1)")
        self._asked: np.ndarray | None = None

    @property
    def mean(self) -> Tensor:
        """(num_params,) float32 distribution mean."""
        return torch.from_numpy(np.asarray(self.es.mean, dtype=np.float32).copy())

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    @property
    def generation(self) -> int:
        return int(self.es.countiter)

    def ask(self) -> Tensor:
        """(popsize, num_params) float32 candidates of the next generation."""
        self._asked = np.asarray(self.es.ask())
        return torch.from_numpy(self._asked.astype(np.float32))

    def tell(self, fitness: Tensor | list[float]) -> None:
        """Update the distribution from the fitness (higher is better) of the last :meth:`ask`."""
        if self._asked is None:
            raise RuntimeError("tell() without ask()")
        values = np.asarray(torch.as_tensor(fitness, dtype=torch.float64).cpu(), dtype=np.float64)
        if values.shape != (len(self._asked),):
            raise ValueError(f"expected {len(self._asked)} fitness values, got shape {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("fitness values must be finite")
        self.es.tell(list(self._asked), list(-values))
        self._asked = None

    # ---- state -----------------------------------------------------------------------------

    def _objects(self) -> dict[str, object]:
        return {name: self.es if not path else getattr(self.es, path) for name, path in _PARTS.items()}

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """The whole optimiser state: named arrays (for safetensors) and JSON-able metadata."""
        if self._asked is not None:
            raise RuntimeError("cannot save between ask() and tell()")
        arrays, numbers, zero_dim = {}, {}, []
        for name, obj in self._objects().items():
            for attr, value in vars(obj).items():
                if isinstance(value, np.ndarray) and value.dtype.kind in "fiub" and value.size:
                    arrays[f"{name}.{attr}"] = np.ascontiguousarray(value.reshape(-1) if value.ndim == 0 else value)
                    if value.ndim == 0:
                        zero_dim.append(f"{name}.{attr}")
                elif _is_number(value):
                    numbers[f"{name}.{attr}"] = _plain(value)
                elif isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
                    numbers[f"{name}.{attr}"] = {k: _plain(v) for k, v in value.items()}  # cached coefficients
        meta = {"config": asdict(self.config), "numbers": numbers, "zero_dim": zero_dim, "rng": self.normal.generator.bit_generator.state,
                "pycma_version": cma.__version__}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> "CMAES":
        """Rebuild an optimiser from :meth:`state` (same options, then every saved value written back)."""
        opt = cls(CMAESConfig(**meta["config"]))
        objects = opt._objects()
        for key, value in list(arrays.items()) + list(meta["numbers"].items()):
            name, attr = key.split(".", 1)
            if name not in objects:
                raise ValueError(f"malformed CMA-ES state: unknown entry {key!r}")
            current = getattr(objects[name], attr, None)
            if isinstance(value, np.ndarray):
                value = value.reshape(()) if key in meta["zero_dim"] else value.copy()
            elif isinstance(current, np.number):
                value = type(current)(value)
            setattr(objects[name], attr, value)
        opt.normal.generator.bit_generator.state = meta["rng"]
        if not hasattr(opt.es, "timer"):  # pycma creates its wall-clock timer at the first ask()
            opt.es.timer = cma_utils.ElapsedWCTime()
        return opt

    def save(self, directory: str | Path) -> None:
        """Write ``cmaes_state.safetensors`` and ``cmaes_state.json`` into ``directory``."""
        directory = Path(directory)
        arrays, meta = self.state()
        save_file(arrays, str(directory / STATE_TENSORS))
        (directory / STATE_JSON).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "CMAES":
        directory = Path(directory)
        tensors, meta_file = directory / STATE_TENSORS, directory / STATE_JSON
        if not tensors.is_file() or not meta_file.is_file():
            raise FileNotFoundError(f"no CMA-ES state in {directory} (expected {STATE_TENSORS} and {STATE_JSON})")
        try:
            meta = json.loads(meta_file.read_text())
            return cls.from_state(load_file(str(tensors)), meta)
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"malformed CMA-ES state in {directory}: {err}") from None
