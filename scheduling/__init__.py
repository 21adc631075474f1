"""Scheduling: the iteration scheduler and the request object. Pure Python, no JAX."""
from scheduling.request import Request, RequestStatus
from scheduling.scheduler import ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput

__all__ = ["Request", "RequestStatus", "ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerOutput"]
