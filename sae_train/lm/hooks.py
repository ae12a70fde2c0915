"""Reading and replacing activations inside a Hugging Face forward pass.

Three operations on a resolved `Site`:
- `capture`: record site activations, stopping the forward once the last one is recorded;
- `splice`: replace a site's value by f(value) for the whole forward pass;
- `SharedPrefix`: the fast twin of `splice` for comparing many replacements on one batch.
  The clean forward runs once; each replacement then reruns only the layers from the site on,
  the earlier layers being stubbed to return their cached output. Tests pin it to `splice`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from sae_train.lm.sites import Site

SpliceFn = Callable[[torch.Tensor], torch.Tensor]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every wanted activation is recorded."""


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _with_first(value: Any, first: torch.Tensor) -> Any:
    return (first, *value[1:]) if isinstance(value, tuple) else first


@contextmanager
def _site_hook(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call fn on the site's activation; a returned tensor replaces it in the forward pass."""
    module = model.get_submodule(site.module)
    if site.on_input:

        def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(_mod: nn.Module, _args: tuple, output: Any) -> Any:
            new = fn(_first(output))
            return None if new is None else _with_first(output, new)

        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


def _forward(model: nn.Module, input_ids: torch.Tensor) -> Any:
    return model(input_ids=input_ids, use_cache=False)


@torch.no_grad()
def capture(model: nn.Module, sites: Sequence[Site], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Site activations [batch, seq, d] for `input_ids`, without running layers past the last site."""
    acts: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[[torch.Tensor], None]:
        def record(x: torch.Tensor) -> None:
            # Copy: a later layer may reuse or modify the buffer in place.
            acts[name] = x.detach().clone()
            if len(acts) == len(sites):
                raise _StopForward

        return record

    with ExitStack() as stack:
        for site in sites:
            stack.enter_context(_site_hook(model, site, recorder(site.name)))
        try:
            _forward(model, input_ids)
        except _StopForward:
            pass
    missing = [s.name for s in sites if s.name not in acts]
    if missing:
        raise RuntimeError(f"the forward pass never reached site(s) {missing}")
    return acts


@contextmanager
def splice(model: nn.Module, site: Site, fn: SpliceFn) -> Iterator[None]:
    """Within the block, every forward pass sees fn(activation) at `site` instead of the activation."""
    with _site_hook(model, site, lambda x: fn(x).to(x.dtype)):
        yield


@contextmanager
def _stub_layers(layers: nn.ModuleList, count: int, cached_output: Any) -> Iterator[None]:
    """Make layers[:count] return the cached output of layers[count-1] without computing.

    Forward hooks still fire on the stub's output, so a splice at the output of
    layers[count-1] (resid_post) applies to the cached value.
    """
    saved = []
    for layer in layers[:count]:
        saved.append(layer.__dict__.get("forward"))
        layer.forward = lambda *args, **kwargs: cached_output
    try:
        yield
    finally:
        for layer, original in zip(layers[:count], saved):
            if original is None:
                del layer.forward
            else:
                layer.forward = original


class SharedPrefix:
    """One clean forward pass, then any number of spliced forwards that skip the shared layers.

    After construction, `clean` holds the clean model output and `activation` the clean
    activation at the site. `run(fn)` returns the model output with fn spliced at the site,
    computing only layers >= site.resume_layer (plus embeddings and the head).
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, site: Site, input_ids: torch.Tensor):
        self.model, self.layers, self.site, self.input_ids = model, layers, site, input_ids
        captured: dict[str, Any] = {}

        def keep_activation(x: torch.Tensor) -> None:
            captured["activation"] = x.detach().clone()

        def keep_layer_output(_mod: nn.Module, _args: tuple, output: Any) -> None:
            captured["resume_input"] = output

        with torch.no_grad(), _site_hook(model, site, keep_activation), ExitStack() as stack:
            if site.resume_layer > 0:
                handle = layers[site.resume_layer - 1].register_forward_hook(keep_layer_output)
                stack.callback(handle.remove)
            self.clean = _forward(model, input_ids)
        self.activation: torch.Tensor = captured["activation"]
        self._resume_input = captured.get("resume_input")

    @torch.no_grad()
    def run(self, fn: SpliceFn) -> Any:
        with _stub_layers(self.layers, self.site.resume_layer, self._resume_input), splice(self.model, self.site, fn):
            return _forward(self.model, self.input_ids)
