"""Exponential moving average of a model's parameters (the release's rule).

After every optimizer step: ema = rate * ema + (1 - rate) * param, with no warm-up or bias
correction; the average starts as a copy of the parameters. Only parameters are averaged;
buffers are always taken live from the model, as in the released `model_ema` entries. The average
is kept in float32 for bf16/fp16 parameters (a rate of 0.9999 moves a bf16 value by less than its
spacing) and in the parameter's own dtype when that is wider: float64 stays float64.
"""
from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, model, rate=0.9999):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"--ema_rate must be in [0, 1]; got {rate}")
        self.rate = rate
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p.detach().clone().to(torch.promote_types(p.dtype, torch.float32))
                       for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model):
        live = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), self.params)]
        torch._foreach_lerp_(self.params, live, 1.0 - self.rate)

    def state_dict_for(self, model):
        """The release's `model_ema`: model.state_dict() with every parameter replaced by its EMA."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, value in zip(self.names, self.params):
            state[name] = value.detach().clone().to(state[name].dtype)
        return state

    @torch.no_grad()
    def load_state_dict(self, state, source="checkpoint"):
        """Take the EMA values out of a `model_ema` state dict (parameters only, by name)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"{source}: model_ema lacks {len(missing)} parameters (first: {missing[0]}); "
                             "check --model / --enc_dec_depth / --num_gaussians")
        for name, mine in zip(self.names, self.params):  # every shape first: a refused file changes nothing
            if tuple(state[name].shape) != tuple(mine.shape):
                raise ValueError(f"{source}: model_ema[{name}] has shape {tuple(state[name].shape)}, "
                                 f"model expects {tuple(mine.shape)}; check --model / --enc_dec_depth")
        for name, mine in zip(self.names, self.params):
            mine.copy_(state[name])

    @contextmanager
    def swapped_in(self, model):
        """Run the model with the EMA parameters, restoring the live ones afterwards."""
        live = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.params):
                p.copy_(e)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, saved in zip(model.parameters(), live):
                    p.copy_(saved)
