"""The calibration samples as the first decoder layer sees them: each sample's hidden states there, and what the
model hands every decoder layer besides them (position embeddings, masks), from the model's own forward up to the
first layer (embeddings, rotary embeddings, masks), with every decoder layer replaced by a catcher."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ktq.errors import KtqError
from ktq.gpu.model import ModelMap


class _Stop(Exception):
    """Raised by the last input catcher: nothing past the decoder layers is needed."""


@dataclass
class Captured:
    """The calibration samples at the first decoder layer, and what the model passes every layer besides them."""

    hidden: list[torch.Tensor]  # per sample [1, T, H], on the cache device
    kwargs: list[list[dict]]  # [sample][layer] keyword arguments (position embeddings, masks, ...)


class _Catcher(torch.nn.Module):
    def __init__(self, index: int, last: bool, sink: list) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if args[1:]:
            raise KtqError("the decoder layers take positional arguments besides the hidden states; ktq gpu passes "
                           "them by name only")
        self.sink.append((self.index, hidden, kwargs))
        if self.last:
            raise _Stop
        return hidden


def capture(model: ModelMap, read, device, cache_device, dataset) -> Captured:
    """Every sample of `dataset` (input_ids) at the first decoder layer. read(module path) gives a stored weight on
    `device`, or None: the base model's weights outside the decoder layers are loaded with it."""
    from accelerate.utils import set_module_tensor_to_device

    skeleton, first = model.skeleton, model.layer_names[0]
    base_name = first.rsplit(".", 2)[0]
    base = skeleton.get_submodule(base_name)
    container = skeleton.get_submodule(first.rsplit(".", 1)[0])
    for pname, _ in list(base.named_parameters()):
        full = f"{base_name}.{pname}"
        if model.layer_index(full) is not None:
            continue
        value = read(full)
        if value is not None:
            set_module_tensor_to_device(base, pname, device, value=value)
    for bname, buffer in list(base.named_buffers()):
        if model.layer_index(f"{base_name}.{bname}") is None:
            set_module_tensor_to_device(base, bname, device, value=buffer)
    originals = list(container)
    sink: list = []
    count = len(originals)
    for i in range(count):
        container[i] = _Catcher(i, i == count - 1, sink)
    captured = Captured([], [])
    try:
        for ids in dataset["input_ids"]:
            sink.clear()
            try:
                with torch.no_grad():
                    base(input_ids=torch.tensor([ids], device=device), use_cache=False)
            except _Stop:
                pass
            except (TypeError, ValueError) as exc:
                # e.g. GLM-5's layers hand their top-k indices on to the next layer, beside the hidden states
                raise KtqError(f"{type(skeleton).__name__}'s decoder layers pass more than hidden states "
                               f"from one layer to the next ({exc}); ktq gpu calibrates layer by layer on "
                               "hidden states alone: use --quant_method RTN for this model") from exc
            captured.hidden.append(held_on(sink[0][1], cache_device))
            captured.kwargs.append([kwargs for _, _, kwargs in sink])
    finally:
        for i, layer in enumerate(originals):
            container[i] = layer
    return captured


def held_on(tensor: torch.Tensor, cache_device) -> torch.Tensor:
    """A copy of `tensor` where the hidden states are kept: on the host in pinned memory when they come from a GPU,
    so that every later copy to and from the device runs at the bus's speed and overlaps the computation."""
    if torch.device(cache_device).type == "cpu" and tensor.is_cuda:
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
    return tensor.to(cache_device)
