"""The one table of trained settings of the reproduction, shared by ``train``, ``analyze`` and ``report``.

A *setting* is a config in ``pdelightning_reproduce/configs/`` (the source of truth for what is trained). Main
settings train once per seed; sweep settings train one run per *cell* (a point of a grid: depth x learning rate, or
the eq. (21) number at initialisation) and seed. A run lives in ``<out>/<setting>/[<cell>/]seed<k>/``.

Model-vs-model comparisons use *pairs*: the model of seed ``s`` against the reference of seed ``(s + offset) mod n``
(``n`` = number of seeds). ``offset = 1`` gives independently initialised models; ``offset = 0`` (the
"shared initialisation" pair) reproduces the old report's comparison of twins: our ``TransformerClassifier`` and
``PDEClassifier`` build their modules in the same random-number order, so at one seed every shared tensor is
identical and the data order is the same.

Every choice the paper does not state is ours and is marked "(ours)" in the configs and in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

#: The experiment configs ship inside this package (``pdelightning_reproduce/configs/``).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DataKind = Literal["mnist", "newsgroups"]
Role = Literal["main", "sweep"]

#: Seeds of every setting (>= 5, the issue's minimum).
SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)

#: Steps at which a model's weights are saved (those within the run; the final step is always saved too):
#: step 0 (initialisation) and a 1-2-5 log-spaced series, for the trajectories of the information-bottleneck claims.
CHECKPOINT_STEPS: tuple[int, ...] = (0, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

#: v2 sweeps: depth x learning rate (no gradient clipping, one epoch of MNIST), for the baseline and both ablations.
SWEEP_DEPTHS: tuple[int, ...] = (6, 12, 24)
SWEEP_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
#: v2 PDE sweep (no longer trained; kept for the v2 records): Δt chosen per seed so that eq. (21) at initialisation
#: (maximum over the steps) equals each target. Its cells 1.5 and 3 needed Δt of about 1.1 and 2.2 (11-22 times the
#: main model's), beyond what a user would pick, and only they diverged (issue 18).
EQ21_TARGETS: tuple[float, ...] = (0.3, 0.9, 1.5, 3.0)
#: Δt of the main MNIST PDE model (``configs/mnist_pde.yaml``; a test keeps the two equal).
MAIN_PDE_DT = 0.1
#: v3 PDE sweeps: Δt itself, in the range a user would pick for 10 Euler steps, the main model's Δt among them (ours).
#: From 0.025 (total time 0.25) to 1 (total time 10; ``u + f(u)``, the residual update of a ResNet or Transformer, the
#: largest step one would take). At initialisation eq. (21) is about 1.4 Δt for these models (v2: Δt 2.2 gave 3), so
#: the grid crosses the stability bound eq. (21) = 1 between Δt 0.5 and 1; each run records its own eq. (21).
DT_GRID: tuple[float, ...] = (0.025, 0.05, MAIN_PDE_DT, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Cell:
    """One point of a sweep grid (main settings have the single empty cell).

    Attributes:
        name: directory name, e.g. ``"L24-lr1e-02"`` or ``"eq21-1.5"``; ``""`` for a main setting.
        overrides: extra ``pdelightning fit`` arguments of this cell.
        depth: the number of layers set by the cell, if it sets one.
        lr: the learning rate set by the cell, if it sets one.
        eq21_target: eq. (21) at initialisation that Δt is chosen for (seed by seed), if any (v2).
        dt: the Δt set by the cell, if it sets one (v3).
    """

    name: str = ""
    overrides: tuple[str, ...] = ()
    depth: int | None = None
    lr: float | None = None
    eq21_target: float | None = None
    dt: float | None = None


@dataclass(frozen=True)
class Setting:
    """One trained configuration.

    Attributes:
        name: directory and report name.
        config: file in ``pdelightning_reproduce/configs/``.
        data: ``"mnist"`` or ``"newsgroups"``.
        role: ``"main"`` (trained to its stopping rule, analysed in full) or ``"sweep"`` (short fixed budget).
        label: short name in the report.
        cells: the grid points; one empty cell for a main setting.
        sections: report sections this setting serves.
        paper_variant: for the paper's own PDE models, the section whose model it is (``"§3.1"``, ...); ``""`` for
            our models (the Transformer and our attention + FFN "full PDE" model).
    """

    name: str
    config: str
    data: DataKind
    role: Role
    label: str
    cells: tuple[Cell, ...] = (Cell(),)
    sections: tuple[str, ...] = ()
    paper_variant: str = ""

    @property
    def config_path(self) -> Path:
        """Absolute path of the config file."""
        return CONFIG_DIR / self.config


def _lr_label(lr: float) -> str:
    return f"{lr:.0e}"


def depth_lr_cells(depths: tuple[int, ...] = SWEEP_DEPTHS, lrs: tuple[float, ...] = SWEEP_LRS) -> tuple[Cell, ...]:
    """The depth x learning-rate grid of the Transformer sweeps, shallow and slow first."""
    return tuple(
        Cell(
            name=f"L{d}-lr{_lr_label(lr)}",
            overrides=(f"--model.model.init_args.n_layers={d}", f"--model.optimizer.init_args.lr={lr}"),
            depth=d,
            lr=lr,
        )
        for d in depths
        for lr in lrs
    )


def eq21_cells(targets: tuple[float, ...] = EQ21_TARGETS) -> tuple[Cell, ...]:
    """The v2 eq. (21) grid of the PDE sweeps (Δt is filled in per seed by the trainer); no longer trained."""
    return tuple(Cell(name=f"eq21-{t:g}", eq21_target=t) for t in targets)


def dt_cells(dts: tuple[float, ...] = DT_GRID) -> tuple[Cell, ...]:
    """The v3 Δt grid of the PDE sweeps, small steps first (``dt0.1`` is the main model's Δt)."""
    return tuple(Cell(name=f"dt{dt:g}", overrides=(f"--model.model.init_args.dt={dt!r}",), dt=dt) for dt in dts)


def cells_by_lr(name: str) -> dict[float, tuple[Cell, ...]]:
    """The cells of a depth x lr sweep grouped by learning rate, for reporting a baseline and its ablation per lr
    (both sweeps have the same grid, so each lr's cells are matched depth by depth).

    Raises:
        KeyError: for an unknown setting (naming the valid ones) or one whose cells set no learning rate.
    """
    cells = [c for c in setting(name).cells if c.lr is not None]
    if not cells:
        raise KeyError(f"setting {name!r} has no learning-rate cells")
    return {lr: tuple(c for c in cells if c.lr == lr) for lr in sorted({c.lr for c in cells if c.lr is not None})}


def settings_for(section: str) -> tuple[Setting, ...]:
    """The settings a report section compares (ours and the paper's variants), in table order."""
    return tuple(s for s in SETTINGS if section in s.sections)


_MNIST_SECTIONS = ("table2", "table3", "attention")
_NG_SECTIONS = ("bottleneck", "gradients", "perturbation")
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "mnist_transformer",
        "mnist_transformer.yaml",
        "mnist",
        "main",
        "Transformer (MNIST)",
        sections=(*_MNIST_SECTIONS, "ablations"),
    ),
    Setting(
        "mnist_pde", "mnist_pde.yaml", "mnist", "main", "full PDE (MNIST)", sections=(*_MNIST_SECTIONS, "refinement")
    ),
    Setting(
        "newsgroups_transformer",
        "newsgroups_transformer.yaml",
        "newsgroups",
        "main",
        "Transformer (20NG)",
        sections=_NG_SECTIONS,
    ),
    Setting("newsgroups_pde", "newsgroups_pde.yaml", "newsgroups", "main", "full PDE (20NG)", sections=_NG_SECTIONS),
    # v3: the paper's own PDE models, each in the experiments it belongs to, beside our "full PDE" rows
    Setting(
        "mnist_pde_diffusion",
        "mnist_pde_diffusion.yaml",
        "mnist",
        "main",
        "diffusion-only PDE (MNIST, §3.1)",
        sections=_MNIST_SECTIONS,
        paper_variant="§3.1",
    ),
    Setting(
        "newsgroups_pde_linear_relu",
        "newsgroups_pde_linear_relu.yaml",
        "newsgroups",
        "main",
        "linear + ReLU PDE (20NG, §3.3)",
        sections=("bottleneck",),
        paper_variant="§3.3",
    ),
    Setting(
        "newsgroups_pde_linear",
        "newsgroups_pde_linear.yaml",
        "newsgroups",
        "main",
        "embedding + linear PDE (20NG, §3.4)",
        sections=("gradients",),
        paper_variant="§3.4",
    ),
    Setting(
        "sweep_transformer",
        "mnist_sweep_transformer.yaml",
        "mnist",
        "sweep",
        "Transformer (baseline)",
        cells=depth_lr_cells(),
        sections=("ablations",),
    ),
    Setting(
        "sweep_no_residual",
        "mnist_sweep_no_residual.yaml",
        "mnist",
        "sweep",
        "Transformer without residual",
        cells=depth_lr_cells(),
        sections=("ablations",),
    ),
    Setting(
        "sweep_no_layernorm",
        "mnist_sweep_no_layernorm.yaml",
        "mnist",
        "sweep",
        "Transformer without LayerNorm",
        cells=depth_lr_cells(),
        sections=("ablations",),
    ),
    Setting(
        "sweep_pde",
        "mnist_sweep_pde.yaml",
        "mnist",
        "sweep",
        "PDE without stabilizers",
        cells=dt_cells(),
        sections=("ablations",),
    ),
    Setting(
        "sweep_pde_stabilized",
        "mnist_sweep_pde_stabilized.yaml",
        "mnist",
        "sweep",
        "PDE with stabilizers",
        cells=dt_cells(),
        sections=("ablations",),
    ),
)
SETTING_NAMES: tuple[str, ...] = tuple(s.name for s in SETTINGS)
#: The main settings (trained to their stopping rule and analysed in full), in report order.
MAIN_SETTING_NAMES: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.role == "main")
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def setting(name: str) -> Setting:
    """The setting called ``name``.

    Raises:
        KeyError: naming the valid settings.
    """
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown setting {name!r}; valid: {', '.join(SETTING_NAMES)}") from None


