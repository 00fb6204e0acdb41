"""One hook registry over the denoising network, in the style of diffusers' `hooks/`: a hook is
a DenoiserHook (pre_forward sees a call's arguments, post_forward its output and may replace
it), and every sharpfast hook on one network (the serving guard's capture, guidance rules, call
counting, cross-attention edits) runs in install order through ONE torch pre-hook and ONE forward hook, registered
while at least one sharpfast hook is installed and removed with the last one (the network is
left as it was). A hook keeps its per-call state on a typed object of its own; every hook reads
the call through the adapter's `read_call`.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import UsageError


class DenoiserHook:
    """A hook on the denoising network (install it with `HookRegistry.of(net).installed(hook)`)."""

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Called before each forward of the network."""

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Optional[Any]:
        """Called after each forward: a new output replaces the network's, None keeps it."""
        return None

    @contextlib.contextmanager
    def standing_aside(self) -> Iterator[None]:
        """Context manager: in the block this hook leaves the network's calls as they are (a hook
        that only observes already does; one that edits outputs or layers overrides this)."""
        yield

    @property
    def edits_inside(self) -> bool:
        """Whether the network's calls now run through layers this hook edited (so that a hook that
        observes a call sees the edited output, not the network's own)."""
        return False


class HookRegistry:
    """The sharpfast hooks of one network, run in install order (one registry per network)."""

    _all: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _all_lock = threading.Lock()

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net
        self.hooks: tuple[DenoiserHook, ...] = ()
        self._lock = threading.Lock()
        self._handles: list = []

    @classmethod
    def of(cls, net: torch.nn.Module) -> HookRegistry:
        """The registry of this network (made on first use)."""
        with cls._all_lock:
            reg = cls._all.get(net)
            if reg is None:
                reg = cls._all[net] = cls(net)
            return reg

    def add(self, hook: DenoiserHook) -> None:
        """Install a hook (after the ones installed before it)."""
        with self._lock:
            if not self._handles:
                self._handles = [self.net.register_forward_pre_hook(self._pre, with_kwargs=True),
                                 self.net.register_forward_hook(self._post, with_kwargs=True)]
            self.hooks = (*self.hooks, hook)

    def remove(self, hook: DenoiserHook) -> None:
        """Remove a hook; with the last one, the torch hooks go too."""
        with self._lock:
            self.hooks = tuple(h for h in self.hooks if h is not hook)
            if not self.hooks:
                for h in self._handles:
                    h.remove()
                self._handles = []

    @contextlib.contextmanager
    def installed(self, hook: DenoiserHook) -> Iterator[DenoiserHook]:
        """Context manager: the hook installed for the block."""
        self.add(hook)
        try:
            yield hook
        finally:
            self.remove(hook)

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """Context manager: the network's calls in the block are its own. Every installed hook that
        edits stands aside (a guard scoring a request whose mitigation is already on: its extra
        calls must see the model, not the mitigated model); observers still see the calls."""
        with contextlib.ExitStack() as stack:
            for h in self.hooks:
                stack.enter_context(h.standing_aside())
            yield

    def edits_inside(self) -> bool:
        """Whether an installed hook now edits the network's layers (see DenoiserHook.edits_inside)."""
        return any(h.edits_inside for h in self.hooks)

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        for h in self.hooks:
            h.pre_forward(module, args, kwargs)

    def _post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        for h in self.hooks:
            new = h.post_forward(module, args, kwargs, output)
            if new is not None:
                output = new
        return output


def prediction_of(output: Any) -> torch.Tensor:
    """The prediction tensor of a network's output (a tuple, or an object with .sample)."""
    return output[0] if isinstance(output, tuple) else output.sample


def with_prediction(output: Any, pred: torch.Tensor) -> Any:
    """The network's output with its prediction replaced."""
    if isinstance(output, tuple):
        return (pred, *output[1:])
    output.sample = pred
    return output


class CallCounter(DenoiserHook):
    """Rows through the network while installed (the calls of other hooks included)."""

    def __init__(self, model: Any) -> None:
        self.model, self.rows = model, 0

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Count the call's rows."""
        self.rows += int(self.model.read_call(args, kwargs)[0].shape[0])

    @contextlib.contextmanager
    def counting(self) -> Iterator[CallCounter]:
        """Context manager: count for the block."""
        with HookRegistry.of(self.model.unet).installed(self):
            yield self


@dataclass
class DenoiserCall:
    """One call of the network as the adapter reads it: its rows, timestep (as the call got it:
    float(call.timestep) for a comparison), text embeddings and added inputs."""

    sample: torch.Tensor
    timestep: Any
    hidden: torch.Tensor
    added: Optional[dict]


