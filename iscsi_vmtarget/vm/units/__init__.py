"""Storage units and where they live: one unit (:mod:`.unit`), the pools that hold
units (:mod:`.pool_protocol`, :mod:`.unit_pools` for directories and the catalog,
:mod:`.device_pool` for a carved device), finding VMs in pools (:mod:`.scan`), the
serve and pool locks of one host (:mod:`.locks`) and the unit leases of device pools
several hosts see (:mod:`.lease`, :mod:`.device_lease`)."""
