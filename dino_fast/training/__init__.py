"""The DINO training recipe (Caron et al. 2021, ``main_dino.py``): the step (:mod:`.step`), the
loss with its center (:mod:`.loss`), the flat-buffer teacher EMA (:mod:`.ema`), the optimiser
and its parameter groups (:mod:`.optim`), the schedules (:mod:`.schedules`), and what keeps a
run safe: resume (:mod:`.resume`), stop signals (:mod:`.signals`), the non-finite watch
(:mod:`.nonfinite`), the device-side meters (:mod:`.step_meters`), the process group
(:mod:`.distributed`) and how the models are spread over it: DDP or FSDP2 (:mod:`.parallel`,
:mod:`.sharding`)."""
from dino_fast.training.ema import TeacherEMA
from dino_fast.training.loss import DINOLoss
from dino_fast.training.nonfinite import NonFiniteLossError
from dino_fast.training.optim import LARS, build_optimizer, get_params_groups
from dino_fast.training.schedules import cosine_scheduler
from dino_fast.training.step import TrainStep

__all__ = ["DINOLoss", "LARS", "NonFiniteLossError", "TeacherEMA", "TrainStep",
           "build_optimizer", "cosine_scheduler", "get_params_groups"]
