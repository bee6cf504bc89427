"""Every change to :mod:`pdelightning_reproduce.rules` after its sha256 was recorded, before the runs (date, what, why).

Read as ``rules.CHANGES_AFTER_FIXING`` (re-exported there); the report prints every entry. The list lives in its own
file so that ``rules.py`` stays under 500 lines.
"""

from __future__ import annotations

CHANGES_AFTER_FIXING: tuple[str, ...] = (
    "2026-11-27, before any real run (only --quick pipeline checks had run): the I(T;Y) probe of ib.* is the "
    "closed-form shrinkage-LDA linear softmax probe (analysis.linear_probe.probe_information, unclipped) instead of "
    "logistic regression by L-BFGS (analysis.information.probe_mutual_information): the same family of linear softmax "
    "classifiers fitted on the same training-split samples and scored on the same probe set, with about half the "
    "measured bias (analysis.information.ESTIMATOR_BIAS 'probe' vs 'probe_logistic') and no iterative fit; no "
    "threshold changed.",
    "2026-11-27, after the GPU call (it analysed 4 MNIST runs, whose numbers were seen, and no 20 Newsgroups run) "
    "and before the CPU analysis: the GPU budget ran out and the rest had to fit about three hours of one CPU core "
    "(docs/reproduction/cpu_plan.md), so the 20 Newsgroups measurement sizes were cut for time: PROBE_N 2000 -> 1000 "
    "test posts, GRAD_N 512 -> 128, the perturbation scan on the first PERTURBATION_N = 250 probe posts (a new "
    "constant; before, the whole probe set), and the checkpoints of steps 10 and 20 not analysed (SKIP_STEPS, new; "
    "the trajectories keep steps 0, 50, 100, 200 and the final one). The sizes were set from the timing of one "
    "profiled analysis of the first CPU-trained 20 Newsgroups run, whose numbers were seen then. A cut of FIT_N to "
    "1000 was tried in that profile and undone because it put the fixed probe's estimate for the untrained model "
    "near -1 bit (the probe overfits at d = 128, 20 classes): FIT_N stays 4000 (all 2,700 training posts of the CPU "
    "runs). The ε grid, every threshold and every rule are unchanged; the probe's bias is printed beside its "
    "numbers. The list moved to rule_changes.py (re-exported as rules.CHANGES_AFTER_FIXING), to keep rules.py under "
    "500 lines.",
)
