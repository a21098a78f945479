"""Process groups, collectives, expert-parallel building blocks and the step executor."""
