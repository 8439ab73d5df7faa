"""Constants shared by several modules (one home each, so no module imports another just for a number)."""

IGNORE_INDEX = -100  # label value the loss skips: padding, and positions that have no target