Rule = Callable[["GuidanceHook", torch.Tensor, torch.Tensor, DenoiserCall, torch.Tensor], Optional[torch.Tensor]]


class GuidanceHook(DenoiserHook):
    """A guidance rule on the mitigated images' rows of the CFG batch [null; cond]: their
    conditional prediction c becomes c' = u + (target - u) / g, so that the pipeline's own
    u + g (c' - u) is `target` = rule(hook, u, c, call, rows) (g: the request's scale; None
    keeps the call as it was); the other rows are returned bit for bit. One hook per generation;
    its per-call state is `state` (the rule's own typed object)."""

    def __init__(self, model: Any, guidance_scale: float, rows: list, images: int, rule: Rule,
                 state: Any = None) -> None:
        self.model, self.net, self.g, self.rule = model, model.unet, float(guidance_scale), rule
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self.images = images
        self.calls = 0
        self.inside = False  # a rule's own extra call on the net must not be hooked
        self.state = state

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Optional[Any]:
        """Rewrite the mitigated rows' guided prediction by the rule."""
        if self.inside:
            return None
        pred = prediction_of(output)
        if pred.shape[0] != 2 * self.images:
            raise UsageError(f"a guidance mitigation expects the CFG batch of {self.images} images "
                             f"[null; cond], got a batch of {pred.shape[0]}: call with guidance_scale > 1")
        sample, t, hidden, added = self.model.read_call(args, kwargs)
        call = DenoiserCall(sample, t, hidden, added)
        rows = self.rows.to(pred.device)
        u, c = pred.chunk(2)
        target = self.rule(self, u[rows].float(), c[rows].float(), call, rows)
        self.calls += 1
        if target is None:
            return None
        u_r = u[rows].float()
        new = pred.clone()
        new[self.images + rows] = (u_r + (target - u_r) / self.g).to(pred.dtype)
        return with_prediction(output, new)

    @contextlib.contextmanager
    def standing_aside(self) -> Iterator[None]:
        """Context manager: the rule leaves the calls in the block as they are."""
        was, self.inside = self.inside, True
        try:
            yield
        finally:
            self.inside = was

    @contextlib.contextmanager
    def installed(self) -> Iterator[GuidanceHook]:
        """Context manager: the hook installed on the network for one pipeline call."""
        with HookRegistry.of(self.net).installed(self):
            yield self


class AttentionEdit(DenoiserHook):
    """Cross-attention edited on the calls of the network while installed: at the first call each
    cross-attention layer (attn2) gets a processor that applies `edit(scores, rows)` to the logits
    of `rows` of its batch (sharpfast.attention.LogitEditProcessor), kept until the hook is
    uninstalled, when the layers' own processors are back (swapped once per generation, not per
    step). `layers(name)` picks the layers edited (default: all). `calls` counts the edited calls."""

    def __init__(self, unet: Any, edit: Callable, rows: Optional[torch.Tensor] = None,
                 layers: Optional[Callable[[str], bool]] = None):
        from ..attention import require_cross_attention

        require_cross_attention(unet, "edits a UNet's cross-attention")
        self.unet, self.edit, self.rows, self.layers = unet, edit, rows, layers
        self.calls = 0
        self._saved: Optional[dict] = None
        self._aside = False

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Put the editing processors on the attn2 layers (once)."""
        from ..attention import editing_processors

        if self._aside:
            return
        if self._saved is None:
            self._saved = self.unet.attn_processors
            self.unet.set_attn_processor(editing_processors(self._saved, self.edit, self.rows, self.layers))
        self.calls += 1

    @property
    def edits_inside(self) -> bool:
        """Whether the editing processors are on the layers now."""
        return self._saved is not None and not self._aside

    @contextlib.contextmanager
    def standing_aside(self) -> Iterator[None]:
        """Context manager: the layers' own processors for the calls in the block (the editing ones
        back after it)."""
        own = self._saved
        editing = self.unet.attn_processors if own is not None else None
        if own is not None:  # (set_attn_processor empties the dict it is given: a copy)
            self.unet.set_attn_processor(dict(own))
        self._aside = True
        try:
            yield
        finally:
            self._aside = False
            if editing is not None:
                self.unet.set_attn_processor(editing)

    @contextlib.contextmanager
    def installed(self) -> Iterator[AttentionEdit]:
        """Context manager: the edit installed on the network for one pipeline call (the layers'
        own processors back on exit, also on error)."""
        try:
            with HookRegistry.of(self.unet).installed(self):
                yield self
        finally:
            if self._saved is not None:
                self.unet.set_attn_processor(self._saved)
                self._saved = None
