"""Ready-made runs built on the driver: the InstructGPT demo, the arithmetic GRPO task, their
synthetic data and the tiny models that tests and demos build (no model hub needed)."""
