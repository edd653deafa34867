"""The training loop of one worker, its checkpoint state and the stage plans. Never imports ray or wandb."""

from kd_cluster.train.loop import StageResult, evaluate, run_stage, stage_done
from kd_cluster.train.plan import StagePlan, check_here, plan_job
from kd_cluster.train.session import LocalSession, Session

__all__ = ["LocalSession", "Session", "StagePlan", "StageResult", "check_here", "evaluate", "plan_job",
           "run_stage", "stage_done"]
