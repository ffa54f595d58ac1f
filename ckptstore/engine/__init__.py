"""One checkpoint: stage, write, commit, load, verify (the :class:`Checkpointer`)."""
