"""The analysis math, as plain functions with no Lightning in them; the callbacks are thin adapters around it.

- :mod:`~pdelightning.analysis.attention`: attention-map similarities, divergences, head matching, skill scores.
- :mod:`~pdelightning.analysis.cka`: linear CKA with the biased and the unbiased HSIC estimators.
- :mod:`~pdelightning.analysis.gradients`: fused per-group gradient norms and update-to-weight ratios.
- :mod:`~pdelightning.analysis.information`: mutual-information estimators (binning, KDE, probe classifier).
- :mod:`~pdelightning.analysis.perturbation`: seeded noise, RMS scaling, amplification, the critical ε.
- :mod:`~pdelightning.analysis.representation`: token pooling, padding masks, layer correlations.
- :mod:`~pdelightning.analysis.stability`: eq. (21), spectral norms, drift, loss-spike scans.

Import from the submodules; this package re-exports nothing.
"""
