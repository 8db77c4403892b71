"""Deciding, per request, whether the student can answer as well as the teacher."""
