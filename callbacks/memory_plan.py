"""The run's memory and time plan (:mod:`nextgpt.plan`), made when the trainer sets up: on every rank,
after the processes start and before ``configure_model`` loads any weight. It is printed, and a run
that would not fit the device is refused (``plan.allow_over_memory=true`` starts it anyway).

The plan builds the model's structure on the meta device from the backbones' configs (no weights);
the world size is the trainer's own. ``plan.check=false`` leaves this callback out.
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from nextgpt.plan import PlanSettings, check_fits, device_figures, make_plan
from nextgpt.plan.meta import PlanError
from nextgpt.runs import RunError
from nextgpt.spec import RunSpec

log = logging.getLogger(__name__)


class PlanRefused(RunError):
    """The run would not fit the device: nothing was loaded or trained."""


class MemoryPlan(L.Callback):
    def __init__(self, spec: RunSpec, settings: PlanSettings):
        self.spec, self.settings = spec, settings

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            plan = make_plan(self.spec, self.settings, world_size=trainer.world_size)
        # a backbone with no readable config: the model's own loading says what is missing
        except PlanError as e:
            log.warning("no memory plan: %s", e)
            return
        except Exception as e:  # a model the estimate does not know how to read must not stop a run
            log.warning("no memory plan (%s: %s); set plan.check=false to skip it", type(e).__name__, e)
            return
        rank_zero_info(plan.table())
        _, _, memory = device_figures(self.settings)
        refusal = check_fits(plan, memory, self.settings.allow_over_memory)
        if refusal:
            raise PlanRefused(refusal)
        if memory is not None and plan.total > memory * 2**30:
            log.warning("the plan exceeds the device memory; starting anyway (plan.allow_over_memory=true)")