@dataclass(frozen=True)
class Pair:
    """A model-vs-reference comparison: ``model`` seed ``s`` against ``reference`` seed ``(s + offset) mod n``.

    Attributes:
        name: directory and summary name (``pair_<name>``).
        model: setting of the compared model.
        reference: setting of the reference.
        offset: seed offset of the reference (0: the same seed).
        label: what the pair is, for the report.
    """

    name: str
    model: str
    reference: str
    offset: int
    label: str

    def reference_seed(self, seed: int, seeds: tuple[int, ...]) -> int:
        """The reference's seed for the model of ``seed``, cycling through ``seeds``."""
        i = seeds.index(seed)
        return seeds[(i + self.offset) % len(seeds)]


PAIRS: tuple[Pair, ...] = (
    Pair(
        "pde_vs_transformer",
        "mnist_pde",
        "mnist_transformer",
        1,
        "PDE seed s vs Transformer seed s+1 (independent initialisations)",
    ),
    Pair(
        "transformer_vs_transformer",
        "mnist_transformer",
        "mnist_transformer",
        1,
        "ceiling: Transformer seed s vs Transformer seed s+1",
    ),
    Pair(
        "pde_vs_transformer_shared_init",
        "mnist_pde",
        "mnist_transformer",
        0,
        "shared initialisation: PDE and Transformer of the same seed (the old report's twins)",
    ),
    Pair(
        "pde_diffusion_vs_transformer",
        "mnist_pde_diffusion",
        "mnist_transformer",
        1,
        "the paper's diffusion-only PDE (§3.1) seed s vs Transformer seed s+1 (independent initialisations)",
    ),
)
PAIR_NAMES: tuple[str, ...] = tuple(p.name for p in PAIRS)


