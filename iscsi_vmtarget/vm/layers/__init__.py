"""The layers that serve a unit's bytes as block backends: the guest and raw views
(:mod:`.view`), copy-on-write delta layers and chains (:mod:`.cow`), the raw view
flattened through a chain (:mod:`.flat`) and the dirty-grain tracking of a live copy
(:mod:`.dirty`)."""
