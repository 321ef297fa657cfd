"""State across denoising steps: the SSAR runtime that threads the residual caches.

A program compiled with SSAR (``second_order_reparam``) comes as two programs over the same
weights: the *step* program (sparse attention plus a cached residual per layer, given as inputs)
and the *refresh* program (dense attention; returns the first-order residuals
``D = O_dense - O_sparse`` per layer). ``SSARRuntime`` owns the caches and the step counter, runs
the refresh program every ``tau``-th step and the step program in between, and turns residuals
into caches by the second-order rule of QuantSparse:

    cache = D(t_ref) + low_rank(D(t_ref) - D(t_ref_previous))

(first order, ``cache = D``, at the first refresh), or with ``extrapolation = "linear"`` the
second-order term scaled by the steps since the refresh (see ``_Branch``). The caches are
explicit inputs and outputs of the programs; nothing here is hidden in them.

Steps are told apart by the model's ``timestep`` input: calls with the same timestep as the call
before are further branches of the same step (the conditional and unconditional calls of
classifier-free guidance), each with caches of its own; a new timestep is the next step; a higher
noise level than the last one starts a new trajectory (as ``reset()`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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


def low_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank-``rank`` truncated SVD of every head's ``[L, D]`` matrix of ``x`` ``[B, H, L, D]``.

    Computed as the projection on the top ``rank`` right singular vectors, found from the small
    ``D x D`` Gram matrix (``eigh``), not by an SVD of the tall ``L x D`` matrix: at 32760 tokens
    that is one GEMM-sized pass over ``x`` instead of a cuSOLVER call per head.
    """
    if rank == 0 or rank >= min(x.shape[-2:]):
        return x
    xf = x.float()
    gram = (xf.transpose(-1, -2) @ xf).double()  # [B, H, D, D]; the eigensolver in float64 is cheap here
    top = torch.linalg.eigh(gram).eigenvectors[..., -rank:].to(xf.dtype)  # eigenvalues ascend
    return ((xf @ top) @ top.transpose(-1, -2)).to(x.dtype)


@dataclass
class _Branch:
    """One stream of calls (e.g. the conditional branch of guidance): what its refreshes measured.

    The correction of a sparse step is ``D`` after the first refresh (first order), then
    ``D + w * low_rank(D - D_previous)``. ``hold`` (QuantSparse): ``w = 1`` until the next refresh;
    the cache is computed once, in the memory of the change, so a layer holds two tensors (D for
    the next change, and the cache). ``linear``: ``w = k / interval`` at the k-th step after the
    refresh, following the residual's trend step by step: three tensors per layer, one addition per
    layer and step.
    """

    residuals: dict[str, torch.Tensor] = field(default_factory=dict)  # D at the last refresh
    changes: dict[str, torch.Tensor] = field(default_factory=dict)  # hold: the cache; linear: the change
    refreshed_at: int = -1
    interval: int = 0  # steps between the last two refreshes

    def refresh(self, residuals: dict[str, torch.Tensor], step: int, schedule: SSARSchedule) -> None:
        changes = {}
        if self.residuals:
            changes = {k: low_rank(d - self.residuals[k], schedule.rank) for k, d in residuals.items()}
            self.interval = step - self.refreshed_at
            if schedule.extrapolation == "hold":
                for k, d in residuals.items():
                    changes[k].add_(d)
        self.residuals, self.changes, self.refreshed_at = residuals, changes, step

    def caches(self, step: int, extrapolation: str) -> dict[str, torch.Tensor]:
        if not self.changes:
            return self.residuals
        if extrapolation == "hold":
            return self.changes
        weight = (step - self.refreshed_at) / self.interval
        return {k: torch.add(d, self.changes[k], alpha=weight) for k, d in self.residuals.items()}


class SSARRuntime(torch.nn.Module):
    """Call it like the model, once per denoiser call of a sampling loop; ``reset()`` between videos."""

    def __init__(self, step: torch.nn.Module, refresh: torch.nn.Module, schedule: SSARSchedule):
        super().__init__()
        self.step_program = step
        self.refresh_program = refresh
        self.schedule = schedule
        self.reset()

    @classmethod
    def of(cls, step: torch.export.ExportedProgram, refresh: torch.export.ExportedProgram, config: CompileConfig) -> "SSARRuntime":
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

    def uncorrected(self, **inputs: torch.Tensor) -> torch.Tensor:
        """One sparse step with zero caches, outside the schedule: what sparsity alone does to an input."""
        return self.step_program(**inputs, **state_inputs(self.step_program, inputs))

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        branch = self._advance(inputs.get(TIMESTEP_INPUT))
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