@dataclass(frozen=True, order=True)
class RunSpec:
    """One run: a setting, a cell of it (``""`` for main settings) and a seed."""

    setting: str
    cell: str
    seed: int

    @property
    def id(self) -> str:
        """``setting[/cell]/seed<k>``, also the run's directory relative to the output root."""
        return "/".join(p for p in (self.setting, self.cell, f"seed{self.seed}") if p)

    def path(self, out: Path) -> Path:
        """The run directory under ``out``."""
        return Path(out) / self.id

    def get_cell(self) -> Cell:
        """This run's :class:`Cell`.

        Raises:
            KeyError: when the setting has no such cell, naming its cells.
        """
        cells = {c.name: c for c in setting(self.setting).cells}
        if self.cell not in cells:
            raise KeyError(f"setting {self.setting!r} has no cell {self.cell!r}; valid: {sorted(cells)}")
        return cells[self.cell]


@dataclass(frozen=True, order=True)
class PairSpec:
    """One pair comparison unit: a :class:`Pair` at the model's seed ``seed``."""

    pair: str
    seed: int
    reference_seed: int

    @property
    def id(self) -> str:
        """``pair_<name>/seed<k>``, the unit's directory relative to the output root."""
        return f"pair_{self.pair}/seed{self.seed}"

    def get_pair(self) -> Pair:
        """This unit's :class:`Pair`."""
        return {p.name: p for p in PAIRS}[self.pair]

    def members(self) -> tuple[RunSpec, RunSpec]:
        """The model run and the reference run."""
        p = self.get_pair()
        return RunSpec(p.model, "", self.seed), RunSpec(p.reference, "", self.reference_seed)


