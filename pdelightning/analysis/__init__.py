"""The analysis math, as plain functions with no Lightning in them; the callbacks are thin adapters around it.

- :mod:`~pdelightning.analysis.attention`: attention-map similarities, divergences, head matching, skill scores.
- :mod:`~pdelightning.analysis.attention_layers`: AttentionSimilarity's per-sample sums and summary, all layers at once.
- :mod:`~pdelightning.analysis.cka`: linear CKA (centred features) with the biased and the unbiased HSIC estimators.
- :mod:`~pdelightning.analysis.estimator_bias`: the measured bias of the ``I(T;Y)`` estimators, and its lookups.
- :mod:`~pdelightning.analysis.gradients`: fused per-group gradient norms and update-to-weight ratios.
- :mod:`~pdelightning.analysis.information`: mutual-information estimators (binning, KDE, probe) and their bias.
- :mod:`~pdelightning.analysis.information_layers`: the KDE and cross-fitted probe estimators of all layers at once.
- :mod:`~pdelightning.analysis.jacobian`: spectral norms of layer Jacobians, the finite-depth Lyapunov exponent.
- :mod:`~pdelightning.analysis.laplacian`: the three-point Laplacian along tokens with its boundary conditions.
- :mod:`~pdelightning.analysis.linear_probe`: the closed-form, cross-fitted LDA probe bound on ``I(T;Y)``.
- :mod:`~pdelightning.analysis.mi_benchmark`: Gaussian classes with a known ``I(T;Y)``, the estimators' test bed.
- :mod:`~pdelightning.analysis.pde_fit`: least-squares fit of a layer's update to the eq. (20) step.
- :mod:`~pdelightning.analysis.perturbation`: seeded noise, RMS scaling, amplification, the critical ε.
- :mod:`~pdelightning.analysis.representation`: token pooling, padding masks, layer correlations.
- :mod:`~pdelightning.analysis.rollout`: attention rollout and attention flow across layers.
- :mod:`~pdelightning.analysis.stability`: eq. (21), exact spectral norms, drift, loss-spike scans.

Import from the submodules; this package re-exports nothing.
"""
