"""A user's own ProbeCallback: the example of ``pdelightning/callbacks/README.md``, run as written."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

import pdelightning.callbacks
from pdelightning.callbacks import ProbeCallback
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import image_loaders, our_task

README = Path(pdelightning.callbacks.__file__).with_name("README.md")


def readme_example() -> type[ProbeCallback]:
    """The class defined by the README's Python block."""
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, f"no python block in {README}"
    namespace: dict = {}
    exec(compile(code.group(1), str(README), "exec"), namespace)
    return namespace["HiddenNorm"]


def test_probe_callback_is_public() -> None:
    assert "ProbeCallback" in pdelightning.callbacks.__all__
    assert issubclass(readme_example(), ProbeCallback)


def test_the_readme_example_logs_the_hand_computed_norms() -> None:
    hidden_norm = readme_example()(every_n_steps=2)
    logger = MemoryLogger()
    train, val = image_loaders(n=32, batch_size=16)  # 2 steps per epoch; 32 probe samples (all of val)
    task = our_task()
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[hidden_norm],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    trainer.fit(task, train, val)

    tags = logger.keys()
    keys = sorted(k for k in tags if k.startswith("analysis/hidden_norm/norm/"))
    assert len(keys) == 2  # one per layer of the 2-layer model
    assert [s for s, _ in logger.series(keys[0])] == [0, 2, 4]

    # by hand: every layer's output on the whole validation set, after training (the step-4 probe's weights)
    names = [k.rsplit("/", 1)[1] for k in keys]
    modules = dict(task.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        module = next(m for full, m in modules.items() if full == name or full.endswith("." + name))
        hooks.append(module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o)))
    x = torch.cat([xb for xb, _ in val])
    task.eval()
    with torch.no_grad():
        task(x)
    for h in hooks:
        h.remove()
    for key, name in zip(keys, names, strict=True):
        expected = outputs[name].norm(dim=-1).mean(dim=-1).mean().item()
        assert logger.series(key)[-1] == (4, pytest.approx(expected, rel=1e-5))
