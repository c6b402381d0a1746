"""The DeepSpeed learner: `Learner` (one rank, plain class) and `LearnerGroup` (N ranks on Ray)."""
