"""State across denoising steps: the SSAR runtime that threads the residual caches.

A program compiled with SSAR (``second_order_reparam``) comes as two programs over the same
weights: the *step* program (sparse attention plus a cached residual per layer, given as inputs)
and the *refresh* program (dense attention; returns the first-order residuals
``D = O_dense - O_sparse`` per layer). ``SSARRuntime`` owns the caches and the step counter, runs
the refresh program every ``tau``-th step and the step program in between, and turns residuals
into caches by the second-order rule of QuantSparse:

    cache = D(t_ref) + low_rank(D(t_ref) - D(t_ref_previous))

(first order, ``cache = D``, at the first refresh), or with ``extrapolation = "linear"`` the
second-order term scaled by the steps since the refresh (see ``_Branch``). The low-rank term stays
factored (``qsc.lowrank``): the attention kernel adds ``D`` and ``U @ V`` in its epilogue. The
caches are explicit inputs and outputs of the programs; nothing here is hidden in them.

Steps are told apart by the model's ``timestep`` input: calls with the same timestep as the call
before are further branches of the same step (the conditional and unconditional calls of
classifier-free guidance), each with caches of its own; a new timestep is the next step; a higher
noise level than the last one starts a new trajectory (as ``reset()`` does). A branch whose inputs
change shape (another batch or text length; the token count of a sparse program is fixed) starts
over with a refresh: its caches are sized for the old shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qsc.passes.second_order_reparam import factor_names

from . import lowrank
from .config import CompileConfig
from .graph import state_inputs

TIMESTEP_INPUT = "timestep"


@dataclass(frozen=True)
class SSARSchedule:
    tau: int  # a refresh every tau steps
    rank: int  # rank of the SVD that denoises D(t_ref) - D(t_ref_previous); 0 = not denoised
    dense_steps: int  # leading steps that all refresh (dense attention)
    extrapolation: str  # "hold" or "linear", see ``_Branch``

    def refreshes(self, step: int) -> bool:
        return step < self.dense_steps or (step - self.dense_steps) % self.tau == 0


@dataclass
class _Branch:
    """One stream of calls (e.g. the conditional branch of guidance): what its refreshes measured.

    The correction of a sparse step is ``D + w * U @ V``, with ``U @ V = 0`` after the first refresh
    (first order), then ``low_rank(D - D_previous)``. ``hold`` (QuantSparse): ``w = 1`` until the
    next refresh. ``linear``: ``w = k / interval`` at the k-th step after the refresh, following the
    residual's trend step by step. Either way a layer keeps D and two thin factors (``rank / head
    dim`` of D's size each); the per-step weight scales the small ``V``.
    """

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of the inputs the caches are for
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)  # D at the last refresh
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (U, V) per cache
    refreshed_at: int = -1
    interval: int = 0  # steps between the last two refreshes; 0 before the second

    def refresh(self, residuals: dict[str, torch.Tensor], step: int, schedule: SSARSchedule) -> None:
        if self.residuals:
            previous = [self.residuals[k] for k in residuals]
            changes = lowrank.change_factors(list(residuals.values()), previous, schedule.rank)
            self.factors = dict(zip(residuals, changes, strict=True))
            self.interval = step - self.refreshed_at
        else:
            self.factors = {k: _zero_factors(d, schedule.rank) for k, d in residuals.items()}
        self.residuals, self.refreshed_at = residuals, step

    def caches(self, step: int, extrapolation: str) -> dict[str, torch.Tensor]:
        """The step program's cache inputs at ``step``."""
        linear = extrapolation == "linear" and self.interval
        weight = (step - self.refreshed_at) / self.interval if linear else 1.0
        caches = {}
        for name, d in self.residuals.items():
            u, v = self.factors[name]
            u_name, v_name = factor_names(name)
            caches.update({name: d, u_name: u, v_name: v * weight})
        return caches


def _zero_factors(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero low-rank term of the shapes the step program takes for residuals like ``d``."""
    u_shape, v_shape = lowrank.factor_shapes(d.shape, rank)
    return d.new_zeros(u_shape), d.new_zeros(v_shape)


class SSARRuntime(torch.nn.Module):
    """Call it like the model, once per denoiser call of a sampling loop; ``reset()`` between videos."""

    def __init__(self, step: torch.nn.Module, refresh: torch.nn.Module, schedule: SSARSchedule):
        super().__init__()
        self.step_program = step
        self.refresh_program = refresh
        self.schedule = schedule
        self.reset()

    @classmethod
    def of(
        cls, step: torch.export.ExportedProgram, refresh: torch.export.ExportedProgram, config: CompileConfig
    ) -> "SSARRuntime":
        """The runtime of a compiled pair of programs, with the schedule of their configuration."""
        schedule = SSARSchedule(config.ssar_tau, config.ssar_rank, config.dense_steps, config.ssar_extrapolation)
        return cls(step.module(), refresh.module(), schedule).requires_grad_(False)

    def reset(self) -> None:
        self.step_index = -1
        self._branch = 0
        self._branches: list[_Branch] = []
        self._last_timestep: float | None = None

    def residuals(self, branch: int = 0) -> dict[str, torch.Tensor]:
        """The residuals ``D`` of ``branch``'s last refresh (empty before its first)."""
        return self._branches[branch].residuals if branch < len(self._branches) else {}

    def caches(self, branch: int = 0) -> dict[str, torch.Tensor]:
        """The cache inputs ``branch``'s step program got, or gets, at the current step."""
        return self._branches[branch].caches(self.step_index, self.schedule.extrapolation)

    def uncorrected(self, **inputs: torch.Tensor) -> torch.Tensor:
        """One sparse step with zero caches, outside the schedule: what sparsity alone does to an input."""
        return self.step_program(**inputs, **state_inputs(self.step_program, inputs))

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        branch = self._advance(inputs.get(TIMESTEP_INPUT))
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        if branch.shapes != shapes:  # another batch or text length: caches of other shapes are of no use
            branch = self._branches[self._branch] = _Branch(shapes)
        if self.schedule.refreshes(self.step_index) or not branch.residuals:
            out, residuals = self.refresh_program(**inputs)
            branch.refresh(residuals, self.step_index, self.schedule)
            return out
        return self.step_program(**inputs, **branch.caches(self.step_index, self.schedule.extrapolation))

    def _advance(self, timestep: torch.Tensor | None) -> _Branch:
        t = None if timestep is None else float(timestep.detach().flatten()[0])
        if t is not None and self._last_timestep is not None and t > self._last_timestep:
            self.reset()  # the noise level went up: a new trajectory
        if t is not None and t == self._last_timestep:
            self._branch += 1
        else:
            self.step_index, self._branch = self.step_index + 1, 0
        self._last_timestep = t
        while len(self._branches) <= self._branch:
            self._branches.append(_Branch())
        return self._branches[self._branch]
