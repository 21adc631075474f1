"""Scheduling: the request, the iteration scheduler, the interception policies and their waste
model, duration estimators and hardware profiles. Pure Python, no JAX."""
from scheduling.estimators import DurationEstimator, make_estimator
from scheduling.policies import POLICIES, Policy, make_policy
from scheduling.profile import PAPER_PROFILES, HardwareProfile, load_profile
from scheduling.request import Interception, PauseMode, Request, RequestStatus
from scheduling.scheduler import ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput

__all__ = ["DurationEstimator", "HardwareProfile", "Interception", "PAPER_PROFILES", "POLICIES", "PauseMode",
           "Policy", "Request", "RequestStatus", "ScheduledRequest", "Scheduler", "SchedulerConfig",
           "SchedulerOutput", "load_profile", "make_estimator", "make_policy"]