@dataclass(frozen=True)
class Plan:
    """What to train and analyse: settings, seeds, and a ``quick`` flag (tiny pipeline check).

    Runs are ordered by priority: the main settings seed by seed (MNIST first: its pairs need two settings),
    then the sweeps seed-major (every cell gets seed 0 before any gets seed 1), so a run cut short still
    leaves every cell with some seeds.
    """

    settings: tuple[str, ...] = SETTING_NAMES
    seeds: tuple[int, ...] = SEEDS
    quick: bool = False
    cells: dict[str, tuple[str, ...]] = field(default_factory=dict)  # optional subset of cells per setting
    sweep_seeds: tuple[int, ...] | None = None  # seeds of the sweeps (None: ``seeds``)
    budget: str = "full"  # name of the :mod:`~pdelightning_reproduce.budget` whose cuts every run gets

    def runs(self) -> list[RunSpec]:
        """Every run, in priority order."""
        main = [s for s in SETTINGS if s.name in self.settings and s.role == "main"]
        sweep = [s for s in SETTINGS if s.name in self.settings and s.role == "sweep"]
        out = [RunSpec(s.name, "", seed) for seed in self.seeds for s in main]
        for seed in self.sweep_seeds if self.sweep_seeds is not None else self.seeds:
            for s in sweep:
                for c in s.cells:
                    if s.name in self.cells and c.name not in self.cells[s.name]:
                        continue
                    out.append(RunSpec(s.name, c.name, seed))
        return out

    def pairs(self) -> list[PairSpec]:
        """Every pair unit whose two settings are in the plan."""
        return [
            PairSpec(p.name, seed, p.reference_seed(seed, self.seeds))
            for p in PAIRS
            if p.model in self.settings and p.reference in self.settings
            for seed in self.seeds
        ]


#: ``--quick``: the same pipeline on tiny budgets (numbers mean nothing). Per data kind, appended to every run.
QUICK_OVERRIDES: dict[str, tuple[str, ...]] = {
    "mnist": (
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=6",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--data.init_args.batch_size=16",
        "--data.init_args.train_subset=400",
        "--data.init_args.test_subset=200",
    ),
    "newsgroups": (
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=6",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--data.init_args.batch_size=16",
        "--data.init_args.train_subset=300",
        "--data.init_args.test_subset=200",
        "--data.init_args.max_len=32",
        "--data.init_args.vocab_size=500",
    ),
}
#: ``--quick``: fewer layers for the main settings (the sweeps keep their grids but use QUICK_DEPTHS).
QUICK_MAIN_LAYERS = 2
QUICK_DEPTHS: tuple[int, ...] = (2, 3)
QUICK_SEEDS: tuple[int, ...] = (0, 1)


def quick_overrides(spec: RunSpec) -> list[str]:
    """The ``--quick`` overrides of one run (on top of the cell's own)."""
    s = setting(spec.setting)
    extra = list(QUICK_OVERRIDES[s.data])
    cell = spec.get_cell()
    if cell.depth is not None:
        depth = (
            QUICK_DEPTHS[min(SWEEP_DEPTHS.index(cell.depth), len(QUICK_DEPTHS) - 1)]
            if cell.depth in SWEEP_DEPTHS
            else 2
        )
        extra.append(f"--model.model.init_args.n_layers={depth}")
    else:
        extra.append(f"--model.model.init_args.n_layers={QUICK_MAIN_LAYERS}")
    return extra
