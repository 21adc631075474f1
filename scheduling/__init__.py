"""Scheduling: the request, the iteration scheduler, the interception policies and their waste
model, duration estimators and hardware profiles. Pure Python, no JAX."""
from scheduling.estimators import DurationEstimator, make_estimator
from scheduling.lamps import LampsOptions
from scheduling.output import ScheduledRequest, SchedulerOutput
from scheduling.policies import POLICIES, make_policy
from scheduling.policy import Policy, SchedulerView
from scheduling.profile import PAPER_PROFILES, HardwareProfile, load_profile
from scheduling.request import Interception, NextSegment, PauseMode, Request, RequestStatus, SegmentHint
from scheduling.scheduler import Scheduler, SchedulerConfig

__all__ = ["DurationEstimator", "HardwareProfile", "Interception", "LampsOptions", "NextSegment", "PAPER_PROFILES",
           "POLICIES", "PauseMode", "Policy", "Request", "RequestStatus", "ScheduledRequest", "Scheduler",
           "SchedulerConfig", "SchedulerOutput", "SchedulerView", "SegmentHint", "load_profile", "make_estimator",
           "make_policy"]
