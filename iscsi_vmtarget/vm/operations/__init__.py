"""What changes a VM beyond create/delete/config (:mod:`..manager`): snapshots
(:mod:`.snapshot` over :mod:`.snapshot_tree`; :mod:`.snapshot_fill`,
:mod:`.snapshot_resize`, :mod:`.export_marks`), :mod:`.resize`, :mod:`.clone` and
unlink, :mod:`.move` between pools, replication (:mod:`.replica` the stream,
:mod:`.replicate` the rounds, :mod:`.promote` the replica into a VM). Each takes a
:class:`~..manager.VmManager`, works under its session (:meth:`~..manager.VmManager.session`)
and registers its own crash recovery with :data:`~..manager.RECOVERY`."""
