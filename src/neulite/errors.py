"""The one exception type a user sees: its message names the problem in one line."""


class NeuliteError(Exception):
    """A user-facing error (bad config, unsplittable model, infeasible budget, bad checkpoint)."""
