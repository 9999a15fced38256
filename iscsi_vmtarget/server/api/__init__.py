"""The remote management API: JSON over HTTPS with bearer tokens (``serve --api``).

:mod:`.tokens` (the token store), :mod:`.tls` (the certificate), :mod:`.routes`
(the route table, from which the OpenAPI document is generated) and :mod:`.app`
(the aiohttp server on the daemon's event loop). Every route runs an admin
request (:meth:`iscsi_vmtarget.server.admin.AdminServer.run`): the same
operations as the CLI and the admin socket, in turn with them.
"""
