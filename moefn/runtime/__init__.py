"""Runtime pieces installed into a model by `realize`: token dispatch, attention, checkpointing."""
