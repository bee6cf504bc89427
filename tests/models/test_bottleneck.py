"""Gaussian bottleneck and its KL term (eq. 16 with a Gaussian encoder and a standard-normal prior)."""

from __future__ import annotations

import torch
from torch.distributions import Normal, kl_divergence

from pdelightning.models import GaussianBottleneck, gaussian_kl_to_standard_normal


def test_kl_is_zero_at_the_prior() -> None:
    assert gaussian_kl_to_standard_normal(torch.zeros(5, 3), torch.zeros(5, 3)).item() == 0.0


def test_kl_known_value() -> None:
    # one sample, one feature: 0.5 * (mu^2 + e^lv - 1 - lv) = 0.5 * (4 + e - 1 - 1)
    kl = gaussian_kl_to_standard_normal(torch.tensor([[2.0]]), torch.tensor([[1.0]]))
    torch.testing.assert_close(kl, torch.tensor(0.5 * (2.0 + torch.e)))


def test_kl_nonnegative_and_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        mu = 3 * torch.randn(7, 4, generator=g, dtype=torch.float64)
        logvar = 3 * torch.randn(7, 4, generator=g, dtype=torch.float64)
        kl = gaussian_kl_to_standard_normal(mu, logvar)
        assert kl >= 0
        q = Normal(mu, (0.5 * logvar).exp())
        p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
        torch.testing.assert_close(kl, kl_divergence(q, p).sum(-1).mean())  # sum over features, mean over batch


def test_samples_in_training_only_when_sample_is_set() -> None:
    torch.manual_seed(0)
    bn = GaussianBottleneck(6, 3)
    torch.nn.init.constant_(bn.logvar.bias, 0.0)  # unit-ish variance, so samples differ visibly
    h = torch.randn(4, 6)
    mu = bn.mu(h)

    bn.train()
    (t1, kl1), (t2, kl2) = bn(h), bn(h)
    assert not torch.allclose(t1, t2)
    torch.testing.assert_close(kl1, kl2)  # the KL does not depend on the sample

    bn.eval()
    (t1, _), (t2, _) = bn(h), bn(h)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(t1, mu)

    bn.train()
    bn.sample = False
    (t1, _), (t2, _) = bn(h), bn(h)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(t1, mu)


def test_sample_follows_the_reparameterisation() -> None:
    torch.manual_seed(0)
    bn = GaussianBottleneck(5, 2).train()
    h = torch.randn(3, 5)
    torch.manual_seed(123)
    t, kl = bn(h)
    mu, logvar = bn.mu(h), bn.logvar(h)
    torch.manual_seed(123)
    torch.testing.assert_close(t, mu + torch.randn_like(mu) * (0.5 * logvar).exp())
    torch.testing.assert_close(kl, gaussian_kl_to_standard_normal(mu, logvar))
