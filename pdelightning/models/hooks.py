"""Named identity hook points, after TransformerLens' ``hook_points.py``.

A :class:`HookPoint` is an ``nn.Identity`` that sits on an activation with a stable, documented name
(``blocks.{i}.hook_resid_post``, ``blocks.{i}.attn.hook_pattern``, ...). Anything that walks
``named_modules()`` can find it and attach an ordinary PyTorch forward hook; when nothing listens it
costs one Python call.
"""

from __future__ import annotations

from torch import Tensor, nn


class HookPoint(nn.Module):
    """Identity module marking a named activation.

    Example::

        >>> import torch
        >>> hp = HookPoint()
        >>> seen = []
        >>> handle = hp.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        >>> _ = hp(torch.zeros(2, 3))
        >>> seen, hp.has_hooks
        ([torch.Size([2, 3])], True)
        >>> handle.remove(); hp.has_hooks
        False
    """

    def forward(self, x: Tensor) -> Tensor:
        return x

    @property
    def has_hooks(self) -> bool:
        """Whether a forward or forward-pre hook is registered on this point."""
        return bool(self._forward_hooks or self._forward_pre_hooks)
