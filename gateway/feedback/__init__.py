"""``POST /v1/feedback``: ratings, scores and corrections of logged answers."""
