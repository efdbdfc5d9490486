"""How runs train: the pure train and eval steps of one compiled program for every candidate
(train), the one training loop over vmapped cohorts of runs (cohort), where they run and how
many at once (placement), and what survives a process (checkpoint)."""
