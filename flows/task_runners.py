"""``--task-runner threads|dask|ray``: which Prefect task runner the flow runs its units on.

Validated with the rest of the configuration, before anything is written: an unknown kind,
``--address`` without a cluster runner, or a runner whose extra is not installed is a
misconfiguration (exit 2).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from semdedup_core.config import ConfigError

if TYPE_CHECKING:  # the CLI refuses a misconfiguration before Prefect is imported
    from prefect.task_runners import TaskRunner

_EXTRA = {"dask": ("prefect_dask", "semdedup[dask]"), "ray": ("prefect_ray", "semdedup[ray]")}


class RunnerChoice(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["threads", "dask", "ray"] = "threads"
    address: str | None = None

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"--task-runner: {exc.errors()[0]['msg']}") from None

    @model_validator(mode="after")
    def _installed(self) -> RunnerChoice:
        if self.address is not None and self.kind == "threads":
            raise ValueError("--address names a Dask or Ray cluster: add --task-runner dask or ray")
        if self.kind in _EXTRA:
            module, extra = _EXTRA[self.kind]
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"{self.kind} needs {module}, which is not installed: pip install '{extra}'")
        return self

    def build(self, workers: int) -> TaskRunner:
        """The runner: a cluster at ``address``, else a local one of ``workers`` single-threaded
        worker processes (each task then uses one torch/faiss thread, as OMP_NUM_THREADS=1 says)."""
        if self.kind == "dask":
            from prefect_dask import DaskTaskRunner

            if self.address:
                return DaskTaskRunner(address=self.address)
            return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
        from prefect_ray import RayTaskRunner

        if self.address:
            return RayTaskRunner(address=self.address)
        return RayTaskRunner(init_kwargs={"num_cpus": workers, "include_dashboard": False})
