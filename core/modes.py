"""A route's serving mode: one enum for the config, the route table and the router."""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    auto = "auto"  # the router decides per request (OOD score, cascade)
    teacher_only = "teacher_only"
    student_only = "student_only"
    shadow = "shadow"  # the teacher answers; the student is scored beside it
