"""Reading and replacing activations inside a Hugging Face forward pass.

Operations on resolved `Site`s:
- `capture`: record site activations, stopping the forward once the last one is recorded;
- `splice`: replace a site's value by f(value) for the whole forward pass;
- `splice_from`: replace a target site's value by f(source value, target value), the source read
  earlier in the same forward pass (a transcoder replacing an MLP's output from its actual input);
- `splice_chain`: the same for many (source, target) pairs at once, target i from sources 0..i
  (every layer's MLP output replaced by a cross-layer transcoder, or by a transcoder per layer);
- `SharedPrefix`: the fast twin of both for comparing many replacements on one batch.
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
SourceSpliceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(source activation, target activation) -> the target's replacement."""


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
def splice_from(model: nn.Module, source: Site, target: Site, fn: SourceSpliceFn) -> Iterator[None]:
    """Within the block, every forward pass sees fn(source, target) at `target`, where source is
    the `source` site's activation in that same pass; `source` must be computed before `target`."""
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> None:
        seen[:] = [x.detach().clone()]  # clone: a later module may modify the buffer in place

    def replace(y: torch.Tensor) -> torch.Tensor:
        if not seen:
            raise RuntimeError(
                f"site {target.name} was reached before {source.name} in the forward pass; "
                "a splice can only read a site computed earlier"
            )
        return fn(seen.pop(), y).to(y.dtype)

    with _site_hook(model, source, record), _site_hook(model, target, replace):
        yield


ChainSpliceFn = Callable[[int, list[torch.Tensor], torch.Tensor], torch.Tensor]
"""(i, the activations of sources 0..i in this pass, target i's activation) -> target i's replacement."""


@contextmanager
def splice_chain(model: nn.Module, pairs: Sequence[tuple[Site, Site]], fn: ChainSpliceFn) -> Iterator[None]:
    """Within the block, every forward pass sees fn(i, sources, y) at the target of pairs[i]
    (every i at once), where sources are the activations of the source sites of pairs[0..i] read
    in that same pass: each replaced target feeds the later sources. Each source must be computed
    before its target, and the pairs listed in forward order (a cross-layer transcoder: source i
    = blocks.i.mlp.hook_in, target i = blocks.i.hook_mlp_out; a transcoder per layer likewise)."""
    seen: list[torch.Tensor | None] = [None] * len(pairs)

    def record(i: int) -> Callable[[torch.Tensor], None]:
        def keep(x: torch.Tensor) -> None:
            seen[i] = x.detach().clone()  # clone: a later module may modify the buffer in place

        return keep

    def replace(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def swap(y: torch.Tensor) -> torch.Tensor:
            sources = seen[: i + 1]
            if any(x is None for x in sources):
                raise RuntimeError(
                    f"site {pairs[i][1].name} was reached before the sources {[p[0].name for p in pairs[: i + 1]]} "
                    "in the forward pass; a chain splice reads sites computed earlier"
                )
            return fn(i, sources, y).to(y.dtype)  # type: ignore[arg-type]

        return swap

    with ExitStack() as stack:
        for i, (source, target) in enumerate(pairs):
            stack.enter_context(_site_hook(model, source, record(i)))
            stack.enter_context(_site_hook(model, target, replace(i)))
        yield
        seen[:] = [None] * len(pairs)


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

    After construction, `clean` holds the clean model output, `activation` the clean activation
    at the site and `sources[name]` that of each site in `sources`. `run(fn)` returns the model
    output with fn spliced at the site, computing only layers >= site.resume_layer (plus
    embeddings and the head); `run_from(s, fn)` splices fn(s's activation, site's activation),
    s read in that same forward (`splice_from`), or its clean value where s lies in the skipped
    layers (which compute what the clean pass did).
    """

    def __init__(
        self, model: nn.Module, layers: nn.ModuleList, site: Site, input_ids: torch.Tensor, sources: Sequence[Site] = ()
    ):
        self.model, self.layers, self.site, self.input_ids = model, layers, site, input_ids
        captured: dict[str, Any] = {}

        def keeper(name: str) -> Callable[[torch.Tensor], None]:
            def keep(x: torch.Tensor) -> None:
                captured[name] = x.detach().clone()

            return keep

        def keep_layer_output(_mod: nn.Module, _args: tuple, output: Any) -> None:
            captured["resume_input"] = output

        with torch.no_grad(), ExitStack() as stack:
            for s in (site, *sources):
                stack.enter_context(_site_hook(model, s, keeper(s.name)))
            if site.resume_layer > 0:
                handle = layers[site.resume_layer - 1].register_forward_hook(keep_layer_output)
                stack.callback(handle.remove)
            self.clean = _forward(model, input_ids)
        self.activation: torch.Tensor = captured[site.name]
        self.sources: dict[str, torch.Tensor] = {s.name: captured[s.name] for s in sources}
        self._resume_input = captured.get("resume_input")

    @torch.no_grad()
    def run(self, fn: SpliceFn) -> Any:
        with _stub_layers(self.layers, self.site.resume_layer, self._resume_input), splice(self.model, self.site, fn):
            return _forward(self.model, self.input_ids)

    @torch.no_grad()
    def run_from(self, source: Site, fn: SourceSpliceFn) -> Any:
        if source.layer is not None and source.layer >= self.site.resume_layer:
            replacement = splice_from(self.model, source, self.site, fn)
        else:
            clean = self.sources[source.name]
            replacement = splice(self.model, self.site, lambda y: fn(clean, y))
        with _stub_layers(self.layers, self.site.resume_layer, self._resume_input), replacement:
            return _forward(self.model, self.input_ids)
