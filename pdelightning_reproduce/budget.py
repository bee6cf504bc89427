"""Compute budgets: which seeds and grid cells a reproduction trains, and which cuts it makes to fit.

The configs in ``pdelightning_reproduce/configs/`` and the grids of :mod:`.settings` are the design of the reproduction
(issue 9). A :class:`Budget` says how much of it one machine ran: the seeds of the main settings and of the sweeps,
the cells of each sweep, and extra ``pdelightning fit`` arguments per setting (the *cuts*), each with a sentence
that the report prints. Every run records the budget it was trained under (``run.json``: ``budget``, ``cuts``), so a
report mixing runs of several machines names each run's budget.

* :data:`FULL`: the design as configured (the GPU runs).
* :data:`CPU`: what fits in about three hours of one worker process with one torch thread on a 2-core CPU, after
  the GPU budget ran out (the measured step times and the plan are in ``docs/reproduction/cpu_plan.md``); the v2
  report's runs.
* :data:`V3`: the v3 design (issue 18) with one cut: the sweeps train 100 steps of batch 64. Every cell has 5 seeds;
  the main settings, the 20 Newsgroups ones on the full training set to their plateau criterion, are uncut
  (``docs/reproduction/v3_plan.md``: which of it needs a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from pdelightning_reproduce.settings import SEEDS, SETTINGS, Setting, depth_lr_cells

NEWSGROUPS_TRAIN_POSTS = 3000
NEWSGROUPS_MAX_LEN = 128
SWEEP_STEPS = 100
SWEEP_BATCH = 64
SWEEP_SEEDS_CPU: tuple[int, ...] = (0, 1, 2)
SWEEP_LRS_CPU: tuple[float, ...] = (1e-3, 1e-2)


@dataclass(frozen=True, eq=False)
class Budget:
    """What one machine trains of the design.

    Attributes:
        name: ``"full"``, ``"cpu"`` or ``"v3"`` (recorded in every run's ``run.json``).
        reason: why this budget, in one sentence (printed in the report).
        main_seeds: seeds of the main settings.
        sweep_seeds: seeds of the sweep settings.
        cells: per sweep setting, the cells trained (absent: every cell).
        overrides: per setting, extra ``pdelightning fit`` arguments (the cuts).
        cuts: per setting, the cuts in words (printed in the report; every override is described).
    """

    name: str
    reason: str
    main_seeds: tuple[int, ...] = SEEDS
    sweep_seeds: tuple[int, ...] = SEEDS
    cells: dict[str, tuple[str, ...]] = field(default_factory=dict)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cuts: dict[str, str] = field(default_factory=dict)

    def overrides_for(self, setting: str) -> tuple[str, ...]:
        """The extra ``fit`` arguments of ``setting`` under this budget."""
        return self.overrides.get(setting, ())

    def cut_for(self, setting: str) -> str:
        """The cuts of ``setting`` in words (``""``: none)."""
        return self.cuts.get(setting, "")


FULL = Budget("full", "the design as configured in pdelightning_reproduce/configs/ (issue 9)")

_NG_ARGS = (
    f"--data.init_args.train_subset={NEWSGROUPS_TRAIN_POSTS}",
    f"--data.init_args.max_len={NEWSGROUPS_MAX_LEN}",
    "--trainer.max_epochs=5",  # v3's configs train to a plateau (30 epochs at most); this budget keeps the paper's 5
)
_NG_CUT = (
    f"{NEWSGROUPS_TRAIN_POSTS:,} of the 11,314 training posts (a seeded random subset, the same for every run: "
    f"{int(NEWSGROUPS_TRAIN_POSTS * 0.9):,} training / {NEWSGROUPS_TRAIN_POSTS - int(NEWSGROUPS_TRAIN_POSTS * 0.9)} "
    f"validation), max_len {NEWSGROUPS_MAX_LEN} instead of 256 tokens; the paper's 5 epochs and batch 32 kept "
    f"({5 * -(-int(NEWSGROUPS_TRAIN_POSTS * 0.9) // 32)} steps)"
)
_SWEEP_ARGS = (
    f"--trainer.max_steps={SWEEP_STEPS}",
    f"--data.init_args.batch_size={SWEEP_BATCH}",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=0",
)


def _sweep_cut(seeds: tuple[int, ...]) -> str:
    return (
        f"{SWEEP_STEPS} steps of batch {SWEEP_BATCH} ({SWEEP_STEPS * SWEEP_BATCH:,} images) instead of one epoch of "
        f"batch 256 (54,000 images); no validation; seeds {', '.join(map(str, seeds))}"
    )


_SWEEP_CUT = _sweep_cut(SWEEP_SEEDS_CPU)
_TRANSFORMER_SWEEPS = ("sweep_transformer", "sweep_no_residual", "sweep_no_layernorm")
_LR_CELLS = tuple(c.name for c in depth_lr_cells() if c.lr in SWEEP_LRS_CPU)

CPU = Budget(
    "cpu",
    "the GPU budget (one H200 call) ran out after 4 MNIST runs were trained and kept; everything else ran on a "
    "2-core CPU in about three hours of one worker process with one torch thread",
    main_seeds=SEEDS,
    sweep_seeds=SWEEP_SEEDS_CPU,
    cells={s: _LR_CELLS for s in _TRANSFORMER_SWEEPS},
    overrides={
        **{s.name: _NG_ARGS for s in SETTINGS if s.data == "newsgroups"},
        **{s.name: _SWEEP_ARGS for s in SETTINGS if s.role == "sweep"},
    },
    cuts={
        **{s.name: "none (the same config as the GPU runs)" for s in SETTINGS if s.data == "mnist"},
        **{s.name: _NG_CUT for s in SETTINGS if s.data == "newsgroups"},
        **{
            s: _SWEEP_CUT + f"; learning rates {' / '.join(f'{x:g}' for x in SWEEP_LRS_CPU)} only (of 1e-3 / 3e-3 / "
            "1e-2)"
            for s in _TRANSFORMER_SWEEPS
        },
        "sweep_pde": _SWEEP_CUT,
        "sweep_pde_stabilized": _SWEEP_CUT,
    },
)

_V3_MAIN_CUT = {
    "mnist": "none (the config: all 54,000 training images to the plateau criterion, {} epochs at most)",
    "newsgroups": "none (the config: all 10,182 training posts, max_len 256, to the plateau of the validation loss, "
    "{} epochs at most)",
}


def _v3_main_cut(setting: Setting) -> str:
    """The sentence for an uncut main setting, with its config's own epoch cap (so the two cannot drift apart)."""
    cap = yaml.safe_load(setting.config_path.read_text())["trainer"]["max_epochs"]
    return _V3_MAIN_CUT[setting.data].format(cap)


V3 = Budget(
    "v3",
    "the v3 design (issue 18): 5 seeds in every cell, the main settings uncut (the 20 Newsgroups ones on the full "
    "training set to their plateau criterion, on a GPU where one is lent, else in the background on the CPU); the "
    "sweeps cut to 100 steps, enough for the divergence rule's 10 updates and its judgement after them",
    main_seeds=SEEDS,
    sweep_seeds=SEEDS,
    overrides={s.name: _SWEEP_ARGS for s in SETTINGS if s.role == "sweep"},
    cuts={s.name: _sweep_cut(SEEDS) if s.role == "sweep" else _v3_main_cut(s) for s in SETTINGS},
)

BUDGETS: dict[str, Budget] = {b.name: b for b in (FULL, CPU, V3)}


def budget(name: str) -> Budget:
    """The budget called ``name``.

    Raises:
        KeyError: naming the valid budgets.
    """
    try:
        return BUDGETS[name]
    except KeyError:
        raise KeyError(f"unknown budget {name!r}; valid: {', '.join(BUDGETS)}") from None
