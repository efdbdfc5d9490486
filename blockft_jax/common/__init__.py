"""What every floor above uses: a user's mistake as one line (errors), one decider on several
processes (multihost), every durable write (durable), the workdir (workdir), named random streams
(streams), TensorBoard files (scalars), the log's progress lines (progress), the paired
bootstrap (statistics), and one CPU device per physical core (cores). Nothing here imports the
rest of the package."""
