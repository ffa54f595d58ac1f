"""Other people's training loops: what a run's state is (:class:`TrainState`) and where its data stands."""
