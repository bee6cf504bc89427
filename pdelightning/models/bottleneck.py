"""Stochastic Gaussian bottleneck ``T`` for the information-bottleneck loss (paper eqs. 3, 14, 16)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pdelightning.models.hooks import HookPoint


def gaussian_kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    r"""``KL(N(mu, diag(exp(logvar))) || N(0, I))`` summed over features and averaged over the batch.

    This is the variational upper bound :math:`\tilde I(X;T) \ge I(X;T)` of Deep VIB (Alemi et al., 2017),
    the quantity eq. (16) estimates with ``q_phi(t|x)`` Gaussian and ``q_phi(t)`` the standard-normal
    prior. In nats.

    Example::

        >>> gaussian_kl_to_standard_normal(torch.zeros(4, 3), torch.zeros(4, 3))
        tensor(0.)
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()


class GaussianBottleneck(nn.Module):
    """Gaussian encoder ``q(t|x) = N(mu(h), diag(sigma^2(h)))`` between the pooled sequence and the head.

    Samples with the reparameterisation trick in training while ``sample`` is true; returns the mean
    in eval or when ``sample`` is false (the deterministic model of ``beta = 0``).

    Args:
        d_in: width of the pooled representation.
        width: width of ``T``.

    Hook points:
        ``hook_mu``: the mean ``[B, width]``; ``hook_t``: the representation passed to the head.
    """

    def __init__(self, d_in: int, width: int) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"bottleneck width must be positive, got {width}")
        self.mu = nn.Linear(d_in, width)
        self.logvar = nn.Linear(d_in, width)
        nn.init.constant_(self.logvar.bias, -4.0)  # start nearly deterministic
        self.sample = True
        self.hook_mu = HookPoint()
        self.hook_t = HookPoint()

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(t, kl)`` where ``kl`` is :func:`gaussian_kl_to_standard_normal` of this batch."""
        mu = self.hook_mu(self.mu(h))
        logvar = self.logvar(h).clamp(-20.0, 10.0)
        kl = gaussian_kl_to_standard_normal(mu, logvar)
        t = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training and self.sample else mu
        return self.hook_t(t), kl
