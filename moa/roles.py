"""The roles a composition can play in the report: named once so that no module spells them."""

BASE = "base"  # the base model without any adapter
ORACLE = "oracle"  # each task's own adapter: the upper reference
MOA = "moa"  # the learned router over the task adapters
REFERENCES = (MOA, ORACLE)  # what the report compares every composition with by default
FLOOR = BASE  # what every composition must beat
